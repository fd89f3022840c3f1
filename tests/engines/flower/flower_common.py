"""Settings shared by the Flower engine tests."""

TINY = [
    "model=builtin:tiny-llama",
    "num_clients=4",
    "clients_per_round=3",
    "local_steps=3",
    "data_options.max_per_task=6",
    "train.micro_batch_size=2",
    "train.lr=5e-3",
    "train.cutoff_len=96",
    "eval.max_tasks=2",
    "eval.max_examples_per_task=2",
    "eval.max_new_tokens=4",
    "lora.types=[[2, 4], [4, 8], [8, 16]]",
]

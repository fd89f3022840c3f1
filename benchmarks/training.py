"""Training benchmark: a client's local training against a plain PyTorch + PEFT loop, and the
engine's memory for 10, 100 and 1,000 clients.

1. Throughput. The same model, the same LoRA ranks (a client type), the same micro-batches and
   the same AdamW settings, timed as (a) flexlora's ``train_client`` (attach the adapter at the
   client's ranks, tokenise, train, extract the factors, detach) and (b) a plain loop written
   here: ``peft.get_peft_model`` + ``torch.optim.AdamW`` + ``loss.backward()``. Runs alternate
   (a, b, a, b, ...) so drift in machine load hits both; the ratio of the medians is reported.
2. Memory. For each client count, a subprocess builds the in-process engine on
   ``builtin:tiny-llama`` with an IID partition of the demo tasks into that many clients and
   runs two rounds of 4 clients; its resident memory growth over the imports is reported after
   setup and after the rounds. Per-client state is an index into the distinct client types plus
   the partition's example ids, so it should not grow with the client count.

Usage::

    python benchmarks/training.py                          # SmolLM2-135M, type2 (30/30)
    python benchmarks/training.py --model builtin:tiny-llama --steps 20   # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _memory import rss_mib


def _features(tokenizer, n: int, cutoff: int):
    from flexlora.data import load_task_data
    from flexlora.data.templates import encode_example

    data = load_task_data("builtin:demo-tasks")
    exs = [e for task in sorted(data.train) for e in data.train[task]][:n]
    return exs, [encode_example(tokenizer, e, template="alpaca", cutoff_len=cutoff) for e in exs]


def plain_peft_loop(base, features, ranks, alpha, steps, mbs, lr, seed) -> tuple[float, int]:
    """The reference: stock PEFT and a hand-written AdamW loop over the same micro-batches."""
    from peft import LoraConfig, get_peft_model

    from flexlora.training.adapter import rank_pattern_key
    from flexlora.training.batching import collate_for_training, micro_batches

    torch.manual_seed(seed)
    cfg = LoraConfig(r=max(ranks.values()), lora_alpha=alpha, target_modules=list(ranks),
                     rank_pattern={rank_pattern_key(m): r for m, r in ranks.items()}, lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    tokens = 0
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    t0 = time.perf_counter()
    for idx in micro_batches(len(features), steps * mbs, mbs, seed=seed):
        batch = collate_for_training([features[i] for i in idx], pad)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    model.unload()
    return seconds, tokens


def flexlora_client(base, tokenizer, examples, ranks, alpha, steps, mbs, lr, seed) -> tuple[float, int]:
    from flexlora.training.client import ClientSpec, EncodingOptions, train_client
    from flexlora.training.local import LocalTrainConfig

    cfg = LocalTrainConfig(optimizer="adamw", lr=lr, micro_batch_size=mbs, local_steps=steps, max_grad_norm=1.0)
    spec = ClientSpec("bench", ranks, alpha, "bench")
    t0 = time.perf_counter()
    _, res = train_client(base, tokenizer, spec, examples, None, cfg, seed=seed,
                          encoding=EncodingOptions("alpaca", 256, False))
    return time.perf_counter() - t0, res.tokens


def throughput(args) -> dict:
    from flexlora.core.distributions import PAPER_CLIENT_TYPES
    from flexlora.training.models import load_base_model, model_lora_targets, module_shapes

    base, tok = load_base_model(args.model)
    base.requires_grad_(False)
    groups = model_lora_targets(base)
    shapes = module_shapes(base, list(groups))
    ctype = {t.name: t for t in PAPER_CLIENT_TYPES}[args.client_type]
    ranks = ctype.module_ranks(shapes, groups)
    examples, feats = _features(tok, args.steps * args.micro_batch_size, 256)
    # One untimed warm-up of each, then alternate.
    flexlora_client(base, tok, examples, ranks, 16.0, 2, args.micro_batch_size, 1e-4, 0)
    plain_peft_loop(base, feats, ranks, 16.0, 2, args.micro_batch_size, 1e-4, 0)
    ours, ref = [], []
    for rep in range(args.repeats):
        s, n = flexlora_client(base, tok, examples, ranks, 16.0, args.steps, args.micro_batch_size, 1e-4, rep)
        ours.append(n / s)
        s, n = plain_peft_loop(base, feats, ranks, 16.0, args.steps, args.micro_batch_size, 1e-4, rep)
        ref.append(n / s)
    return {
        "model": args.model,
        "client_type": ctype.name,
        "steps": args.steps,
        "micro_batch_size": args.micro_batch_size,
        "flexlora_tok_s": statistics.median(ours),
        "plain_peft_tok_s": statistics.median(ref),
        "ratio": statistics.median(ours) / statistics.median(ref),
        "all_flexlora": ours,
        "all_plain": ref,
    }


def memory_worker(n: int, out_dir: str) -> None:
    from flexlora.engines.config import load_config
    from flexlora.engines.simulation import Simulation

    cfg = load_config(None, [
        "model=builtin:tiny-llama", f"num_clients={n}", "clients_per_round=4", "rounds=2", "local_steps=2",
        "data_options.partition=iid", "train.micro_batch_size=1", "eval.every=0", "eval.baseline=false",
        "eval.max_tasks=1", "eval.max_examples_per_task=1", "eval.max_new_tokens=2",
    ])
    # Current resident set (not ru_maxrss: importing torch/transformers peaks above everything
    # the run itself allocates, which would hide any growth).
    after_import = rss_mib()
    sim = Simulation(cfg, Path(out_dir), progress=False, log=lambda m: None)
    after_setup = rss_mib()
    sim.run()
    after_run = rss_mib()
    json.dump({"clients": n, "rss_after_import_mib": after_import, "setup_mib": after_setup - after_import,
               "run_mib": after_run - after_import}, sys.stdout)


def memory(counts) -> list[dict]:
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", str(n), "--out", d],
                                  capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory worker for {n} clients failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--client-type", default="type2", choices=("type1", "type2", "type3", "type4"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.out)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result: dict = {}
    if not args.skip_throughput:
        t = throughput(args)
        result["throughput"] = t
        print(f"local training, {t['model']}, {t['client_type']}, {t['steps']} steps x {t['micro_batch_size']}:")
        print(f"  flexlora train_client {t['flexlora_tok_s']:.1f} tok/s | plain PEFT loop {t['plain_peft_tok_s']:.1f} tok/s"
              f" | ratio {t['ratio']:.3f} (target >= 0.95)")
    if args.clients:
        rows = memory(args.clients)
        result["memory"] = rows
        print("engine memory (builtin:tiny-llama, 2 rounds x 4 clients):")
        for r in rows:
            print(f"  {r['clients']:>5} clients: +{r['setup_mib']:.1f} MiB after setup, +{r['run_mib']:.1f} MiB after "
                  f"2 rounds (resident memory over the {r['rss_after_import_mib']:.0f} MiB of the imports)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Peak memory of one SmolLM2-135M client of type 4 (rank 200): SLoRA's sparse stage 1 against LoRA.

Run: .venv/bin/python benchmarks/slora_memory.py. It measures each in its own child process
(ru_maxrss is a process's peak) and prints both peaks and their ratio (LoRA is the reference).
"""
import resource
import sys
import tempfile
import time

from flexlora.engines.config import load_config
from flexlora.engines.simulation import Simulation

if len(sys.argv) == 1:
    import re
    import subprocess

    peaks = {}
    for name in ("slora", "flexlora"):
        out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True).stdout
        print(out.strip())
        peaks[name] = float(re.search(r"peak RSS (\d+) MiB", out).group(1))
    print(f"ratio SLoRA stage 1 / LoRA rank 200: {peaks['slora'] / peaks['flexlora']:.2f}x peak memory")
    sys.exit(0)
agg = sys.argv[1]
sets = ["num_clients=1", "clients_per_round=1", "rounds=1", "local_steps=2", "lora.ranks=[[200, 200]]",
        "train.micro_batch_size=2", "train.cutoff_len=128", "eval.every=0", "eval.baseline=false",
        "eval.per_type=false", "eval.max_tasks=1", "eval.max_examples_per_task=1", "eval.max_new_tokens=2",
        f"aggregator={agg}", "slora.then=flexlora", "slora.stage1_rounds=1"]
t0 = time.time()
sim = Simulation(load_config(None, sets), tempfile.mkdtemp(prefix=f"slora_mem_{agg}_"), progress=False, log=lambda m: None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sim.run()
print(agg, f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB (after setup {before:.0f} MiB), {time.time()-t0:.0f}s",
      "masked entries", sum(sim.slora_counts(0).values()) if agg == "slora" else "-")

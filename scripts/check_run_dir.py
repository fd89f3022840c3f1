"""Check that a run directory holds every output of a finished run (used by `make flower-demo`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--clients", type=int, required=True, help="clients expected per round")
    a = p.parse_args()
    d = a.run_dir
    problems = [rel for rel in ("config.toml", "partition.json", "metrics.jsonl", "summary.txt", "checkpoints/latest.pt",
                                "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "plots/train_loss.png")
                if not (d / rel).is_file()]
    if not (d / "tensorboard").is_dir() or not any((d / "tensorboard").iterdir()):
        problems.append("tensorboard/")
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    rounds = [r for r in recs if r["round"] >= 1]
    if [r["round"] for r in rounds] != list(range(1, a.rounds + 1)):
        problems.append(f"rounds {[r['round'] for r in rounds]} != 1..{a.rounds}")
    for r in rounds:
        if len(r["bytes"]) != a.clients or r.get("dropped"):
            problems.append(f"round {r['round']}: {len(r['bytes'])} clients, dropped {r.get('dropped')}")
    if problems:
        print(f"{d}: " + "; ".join(problems), file=sys.stderr)
        return 1
    last = rounds[-1]
    print(f"{d}: complete; round {last['round']} train loss {last['train_loss']:.4f}, "
          f"bytes up/down per client: " + ", ".join(f"{c}={b['type']} {b['up']}/{b['down']}"
                                                    for c, b in sorted(last["bytes"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

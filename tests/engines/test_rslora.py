"""``lora.rslora``: the rsLoRA scaling alpha / sqrt(r) through a whole in-process run.

The tiny run's client types have ranks 2..16, where sqrt(r) != r, so a layer that ignored the
flag would train, aggregate or export a different update and fail these tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_common import TINY

from flexlora.core.types import ClientUpdate
from flexlora.engines.checkpoint import CheckpointError, run_fingerprint
from flexlora.engines.config import ConfigError, load_config, to_toml
from flexlora.engines.simulation import Simulation
from flexlora.methods import ClientReply, ReplyError, pack_factors

QUIET = ("eval.every=0", "eval.baseline=false", "eval.per_type=false")


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def _run(tmp_path: Path, name: str, *extra: str) -> Simulation:
    sim = Simulation(_cfg(*extra), tmp_path / name, progress=False, log=lambda m: None)
    sim.run()
    return sim


def test_config_key_parses_validates_and_round_trips(tmp_path: Path) -> None:
    assert _cfg().lora.rslora is False
    cfg = _cfg("lora.rslora=true")
    assert cfg.lora.rslora is True
    with pytest.raises(ConfigError, match="lora.rslora"):
        _cfg("lora.rslora=yes")
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_fingerprints_of_runs_from_before_the_new_keys_are_unchanged() -> None:
    # Golden values: `config_fingerprint(load_config(None, sets).to_dict(), ignore=("rounds", "flower"))`
    # computed with the code of commit 821d559, before lora.rslora, data_options.*_field, eval.data and
    # lora.init existed. A checkpoint written then must still resume, so the new keys at their defaults must not count.
    assert run_fingerprint(load_config(None, [])) == "d7421dc6bfea4ec72cbea696a6096f9a42c9eaf48f0a3820210f3a7855494dad"
    sets = ["model=builtin:tiny-llama", "num_clients=4", "lora.types=[[2, 4], [4, 8]]"]
    assert run_fingerprint(load_config(None, sets)) == "01f9f5cb6c51eddd63352c1a0f4be04625c5df4dc1521738fb0229da33e74caa"
    # ...and each of them counts once it is set.
    base = run_fingerprint(load_config(None, sets))
    for extra in ("lora.rslora=true", "data_options.task_field=category", "eval.data=x.jsonl", "eval.id_field=uid",
                  "lora.init=per-client"):
        assert run_fingerprint(load_config(None, [*sets, extra])) != base, extra


def test_fingerprint_counts_rslora_only_when_set() -> None:
    plain = _cfg()
    assert run_fingerprint(_cfg("lora.rslora=true")) != run_fingerprint(plain)
    assert run_fingerprint(_cfg("lora.rslora=true", "rounds=9")) == run_fingerprint(_cfg("lora.rslora=true"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_rslora_run_differs_exports_use_rslora_and_matches_the_global_update(tmp_path: Path) -> None:
    from peft import PeftModel

    from flexlora.training.models import load_base_model

    rs = _run(tmp_path, "rs", "rounds=2", *QUIET, "lora.rslora=true")
    plain = _run(tmp_path, "plain", "rounds=2", *QUIET)
    # Every client is told to train with rsLoRA and the server scales its replies accordingly.
    tasks = rs.plan_round(3)
    assert tasks and all(t.spec.rslora for t in tasks)
    assert not any(t.spec.rslora for t in plain.plan_round(3))
    # Same seed, data and ranks: only the scaling differs, and it changes the run.
    assert rs.records[-1]["train_loss"] != plain.records[-1]["train_loss"]
    m0 = next(iter(rs.shapes))
    assert not torch.allclose(rs.state.dense(m0), plain.state.dense(m0), rtol=1e-3, atol=1e-6)

    cfg = json.loads((rs.run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    assert json.loads((plain.run_dir / "adapter" / "adapter_config.json").read_text())["use_rslora"] is False

    # Stock peft applies (alpha / sqrt(r)) B A to the exported factors; that is the best rank-r
    # approximation of the server's global update (Eckart-Young, by a plain SVD here).
    base, _ = load_base_model("builtin:tiny-llama")
    stock = PeftModel.from_pretrained(base, str(rs.run_dir / "adapter"))
    inner = stock.base_model.model
    alpha = rs.cfg.lora.alpha
    for m, r in rs.export_ranks.items():
        layer = inner.get_submodule(m)
        assert layer.r["default"] == r and r > 1
        assert layer.scaling["default"] == pytest.approx(alpha / math.sqrt(r), rel=1e-12)
        U, S, Vh = torch.linalg.svd(rs.state.dense(m).double(), full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        delta = layer.get_delta_weight("default").double()
        assert float(torch.linalg.norm(delta - best)) <= 1e-4 * float(torch.linalg.norm(best)), m


def _reply(u: ClientUpdate) -> ClientReply:
    return ClientReply(pack_factors(u.factors), u.num_examples, {"alpha": u.alpha, "rslora": u.rslora})


def test_rslora_resume_and_mismatched_replies_are_refused(tmp_path: Path) -> None:
    plain = _run(tmp_path, "a", "rounds=1", *QUIET)
    # A plain-LoRA checkpoint cannot be continued as an rsLoRA run: its factors mean other updates.
    with pytest.raises(CheckpointError, match="different configuration"):
        Simulation(_cfg("rounds=2", *QUIET, "lora.rslora=true"), plain.run_dir, resume=True, progress=False,
                   log=lambda m: None)
    rs = Simulation(_cfg("rounds=1", *QUIET, "lora.rslora=true"), tmp_path / "b", progress=False,
                    log=lambda m: None)
    task = rs.plan_round(1)[0]
    factors = {m: (torch.randn(r, rs.shapes[m][1]), torch.zeros(rs.shapes[m][0], r)) for m, r in task.spec.ranks.items()}
    # An engine that drops the flag (it then defaults to False) gets its replies rejected, by name.
    n = rs.partition.num_examples(task.client)
    lacking = ClientUpdate(factors, num_examples=n, alpha=task.spec.alpha)
    with pytest.raises(ReplyError, match="rslora False differs"):
        rs.method.read_reply(task, _reply(lacking))
    ok = ClientUpdate(factors, num_examples=n, alpha=task.spec.alpha, rslora=True)
    assert rs.method.read_reply(task, _reply(ok)).rslora is True and rs.check_count(task, n) is None


def test_flora_with_rslora_runs_and_restores_the_base(tmp_path: Path) -> None:
    from flexlora.training.models import load_base_model

    sim = _run(tmp_path, "f", "rounds=2", "aggregator=flora", *QUIET, "lora.rslora=true")
    assert math.isfinite(sim.records[-1]["train_loss"])
    # The stacked global update (rank R per module) reproduces the state exactly with alpha / sqrt(R).
    stacked = sim.method.aggregator.stacked(sim.state, sim.cfg.lora.alpha, rslora=True)
    for m, (a, b) in stacked.items():
        R = a.shape[0]
        eff = (sim.cfg.lora.alpha / math.sqrt(R)) * (b.double() @ a.double())
        ref = sim.state.dense(m).double()
        assert float(torch.linalg.norm(eff - ref)) <= 1e-5 * float(torch.linalg.norm(ref)), m
    fresh, _ = load_base_model("builtin:tiny-llama")
    for (n1, p1), (n2, p2) in zip(sim.model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1

"""End-to-end runs of the in-process engine on builtin:tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_common import TINY, run_cli
from faults_plan import seam_env
from safetensors.torch import load_file

from flexlora.engines.checkpoint import CheckpointError, load_checkpoint
from flexlora.engines.config import load_config
from flexlora.engines.simulation import Simulation, deterministic_view, sample_round_clients


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def _run(tmp_path: Path, name: str, *extra: str) -> Simulation:
    sim = Simulation(_cfg(*extra), tmp_path / name, progress=False, log=lambda m: None)
    sim.run()
    return sim


def test_run_writes_every_output(tmp_path: Path) -> None:
    sim = _run(tmp_path, "a", "rounds=2")
    d = sim.run_dir
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for key in ("train_loss", "rougeL", "eval_loss", "groups", "bytes_up", "bytes_down", "seconds", "spectrum"):
        assert key in records[2], key
    assert records[1]["bytes_down"] == 0 and records[2]["bytes_down"] > 0  # round 1 starts from scratch
    # The spectrum names the first singular value beyond each client rank of its module, from an
    # SVD of the dense global update computed here in float64.
    spec = records[2]["spectrum"]
    sv = torch.linalg.svdvals(sim.state.dense(spec["module"]).double())
    ranks = {t.module_ranks(sim.shapes, sim.groups)[spec["module"]] for t in (sim.types[i] for i in set(sim.client_type))}
    assert spec["beyond_ranks"] and set(spec["beyond_ranks"]) == {str(r) for r in ranks if r < spec["rank_held"]}
    for r, v in spec["beyond_ranks"].items():
        assert abs(v - float(sv[int(r)])) <= 1e-4 * float(sv[0]), (r, v, float(sv[int(r)]))
    assert 0.0 <= records[0]["rougeL"] <= 1.0
    assert set(records[2]["rougeL_per_task"]) <= set(sim.data.unseen)
    assert set(records[2]["rougeL_by_type"]) == {t.name for t in sim.types}
    for rel in ("config.toml", "partition.json", "checkpoints/latest.pt", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "summary.txt", "plots/train_loss.png", "plots/rougeL.png"):
        assert (d / rel).is_file(), rel
    assert any((d / "tensorboard").iterdir())
    # The resolved config reloads to the same config.
    assert load_config(d / "config.toml") == sim.cfg


def test_clients_train_at_their_own_ranks(tmp_path: Path) -> None:
    sim = Simulation(_cfg("rounds=1"), tmp_path / "r", progress=False, log=lambda m: None)
    from flexlora.training.client import train_client

    for k in range(sim.num_clients):
        spec = sim.client_spec(k)
        update, _ = train_client(sim.model, sim.tokenizer, spec, sim.client_examples(k)[:2], None,
                                 sim.train_cfg, seed=k)
        t = sim.types[sim.client_type[k]]
        for m, (a, b) in update.factors.items():
            want = min(t.rank_for(sim.groups[m]), *sim.shapes[m])
            assert a.shape == (want, sim.shapes[m][1]) and b.shape == (sim.shapes[m][0], want), m
            assert b.abs().sum() > 0, f"{m}: B is still zero, so the client did not train"


def test_round_sampling_is_seeded_and_bounded() -> None:
    a = sample_round_clients(100, 0.05, seed=3, rnd=7)
    assert a == sample_round_clients(100, 0.05, seed=3, rnd=7)
    assert len(a) == 5 and len(set(a)) == 5 and all(0 <= k < 100 for k in a)
    assert a != sample_round_clients(100, 0.05, seed=3, rnd=8)
    assert len(sample_round_clients(10, 3, seed=0, rnd=1)) == 3
    assert len(sample_round_clients(10, 50, seed=0, rnd=1)) == 10
    assert len(sample_round_clients(10, 0.01, seed=0, rnd=1)) == 1


@pytest.mark.parametrize(
    "extra",
    [
        ("aggregator=fedavg", "rank_distribution=homo"),
        ("aggregator=hetlora",),
        ("aggregator=flora",),
        ("train.optimizer=sgd", "train.lr=0.05"),
    ],
)
def test_other_aggregators_run(tmp_path: Path, extra: tuple[str, ...]) -> None:
    sim = _run(tmp_path, "x", "rounds=2", "eval.every=0", "eval.baseline=false", *extra)
    last = sim.records[-1]
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    assert (sim.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_batched_module_svds_give_the_unbatched_run_to_float32_rounding(tmp_path: Path, monkeypatch) -> None:
    """``flexlora.batch_modules = "always"`` reaches the aggregator through the config and
    changes the run only by float32 rounding (the same adapter, the same losses to 1e-5)."""
    from safetensors.torch import load_file

    from flexlora.core import lowrank

    batched = []
    real = lowrank._qr_triplets
    monkeypatch.setattr(lowrank, "_qr_triplets",
                        lambda B, A, k: (B.ndim == 3 and batched.append(B.shape[0])) or real(B, A, k))
    common = ("rounds=2", "eval.every=0", "eval.baseline=false")
    on = _run(tmp_path, "on", *common, 'flexlora.batch_modules="always"')
    off = _run(tmp_path, "off", *common)
    assert on.method.aggregator.batch_modules is True and off.method.aggregator.batch_modules is None
    assert batched and max(batched) > 1  # the "on" run did batch its modules
    a = load_file(str(on.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(off.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5 * float(b[k].abs().max())), k
    assert on.records[-1]["train_loss"] == pytest.approx(off.records[-1]["train_loss"], rel=1e-5)


def test_flora_clients_start_fresh_on_the_merged_global(tmp_path: Path) -> None:
    sim = _run(tmp_path, "f", "rounds=2", "aggregator=flora", "eval.every=0", "eval.baseline=false")
    # After the run the base weights are bit-identical to a freshly loaded base.
    from flexlora.training.models import load_base_model

    fresh, _ = load_base_model("builtin:tiny-llama")
    for (n1, p1), (n2, p2) in zip(sim.model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_existing_run_dir_needs_resume(tmp_path: Path) -> None:
    _run(tmp_path, "a", "rounds=1", "eval.every=0", "eval.baseline=false")
    with pytest.raises(CheckpointError, match="--resume"):
        Simulation(_cfg("rounds=1"), tmp_path / "a", progress=False, log=lambda m: None)


def test_resume_rejects_a_changed_config(tmp_path: Path) -> None:
    _run(tmp_path, "a", "rounds=1", "eval.every=0", "eval.baseline=false")
    with pytest.raises(CheckpointError, match="different configuration"):
        Simulation(_cfg("rounds=2", "seed=5", "eval.every=0", "eval.baseline=false"), tmp_path / "a",
                   resume=True, progress=False, log=lambda m: None)


def test_corrupted_checkpoint_is_reported(tmp_path: Path) -> None:
    sim = _run(tmp_path, "a", "rounds=1", "eval.every=0", "eval.baseline=false")
    path = sim.run_dir / "checkpoints" / "latest.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(sim.run_dir / "checkpoints")


def test_resume_after_kill_is_bit_exact(tmp_path: Path) -> None:
    sets = [x for s in [*TINY, "rounds=3", "eval.every=2"] for x in ("--set", s)]
    full = tmp_path / "full"
    res = run_cli(["run", *sets, "--output", str(full), "--no-progress"])
    assert res.returncode == 0, res.stderr

    killed = tmp_path / "killed"
    # SIGKILL in the middle of round 3, after its second client trained: round 3 is lost and
    # must be redone from the round-2 checkpoint.
    res = run_cli(["run", *sets, "--output", str(killed), "--no-progress"], seam_env("kill-after-client=3:2"))
    assert res.returncode == -9, (res.returncode, res.stderr)
    assert load_checkpoint(killed / "checkpoints")["round"] == 2
    res = run_cli(["run", "--resume", str(killed), "--no-progress"])
    assert res.returncode == 0, res.stderr

    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert deterministic_view(ra) == deterministic_view(rb)


def test_peft_export_matches_the_engine_global_model(tmp_path: Path) -> None:
    from peft import PeftModel

    from flexlora.training.adapter import client_adapter
    from flexlora.training.models import load_base_model

    sim = _run(tmp_path, "e", "rounds=2", "eval.every=0", "eval.baseline=false")
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    factors = sim.global_factors()
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    with client_adapter(sim.model, ranks, sim.cfg.lora.alpha, factors) as m:
        want = m(input_ids=ids).logits
    base, _ = load_base_model("builtin:tiny-llama")
    stock = PeftModel.from_pretrained(base, str(sim.run_dir / "adapter"))
    got = stock(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # The adapter really changes the model (otherwise the comparison above proves nothing).
    fresh, _ = load_base_model("builtin:tiny-llama")
    assert not torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-4)


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    res = run_cli(["run", "--set", "roundz=3", "--output", str(tmp_path / "z")])
    assert res.returncode == 2
    assert "unknown config key 'roundz'" in res.stderr
    assert not (tmp_path / "z").exists()


def test_distributed_factors_load_into_a_client_and_back(tmp_path: Path) -> None:
    """distribute -> the client's PEFT adapter -> get_factors round-trips exactly."""
    from flexlora.training.adapter import client_adapter, get_factors

    sim = _run(tmp_path, "d", "rounds=1", "eval.every=0", "eval.baseline=false", "eval.per_type=false")
    for k in range(sim.num_clients):
        spec = sim.client_spec(k)
        sent = sim.method.aggregator.distribute(sim.state, spec.ranks, spec.alpha)
        with client_adapter(sim.model, spec.ranks, spec.alpha, sent) as m:
            back = get_factors(m)
        assert back.keys() == sent.keys()
        for name in sent:
            assert torch.equal(back[name][0], sent[name][0]) and torch.equal(back[name][1], sent[name][1])


@pytest.mark.parametrize("agg,dtype,warned", [("flora", "bfloat16", True), ("flora", "float32", False),
                                             ("flexlora", "bfloat16", False)])
def test_merging_into_half_precision_weights_is_announced(tmp_path: Path, agg: str, dtype: str, warned: bool) -> None:
    logs: list[str] = []
    Simulation(load_config(None, [*TINY, "rounds=1", f"aggregator={agg}", f"dtype={dtype}"]), tmp_path / "r",
               progress=False, log=logs.append)
    hits = [m for m in logs if "adds the global update to the bfloat16 base weights" in m]
    assert bool(hits) is warned, logs


def test_a_max_rank_below_the_largest_client_rank_is_refused(tmp_path: Path) -> None:
    from flexlora.engines.config import ConfigError

    with pytest.raises(ConfigError, match=r"flexlora.max_rank = 2 is below the largest client rank"):
        Simulation(load_config(None, [*TINY, "rounds=1", "flexlora.max_rank=2"]), tmp_path / "r",
                   progress=False, log=lambda m: None)


def test_eval_stem_reaches_the_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flexlora.engines.evaluation as federation

    seen: list[bool] = []
    real = federation.evaluate_generation

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stem"))
        return real(*args, **kwargs)

    monkeypatch.setattr(federation, "evaluate_generation", spy)
    for stem in (False, True):
        sim = Simulation(_cfg("rounds=1", f"eval.stem={str(stem).lower()}"), tmp_path / f"s{stem}", progress=False,
                         log=lambda m: None)
        sim.evaluate()
    assert seen == [False, True]

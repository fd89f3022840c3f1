"""The Flower engine's ServerApp and ClientApp driven through an in-process Grid: parity with the
in-process engine, node capabilities, failures and malformed replies (fast; no daemons)."""

from __future__ import annotations

import json
from pathlib import Path

import faults_plan
import pytest
import torch
from engine_common import TINY, run_cli
from safetensors.torch import load_file

from flexlora.core.distributions import types_from_budget
from flexlora.engines.checkpoint import load_checkpoint
from flexlora.engines.config import load_config
from flexlora.engines.federation import FederationError, deterministic_view
from flexlora.engines.flower.client_app import app as client_app
from flexlora.engines.flower.inprocess import InProcessGrid
from flexlora.engines.flower.server_app import run_server
from flexlora.engines.simulation import Simulation


def _flower(tmp_path: Path, name: str, extra: list[str], node_configs=None, grid_hook=None, logs=None):
    nodes = node_configs if node_configs is not None else [{"partition-id": i} for i in range(4)]
    grid = InProcessGrid(client_app, nodes)
    if grid_hook:
        grid_hook(grid)
    out = tmp_path / name
    sink = logs if logs is not None else []
    result = run_server(grid, {"set": ";".join([*TINY, *extra]), "output": str(out)}, log=sink.append)
    return result, grid


def _local(tmp_path: Path, name: str, extra: list[str]) -> Simulation:
    sim = Simulation(load_config(None, [*TINY, *extra]), tmp_path / name, progress=False, log=lambda m: None)
    sim.run()
    return sim


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def _metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [
    [],
    ["aggregator=hetlora"],
    ["aggregator=hetlora", "hetlora.prune_threshold=1.0"],  # every client self-prunes each round
    ["aggregator=flora"],
    ["aggregator=fedavg", "rank_distribution=homo"],
    ["lora.rslora=true"],
    ["lora.init=per-client"],  # round-1 clients draw their own adapters: no init seed on the wire
    # SLoRA: round 1 is the sparse stage (masks and sparse values on the wire), round 2 starts
    # every client from the stage-1 change at its own ranks.
    ["aggregator=slora", "slora.stage1_rounds=1", "slora.then=flexlora"],
])
def test_same_adapter_and_metrics_as_the_in_process_engine(tmp_path: Path, extra: list[str]) -> None:
    extra = ["rounds=2", *extra]
    local = _local(tmp_path, "local", extra)
    res, grid = _flower(tmp_path, "flower", extra)
    a, b = _adapter(local.run_dir), _adapter(res.run_dir)
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert deterministic_view(_metrics(local.run_dir)) == deterministic_view(_metrics(res.run_dir))
    # 4 capability queries + 3 sampled clients in each of 2 rounds
    assert grid.messages_sent == 4 + 3 * 2
    # The comparison is not vacuous: training moved the adapter away from zero.
    assert max(float(t.abs().max()) for t in a.values()) > 0


class _ReversedArrivals(InProcessGrid):
    """Replies come back one per pull, the last task's first: the order a slow first node gives."""

    def pull_messages(self, message_ids):
        ids = [m for m in message_ids if m in self._replies]
        return [self._replies.pop(ids[-1])] if ids else []


@pytest.mark.parametrize("order", ["task", "arrival"])
def test_replies_out_of_order_are_folded_as_they_arrive(tmp_path: Path, order: str) -> None:
    extra = ["rounds=2", f"flower.fold_order={order}"]
    local = _local(tmp_path, "local", extra)
    grid = _ReversedArrivals(client_app, [{"partition-id": i} for i in range(4)])
    res = run_server(grid, {"set": ";".join([*TINY, *extra]), "output": str(tmp_path / "f")}, log=lambda m: None)
    a, b = _adapter(local.run_dir), _adapter(res.run_dir)
    mine, theirs = deterministic_view(_metrics(local.run_dir)), deterministic_view(_metrics(res.run_dir))
    if order == "task":
        # Folded in the tasks' order whatever the arrival order: the in-process engine's numbers, bit for bit.
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert mine == theirs
    else:
        # Folded in arrival order: the same global update B A to float32 accuracy (the factors
        # themselves may differ by the signs of singular vector pairs).
        for ka in (k for k in a if "lora_A" in k):
            kb = ka.replace("lora_A", "lora_B")
            da, db = a[kb] @ a[ka], b[kb] @ b[ka]
            assert float((da - db).norm() / da.norm()) <= 1e-4, ka
        mine, theirs = [r for r in mine if r["round"] > 0], [r for r in theirs if r["round"] > 0]
        assert [r["clients"] for r in mine] == [r["clients"] for r in theirs] and len(mine) == 2
        assert [r["train_loss"] for r in mine] == pytest.approx([r["train_loss"] for r in theirs], rel=1e-4)


def test_flower_run_directory_has_every_output(tmp_path: Path) -> None:
    res, _ = _flower(tmp_path, "f", ["rounds=2"])
    d = res.run_dir
    for rel in ("config.toml", "partition.json", "metrics.jsonl", "summary.txt", "checkpoints/latest.pt",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "plots/train_loss.png"):
        assert (d / rel).is_file(), rel
    assert any((d / "tensorboard").iterdir())
    rec = _metrics(d)[-1]
    # Bytes are logged per client: fp32 factors, down = what the server sent, up = what came back.
    assert set(rec["bytes"]) == set(rec["clients"])
    for cid, b in rec["bytes"].items():
        k = int(cid.removeprefix("client"))
        assert b["up"] == sum(4 * r * sum(s) for r, s in _rank_shapes(d, k)), cid
        assert b["down"] == b["up"]  # round 2 sends each client its own ranks, which it sends back
    assert rec["bytes_up"] == sum(b["up"] for b in rec["bytes"].values())


def _rank_shapes(d: Path, k: int):
    """(rank, (out, in)) of every module of client k, rebuilt from the run's config and model."""
    from flexlora.engines.federation import Federation

    fed = Federation(load_config(d / "config.toml"), d, resume=True, progress=False, log=lambda m: None)
    spec = fed.client_spec(k)
    return [(spec.ranks[m], fed.shapes[m]) for m in fed.shapes]


def test_fp16_wire_halves_the_bytes(tmp_path: Path) -> None:
    r32, _ = _flower(tmp_path, "a", ["rounds=2", "eval.every=0", "eval.baseline=false", "eval.per_type=false"])
    r16, _ = _flower(tmp_path, "b", ["rounds=2", "eval.every=0", "eval.baseline=false", "eval.per_type=false",
                                     "flower.wire_dtype=float16"])
    m32, m16 = _metrics(r32.run_dir)[-1], _metrics(r16.run_dir)[-1]
    assert m16["bytes_up"] * 2 == m32["bytes_up"] and m16["bytes_down"] * 2 == m32["bytes_down"]
    a, b = _adapter(r32.run_dir), _adapter(r16.run_dir)
    # fp16 rounding changes the result a little, not a lot.
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    assert 0 < diff < 0.05 * scale, (diff, scale)


def test_nodes_declare_type_ranks_or_budget(tmp_path: Path) -> None:
    from flexlora.engines.federation import Federation

    fed = Federation(load_config(None, [*TINY, "rounds=1"]), tmp_path / "probe", progress=False, log=lambda m: None)
    from flexlora.engines.run_setup import client_types_for

    types = list(client_types_for(fed.cfg))
    budget_type = types_from_budget([types[1].trainable_params(fed.shapes, fed.groups) + 1], fed.shapes,
                                    types=types, groups=fed.groups)[0]
    assert budget_type.name == "type2"
    nodes = [
        {"partition-id": 0, "client-type": "type3"},
        {"partition-id": 1, "ranks": "3,5"},
        {"partition-id": 2, "budget": float(types[1].trainable_params(fed.shapes, fed.groups) + 1)},
        {"partition-id": 3},
    ]
    res, _ = _flower(tmp_path, "caps", ["rounds=1", "clients_per_round=4", "eval.every=0", "eval.baseline=false",
                                        "eval.per_type=false"], node_configs=nodes)
    ckpt = load_checkpoint(res.run_dir / "checkpoints")
    names = [a[0] for a in ckpt["assignment"]]
    assert names[:3] == ["type3", "r3-5", "type2"]
    assert names[3] == fed.types[fed.client_type[3]].name  # undeclared: the run's own draw
    # Client 1 really trained at ranks 3 (attention) / 5 (MLP): its upload has that size.
    rec = _metrics(res.run_dir)[-1]
    want = sum(4 * (3 if fed.groups[m] == "attention" else 5) * sum(s) for m, s in fed.shapes.items())
    assert rec["bytes"]["client00001"]["up"] == want
    # `flexlora eval`/`export` rebuild the run from its directory: they see the nodes' ranks.
    again = Federation(load_config(res.run_dir / "config.toml"), res.run_dir, resume=True, progress=False,
                       log=lambda m: None)
    assert [again.client_spec(k).type_name for k in range(3)] == ["type3", "r3-5", "type2"]
    assert again.export_ranks == {m: max(r[m] for r in (again.client_spec(k).ranks for k in range(4)))
                                  for m in again.shapes}


def test_a_silent_node_is_dropped_and_the_run_continues(tmp_path: Path) -> None:
    logs: list[str] = []
    # Round 2 samples clients [0, 1, 2] or similar; silence the node of the first sampled one.
    from flexlora.engines.federation import sample_round_clients

    victim = sample_round_clients(4, 3, 0, 2)[0]
    # A 2 s round timeout: the server stops waiting for the silent node's reply after it.
    res, _ = _flower(tmp_path, "s", ["rounds=2", "eval.every=0", "eval.baseline=false", "eval.per_type=false",
                                     "flower.round_timeout=2"],
                     grid_hook=lambda g: g.silent.update({100 + victim: 2}), logs=logs)
    rec = _metrics(res.run_dir)[-1]
    assert [d["client"] for d in rec["dropped"]] == [f"client{victim:05d}"]
    assert "no reply" in rec["dropped"][0]["reason"]
    assert rec["groups"] and sum(g["clients"] for g in rec["groups"].values()) == 2
    assert any(f"client{victim:05d} on node {100 + victim} dropped" in m for m in logs)


def test_the_superlinks_reply_for_a_dead_node_is_matched_to_that_node(tmp_path: Path) -> None:
    # A real SuperLink answers for a node that died with NODE_UNAVAILABLE from its own node id (1):
    # the reply must be matched to the task it answers, not to its sender.
    from flexlora.engines.federation import sample_round_clients

    logs: list[str] = []
    victim = sample_round_clients(4, 3, 0, 1)[1]
    res, _ = _flower(tmp_path, "u", ["rounds=1", "eval.every=0", "eval.baseline=false", "eval.per_type=false"],
                     grid_hook=lambda g: g.unavailable.update({100 + victim: 1}), logs=logs)
    rec = _metrics(res.run_dir)[-1]
    assert [d["client"] for d in rec["dropped"]] == [f"client{victim:05d}"]
    assert rec["dropped"][0]["reason"].startswith("the node is unavailable (crashed or disconnected)")
    assert not any("ignored" in m for m in logs), [m for m in logs if "ignored" in m]


def test_too_few_replies_stop_with_an_error_and_an_intact_checkpoint(tmp_path: Path) -> None:
    silence = lambda g: g.silent.update({n: 2 for n in range(100, 104)})  # noqa: E731
    with pytest.raises(FederationError, match=r"round 2: 0 of 3 .*min_clients = 2.*--resume"):
        _flower(tmp_path, "m", ["rounds=3", "min_clients=2", "eval.every=0", "eval.baseline=false",
                                "flower.round_timeout=2"], grid_hook=silence)
    ckpt = load_checkpoint(tmp_path / "m" / "checkpoints")
    assert ckpt["round"] == 1 and ckpt["global_state"] is not None
    # Bring the nodes back and resume: the run finishes with the adapter of an uninterrupted run.
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(4)])
    run_server(grid, {"output": str(tmp_path / "m"), "resume": True}, log=lambda m: None)
    full, _ = _flower(tmp_path, "full", ["rounds=3", "min_clients=2", "eval.every=0", "eval.baseline=false"])
    a, b = _adapter(tmp_path / "m"), _adapter(full.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault,reason", [
    ("nan", "NaN or Inf"),
    ("shape", "expected rank"),
    ("rank", "expected rank"),
])
def test_bad_replies_are_rejected_by_name(tmp_path: Path, fault: str, reason: str) -> None:
    faults_plan.install_node_faults()
    from flexlora.engines.federation import sample_round_clients

    victim = sample_round_clients(4, 3, 0, 2)[1]
    nodes = [{"partition-id": i, **({"fault": f"{fault}@2"} if i == victim else {})} for i in range(4)]
    logs: list[str] = []
    res, _ = _flower(tmp_path, "b", ["rounds=2", "eval.every=0", "eval.baseline=false", "eval.per_type=false"],
                     node_configs=nodes, logs=logs)
    rec = _metrics(res.run_dir)[-1]
    assert len(rec["dropped"]) == 1
    d = rec["dropped"][0]
    assert d["client"] == f"client{victim:05d}" and d["where"] == f"node {100 + victim}"
    assert reason in d["reason"] and "module '" in d["reason"], d
    assert sum(g["clients"] for g in rec["groups"].values()) == 2
    assert torch.isfinite(torch.tensor(rec["train_loss"]))


def test_a_node_that_raises_is_dropped_with_its_error(tmp_path: Path) -> None:
    # Two nodes claim partition 1 is refused at discovery; a node of a partition outside the
    # run is ignored; a node without partition-id answers with an error.
    nodes = [{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 2}, {"partition-id": 3},
             {"partition-id": 1}, {"partition-id": 9}, {}]
    logs: list[str] = []
    res, _ = _flower(tmp_path, "e", ["rounds=1", "eval.every=0", "eval.baseline=false", "eval.per_type=false"],
                     node_configs=nodes, logs=logs)
    text = "\n".join(logs)
    assert "claims partition 1, already held by node 101" in text
    assert "partition-id 9 is outside" in text
    assert "no partition-id" in text
    assert "dropped" not in _metrics(res.run_dir)[-1]


def test_server_killed_mid_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    sets = [x for s in [*TINY, "rounds=3", "eval.every=2"] for x in ("--set", s)]
    full = tmp_path / "full"
    res = run_cli(["run", *sets, "--output", str(full), "--no-progress"])  # the in-process engine
    assert res.returncode == 0, res.stderr
    killed = tmp_path / "killed"
    # SIGKILL of the ServerApp after round 3's replies arrived, before they were aggregated.
    res = run_cli(["run", *sets, "--output", str(killed), "--engine", "flower-inprocess"],
                  faults_plan.seam_env("server-kill=3"))
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    assert load_checkpoint(killed / "checkpoints")["round"] == 2
    res = run_cli(["run", "--resume", str(killed), "--engine", "flower-inprocess"])
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _adapter(full), _adapter(killed)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert deterministic_view(_metrics(full)) == deterministic_view(_metrics(killed))


def test_cli_reports_a_failed_federation_with_exit_3(tmp_path: Path) -> None:
    # Every sampled client is rejected (non-finite lr makes no sense; use min_clients above the sample).
    res = run_cli(["run", *[x for s in [*TINY, "rounds=1", "min_clients=4"] for x in ("--set", s)],
                "--output", str(tmp_path / "x"), "--engine", "flower-inprocess"])
    assert res.returncode == 3, res.stderr[-2000:]
    assert "min_clients = 4" in res.stderr


def test_example_counts_are_checked_unless_the_node_has_its_own_data(tmp_path: Path) -> None:
    # A node on the run's partition that claims ten times its examples is dropped by name; a node
    # on a data set of its own (5 examples, not its partition's size) is taken at its count.
    faults_plan.install_node_faults()
    from flexlora.engines.federation import sample_round_clients

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"task": "echo", "instruction": "Repeat the word.", "input": f"w{i}",
                                       "output": f"w{i}", "id": f"e{i}"}) + "\n" for i in range(5)))
    liar, other = sample_round_clients(4, 3, 0, 1)[:2]
    nodes = [{"partition-id": i, **({"fault": "count@1"} if i == liar else {}),
              **({"data": str(own)} if i == other else {})} for i in range(4)]
    logs: list[str] = []
    res, _ = _flower(tmp_path, "c", ["rounds=1", "eval.every=0", "eval.baseline=false", "eval.per_type=false"],
                     node_configs=nodes, logs=logs)
    rec = _metrics(res.run_dir)[-1]
    held = json.loads((res.run_dir / "partition.json").read_text())["clients"][str(liar)]
    assert [d["client"] for d in rec["dropped"]] == [f"client{liar:05d}"]
    assert (f"claims {10 * len(held)} training examples, but partition {liar} of the run's data holds {len(held)}"
            in rec["dropped"][0]["reason"]), rec["dropped"]
    assert any(f"client {other} (" in m and "its own data" in m for m in logs), logs
    assert sum(g["clients"] for g in rec["groups"].values()) == 2


def test_a_node_whose_ranks_exceed_max_rank_is_ignored(tmp_path: Path) -> None:
    # max_rank 8 fits the run's own types; a node declaring rank 16 cannot be served and is left out
    # (the run goes on with the others), instead of stopping the ServerApp.
    nodes = [{"partition-id": 0, "ranks": "16"}, {"partition-id": 1}, {"partition-id": 2}, {"partition-id": 3}]
    logs: list[str] = []
    res, _ = _flower(tmp_path, "x", ["rounds=1", "eval.every=0", "eval.baseline=false", "eval.per_type=false",
                                     "lora.types=[[2, 4], [4, 8]]", "flexlora.max_rank=8",
                                     "flower.wait_for_nodes=0"],
                     node_configs=nodes, logs=logs)
    assert any("node 100 ignored: its type r16-16 does not fit the run" in m and "flexlora.max_rank = 8" in m for m in logs), logs
    ckpt = load_checkpoint(res.run_dir / "checkpoints")
    assert all(a[1] <= 8 and a[2] <= 8 for a in ckpt["assignment"])

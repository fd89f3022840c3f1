"""A new federated method is one class and one registration: a toy method defined here runs on
the in-process engine and on Flower's (in-process Grid) without any change to engine code.

The toy is a deliberately naive FlexLoRA: the server forms each client's dense update
``s_k B_k A_k``, averages them with data-size weights and redistributes by a dense SVD. It uses
every hook of the protocol (task tensors and metadata both ways, its own reply check, its own
fold, its own option section and checkpoint state), and it is an independent reference for the
real FlexLoRA's exact low-rank aggregation (Eckart-Young: the same best rank-r approximation).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_common import TINY

from flexlora.core.aggregators import GlobalState, ModuleState
from flexlora.core.lowrank import LowRankSVD, stable_seed
from flexlora.core.types import ClientUpdate, lora_scaling
from flexlora.engines.config import ConfigError, describe, load_config, to_toml
from flexlora.engines.rounds import deterministic_view
from flexlora.engines.simulation import Simulation
from flexlora.methods import (
    ClientContext,
    ClientReply,
    LoRAMethod,
    Method,
    MethodFold,
    ReplyError,
    pack_factors,
    register_method,
    unpack_factors,
    unregister_method,
)
from flexlora.settings import setting
from flexlora.training.client import ClientSpec, ClientTask

pytest.importorskip("flwr")

RUN = [*TINY, "eval.every=0", "eval.per_type=false", "eval.max_tasks=1", "eval.max_examples_per_task=2",
       "eval.max_new_tokens=2"]


@dataclass
class ToyOptions:
    """The toy's settings (``[toyflex]``)."""

    scale: float = setting(1.0, "Multiplies the averaged update (1 = the plain average).")


class ToyFlex(Method):
    """Dense FlexLoRA, written the obvious way."""

    name = "toyflex"
    Options = ToyOptions

    def __init__(self, options: ToyOptions, run: Any) -> None:
        super().__init__(options, run)
        self.folded = 0  # replies folded over the run: state of the method's own, checkpointed

    def plan(self, rnd: int, specs: Sequence[tuple[int, ClientSpec]]) -> list[tuple[dict, dict]]:
        out = []
        for _, spec in specs:
            meta: dict[str, Any] = {"toy-round": rnd}
            if self.state is None:
                meta["init_seed"] = stable_seed("init", self.run.seed, rnd)
                out.append(({}, meta))
            else:
                out.append((pack_factors(self.global_factors(spec.ranks), "init/"), meta))
        return out

    @classmethod
    def client_train(cls, ctx: ClientContext, task: ClientTask) -> ClientReply:
        reply = LoRAMethod.client_train(ctx, task)
        reply.meta["toy-seen"] = task.meta["toy-round"]  # metadata travels back too
        return reply

    def read_reply(self, task: ClientTask, reply: ClientReply) -> ClientUpdate:
        if reply.meta.get("toy-seen") != task.round:
            raise ReplyError(f"toy: the reply answers round {reply.meta.get('toy-seen')!r}, not {task.round}")
        factors = unpack_factors(reply.tensors)
        for m, (a, b) in factors.items():
            r = task.spec.ranks[m]
            if a.shape != (r, self.run.shapes[m][1]) or b.shape != (self.run.shapes[m][0], r):
                raise ReplyError(f"toy: module {m!r} has the wrong shapes")
        return ClientUpdate(factors, reply.num_examples, alpha=float(reply.meta["alpha"]))

    def begin_fold(self, rnd: int, tasks: Sequence[ClientTask]) -> MethodFold:
        return _ToyFold(self)

    def global_factors(self, ranks: Mapping[str, int]) -> dict:
        assert self.state is not None
        out = {}
        for m, r in ranks.items():
            svd = self.state.modules[m].svd
            s = lora_scaling(self.run.alpha, r, self.run.rslora)
            out[m] = (svd.V[:, :r].T.contiguous(), (svd.U[:, :r] * svd.S[:r]) / s)
        return out

    def checkpoint(self) -> dict[str, Any]:
        return {"toy_folded": self.folded}

    def restore(self, ckpt: Mapping[str, Any], where: str) -> None:
        self.folded = int(ckpt["toy_folded"])


class _ToyFold(MethodFold):
    def __init__(self, method: ToyFlex) -> None:
        self.method = method
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0

    def add(self, task: ClientTask, update: ClientUpdate) -> None:
        for m, (a, b) in update.factors.items():
            d = update.num_examples * update.scale(m) * (b.double() @ a.double())
            self.sums[m] = self.sums[m] + d if m in self.sums else d
        self.total += update.num_examples
        self.method.folded += 1

    def finish(self, check: Callable[[list[str]], None]) -> dict[str, Any]:
        mods = {}
        for m, total in self.sums.items():
            avg = self.method.options.scale * total / self.total
            U, S, Vh = torch.linalg.svd(avg, full_matrices=False)
            mods[m] = ModuleState(tuple(avg.shape), svd=LowRankSVD(U.float(), S.float(), Vh.T.float(), "dense"))
        state = GlobalState("toyflex", mods)
        check(state.nonfinite_modules())
        self.method.state = state
        return {"toy_folded": self.method.folded}


@pytest.fixture(autouse=True)
def toy_registered():
    register_method(ToyFlex)
    yield
    unregister_method("toyflex")


def _local(tmp_path: Path, name: str, *sets: str, resume: bool = False) -> Any:
    sim = Simulation(load_config(None, [*RUN, *sets]), tmp_path / name, resume=resume, progress=False,
                     log=lambda m: None)
    return sim, sim.run()


def test_the_toy_method_has_its_own_section_in_the_config() -> None:
    cfg = load_config(None, ["aggregator=toyflex", "toyflex.scale=0.5"])
    assert cfg.options().scale == 0.5
    assert "[toyflex]\nscale = 0.5" in to_toml(cfg)
    assert "toyflex.scale = 1.0\n    Multiplies the averaged update" in describe()
    with pytest.raises(ConfigError, match=r"unknown config key 'toyflex.scal'; did you mean 'scale'"):
        load_config(None, ["aggregator=toyflex", "toyflex.scal=2"])


def test_the_toy_method_runs_alike_on_the_local_and_the_flower_engine(tmp_path: Path) -> None:
    from flexlora.engines.flower.inprocess import run_inprocess

    sets = ["aggregator=toyflex", "rounds=2"]
    _, local = _local(tmp_path, "local", *sets)
    flower = run_inprocess(load_config(None, [*RUN, *sets]), tmp_path / "flower", log=lambda m: None)
    assert deterministic_view(local.records) == deterministic_view(flower.records)
    assert [r["toy_folded"] for r in local.records if "toy_folded" in r] == [3, 6]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "local" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_naive_toy_agrees_with_the_exact_flexlora(tmp_path: Path) -> None:
    # Round 1: the same shared fresh start, the same training, so the same replies; the global
    # updates then differ only by the rounding of two exact ways to average them.
    toy, toy_res = _local(tmp_path, "toy", "aggregator=toyflex", "rounds=1")
    flex, flex_res = _local(tmp_path, "flex", "aggregator=flexlora", "rounds=1")
    assert toy_res.records[-1]["train_loss"] == flex_res.records[-1]["train_loss"]
    for m in flex.shapes:
        # FlexLoRA keeps the top max_rank triplets (the largest client rank), the toy all of them.
        k = flex.state.modules[m].rank
        assert k == flex.method.run.max_rank or k == min(flex.shapes[m])
        svd = toy.state.modules[m].svd
        got = ((svd.U[:, :k] * svd.S[:k]) @ svd.V[:, :k].T).double()
        want = flex.state.dense(m).double()
        assert torch.linalg.matrix_norm(got - want) <= 1e-5 * torch.linalg.matrix_norm(want), m
    # What each client is sent next: the best approximation at its ranks, the same either way.
    spec = flex.client_spec(0)
    for m, (a, b) in toy.method.global_factors(spec.ranks).items():
        fa, fb = flex.method.global_factors(spec.ranks)[m]
        torch.testing.assert_close(b.double() @ a.double(), fb.double() @ fa.double(), rtol=1e-4, atol=1e-7)


def test_the_toy_method_resumes_with_its_own_state(tmp_path: Path) -> None:
    _, whole = _local(tmp_path, "whole", "aggregator=toyflex", "rounds=2")
    _local(tmp_path, "split", "aggregator=toyflex", "rounds=1")
    sim, res = _local(tmp_path, "split", "aggregator=toyflex", "rounds=2", resume=True)
    assert sim.method.folded == 6  # restored from the checkpoint (3), then round 2's replies
    # Round 1 of the split run was its last, so it was evaluated; round 2 must match exactly.
    assert deterministic_view(res.records)[-1] == deterministic_view(whole.records)[-1]


def test_a_toy_reply_failing_its_own_check_is_dropped_by_name(tmp_path: Path) -> None:
    from flexlora.engines import faults

    sim = Simulation(load_config(None, [*RUN, "aggregator=toyflex", "rounds=1", "min_clients=1"]),
                     tmp_path / "r", progress=False, log=lambda m: None)
    first = {}

    def lie(rnd: int, done: int) -> None:
        first.setdefault("done", done)

    faults.set_hook("local.client_done", lie)
    tasks = sim.plan_round(1)
    outcomes = []
    from flexlora.engines.simulation import LocalEngine

    for o in LocalEngine(progress=False).train_round(sim, 1, tasks):
        if not outcomes:
            o.reply.meta["toy-seen"] = 99  # the first reply claims another round
        outcomes.append(o)
    rec = sim.aggregate_round(1, outcomes)
    assert [d["client"] for d in rec["dropped"]] == [tasks[0].spec.client_id]
    assert "toy: the reply answers round 99, not 1" in rec["dropped"][0]["reason"]
    assert rec["toy_folded"] == len(tasks) - 1 and first["done"] == 1
    shutil.rmtree(tmp_path / "r")


def test_the_readme_walk_through_method_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Adding a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    try:
        sim, res = _local(tmp_path, "mine", "aggregator=mymethod", "mymethod.boost=2.0", "rounds=2")
        assert sim.method.options.boost == 2.0 and res.records[-1]["round"] == 2
        # Round 2's clients start from twice the distributed global: boost reached the clients.
        task = sim.plan_round(3)[0]
        sent = unpack_factors(task.tensors, "init/")
        plain = LoRAMethod.initial_factors(sim.method, sim.client_spec(task.client))
        m = next(iter(sent))
        torch.testing.assert_close(sent[m][1], 2.0 * plain[m][1])
        torch.testing.assert_close(sent[m][0], plain[m][0])
    finally:
        unregister_method("mymethod")

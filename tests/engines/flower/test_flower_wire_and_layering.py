"""The wire format decodes what it encodes and rejects garbage by name; flwr stays inside the engine."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import flexlora
from flexlora.engines.flower.wire import (
    WIRE_VERSION,
    WireError,
    content_task,
    decode_reply,
    record_nbytes,
    record_to_tensors,
    reply_content,
    task_content,
    tensors_to_record,
)
from flexlora.methods import ClientReply, ReplyError, pack_factors, tensor_bytes, unpack_factors
from flexlora.training.client import ClientSpec, ClientTask, factor_bytes

PKG = Path(flexlora.__file__).resolve().parent
TINY_SETS = ["model=builtin:tiny-llama", "num_clients=4", "data_options.max_per_task=4", "rounds=1"]


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj": (torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)),
            "layers.0.up_proj": (torch.randn(2, 7, generator=g), torch.randn(9, 2, generator=g))}


def _reply(seed: int = 0, **kw) -> ClientReply:
    return ClientReply(pack_factors(_factors(seed)), num_examples=kw.pop("num_examples", 3),
                       meta={"alpha": 16.0, "rslora": False, **kw.pop("meta", {})},
                       train_loss=kw.pop("train_loss", 1.0), steps=kw.pop("steps", 1))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    """A tiny run whose method reads the replies (the checks of factors moved from the wire to it)."""
    from flexlora.engines.config import load_config
    from flexlora.engines.federation import Federation

    return Federation(load_config(None, TINY_SETS), tmp_path_factory.mktemp("wire") / "probe", progress=False,
                      log=lambda m: None)


def test_fp32_round_trip_is_exact_and_bytes_match_factor_bytes() -> None:
    f = _factors()
    rec = tensors_to_record(pack_factors(f))
    tensors, nbytes = record_to_tensors(rec)
    back = unpack_factors(tensors)
    assert back.keys() == f.keys()
    for m in f:
        assert torch.equal(back[m][0], f[m][0]) and torch.equal(back[m][1], f[m][1])
    assert record_nbytes(rec) == nbytes == factor_bytes(f) == tensor_bytes(pack_factors(f)) \
        == 4 * (3 * 7 + 5 * 3 + 2 * 7 + 9 * 2)


def test_fp16_and_bf16_are_cast() -> None:
    f = {m: (a.to(torch.bfloat16), b.to(torch.bfloat16)) for m, (a, b) in _factors().items()}
    rec32 = tensors_to_record(pack_factors(f))  # bf16 cannot travel: cast to fp32 exactly
    assert all(np.dtype(a.dtype) == np.float32 for a in rec32.values())
    rec16 = tensors_to_record(pack_factors(_factors()), "float16")
    assert record_nbytes(rec16) * 2 == record_nbytes(tensors_to_record(pack_factors(_factors())))
    tensors, nbytes = record_to_tensors(rec16)
    assert nbytes == record_nbytes(rec16)
    back = unpack_factors(tensors)
    assert back["layers.0.q_proj"][0].dtype == torch.float32
    assert torch.allclose(back["layers.0.q_proj"][0], _factors()["layers.0.q_proj"][0], atol=1e-2)


def test_task_and_reply_round_trip() -> None:
    spec = ClientSpec("client00003", {"layers.0.q_proj": 3, "layers.0.up_proj": 2}, 16.0, "type2")
    task = ClientTask(round=4, client=3, spec=spec, seed=123, tensors=pack_factors(_factors(), "init/"),
                      meta={"hetlora": [1e-3, 0.99]})
    got, method, toml, dtype = content_task(task_content(task, "hetlora", "rounds = 4\n"))
    assert (got.round, got.client, got.seed, got.meta.get("hetlora"), got.spec) == (4, 3, 123, [1e-3, 0.99], spec)
    assert method == "hetlora" and toml == "rounds = 4\n" and dtype == "float32"
    assert unpack_factors(got.tensors, "base/") == {}
    assert torch.equal(unpack_factors(got.tensors, "init/")["layers.0.up_proj"][1], _factors()["layers.0.up_proj"][1])
    assert got.meta.get("init_seed") is None
    rep = ClientReply(pack_factors(_factors(1)), num_examples=11, meta={"alpha": 16.0, "client_id": "client00003"},
                      train_loss=1.25, steps=7)
    r, up = decode_reply(reply_content(rep))
    assert (r.num_examples, r.meta["alpha"], r.meta["client_id"], r.train_loss, r.steps, up) == (
        11, 16.0, "client00003", 1.25, 7, factor_bytes(_factors(1)))
    assert all(torch.equal(r.tensors[k], rep.tensors[k]) for k in rep.tensors) and r.tensors.keys() == rep.tensors.keys()


def test_a_fresh_task_carries_its_round_init_seed_and_no_factors() -> None:
    spec = ClientSpec("client00001", {"layers.0.q_proj": 3}, 16.0, "type1")
    task = ClientTask(round=1, client=1, spec=spec, seed=5, meta={"init_seed": 2**31 - 1})
    content = task_content(task, "fedit", "")
    assert not any(len(rec) for rec in content.array_records.values())  # drawn by the node, not sent
    assert content_task(content)[0].meta["init_seed"] == 2**31 - 1
    meta = json.loads(content.config_records["task"]["meta"])
    del meta["init_seed"]  # lora.init = "per-client": no shared fresh adapter
    content.config_records["task"]["meta"] = json.dumps(meta)
    assert content_task(content)[0].meta.get("init_seed") is None


@pytest.mark.parametrize("bad", [-7, 2.5, "x", True])
def test_a_bad_init_seed_is_refused_by_name(fed, bad) -> None:
    """The old wire refused an init seed that is not a seed (``init-seed`` < -1) by name; the seed
    now travels in the method's metadata, and the client that reads it must refuse it by name."""
    task = fed.plan_round(1)[0]
    assert "init_seed" in task.meta and not task.tensors
    task.meta["init_seed"] = bad
    got = content_task(task_content(task, fed.method.name, ""))[0]
    with pytest.raises((ValueError, TypeError), match="init.seed"):
        fed.train_client(got)


def test_a_task_of_another_wire_version_is_refused_by_name() -> None:
    spec = ClientSpec("client00001", {"layers.0.q_proj": 3}, 16.0, "type1")
    content = task_content(ClientTask(round=1, client=1, spec=spec, seed=5), "fedit", "")
    for version in (WIRE_VERSION - 1, None):
        if version is None:
            del content.config_records["task"]["wire-version"]  # a server from before the version field
        else:
            content.config_records["task"]["wire-version"] = version
        with pytest.raises(WireError, match="wire version"):
            content_task(content)


def _meta(c: RecordDict, **kw) -> None:
    meta = json.loads(c.config_records["meta"]["meta"])
    c.config_records["meta"]["meta"] = json.dumps({**meta, **kw})


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.array_records.pop("tensors"), "without its 'tensors'"),
    (lambda c: c.metric_records["metrics"].pop("num-examples"), "missing field 'num-examples'"),
    (lambda c: c.array_records["tensors"].__setitem__("layers.0.q_proj::A", Array(np.zeros((3, 7), np.int64))),
     "floating-point"),
    (lambda c: c.config_records["meta"].__setitem__("meta", "{not json"), "'meta' is not JSON"),
    (lambda c: c.config_records["meta"].__setitem__("meta", "[1, 2]"), "must be a JSON object"),
])
def test_malformed_replies_raise_wire_errors(mutate, match: str) -> None:
    content = reply_content(_reply())
    mutate(content)
    with pytest.raises(WireError, match=match):
        decode_reply(content)


@pytest.mark.parametrize("mutate,match", [
    (lambda c, m: c.array_records["tensors"].__setitem__("junk", Array(np.zeros((2, 2), np.float32))), "junk"),
    (lambda c, m: c.array_records["tensors"].pop(f"{m}::B"), "only factor A"),
    (lambda c, m: c.array_records["tensors"].__setitem__(f"{m}::A", Array(np.zeros(3, np.float32))),
     "2-D floating-point factor"),
    (lambda c, m: _meta(c, alpha="sixteen"), "alpha 'sixteen'"),
])
def test_malformed_factors_are_refused_by_the_method(fed, mutate, match: str) -> None:
    """What the factors must be (both of a module, 2-D, the client's alpha) is the method's check:
    the reply decodes, and ``read_reply`` refuses it by name (the round drops it)."""
    task = fed.plan_round(1)[0]
    good = ClientReply(pack_factors({m: (torch.zeros(task.spec.ranks[m], i), torch.zeros(o, task.spec.ranks[m]))
                                     for m, (o, i) in fed.shapes.items()}),
                       num_examples=fed.partition.num_examples(task.client),
                       meta={"alpha": float(task.spec.alpha), "rslora": False, "client_id": task.spec.client_id},
                       train_loss=1.0, steps=1)
    fed.method.read_reply(task, decode_reply(reply_content(good))[0])  # guard: the unmutated reply is read
    content = reply_content(good)
    mutate(content, next(iter(fed.shapes)))
    reply, _ = decode_reply(content)
    with pytest.raises(ReplyError, match=match):
        fed.method.read_reply(task, reply)


def test_garbage_array_bytes_are_a_wire_error() -> None:
    rec = ArrayRecord()
    rec["m::A"] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"\x00garbage")
    rec["m::B"] = Array(np.zeros((2, 2), np.float32))
    with pytest.raises(WireError, match="cannot be read"):
        record_to_tensors(rec)
    with pytest.raises(WireError, match="'task' ConfigRecord"):
        content_task(RecordDict({"x": ConfigRecord({"a": 1})}))
    with pytest.raises(WireError, match="metrics"):
        decode_reply(RecordDict({"tensors": tensors_to_record(pack_factors(_factors())), "m": MetricRecord({"a": 1})}))


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_only_the_flower_engine_imports_flwr_and_the_federation_imports_no_engine() -> None:
    flower_dir = PKG / "engines" / "flower"
    for path in PKG.rglob("*.py"):
        names = _imports(path)
        if flower_dir not in path.parents:
            assert not any(n.split(".")[0] == "flwr" for n in names), f"{path} imports flwr"
    fed = _imports(PKG / "engines" / "federation.py")
    assert not any(n.startswith(("flexlora.engines.simulation", "flexlora.engines.flower", "flexlora.cli"))
                   for n in fed), fed
    # guard: the check sees flwr imports where they are
    assert any(n.startswith("flwr") for n in _imports(flower_dir / "strategy.py"))


def test_reply_bytes_are_counted_from_the_data_not_the_peers_metadata() -> None:
    """A peer's Array metadata (dtype, shape) is not trusted: the upload is counted from the
    decoded arrays, so a lying header neither crashes the server nor skews the byte counts."""
    rep = _reply(1)
    for meta in ({"dtype": "bogus"}, {"shape": (-1000000,)}, {"dtype": "float64", "shape": (10**6, 10**3)}):
        content = reply_content(rep)
        rec = content.array_records["tensors"]
        good = rec["layers.0.q_proj::A"]
        fields = {"dtype": good.dtype, "shape": tuple(good.shape), **meta}
        rec["layers.0.q_proj::A"] = Array(stype=good.stype, data=good.data, **fields)
        r, up = decode_reply(content)
        assert up == factor_bytes(_factors(1)), meta
        assert torch.equal(unpack_factors(r.tensors)["layers.0.q_proj"][0], _factors(1)["layers.0.q_proj"][0])


@pytest.mark.parametrize("field,value,match", [
    ("train-loss", float("inf"), "train-loss is inf"),
    ("train-loss", float("nan"), "train-loss is nan"),
    ("train-loss", -1.0, "train-loss is -1.0"),
    ("steps", -5, "steps is -5"),
])
def test_impossible_reply_metrics_are_wire_errors(field: str, value, match: str) -> None:
    content = reply_content(_reply())
    content.metric_records["metrics"][field] = value
    with pytest.raises(WireError, match=match):
        decode_reply(content)


def test_whole_number_refuses_what_int_would_truncate() -> None:
    from flexlora.engines.flower.wire import whole_number

    assert [whole_number(v) for v in (3, 3.0, "3", " 12 ", -1)] == [3, 3, 3, 12, -1]
    for bad in (2.7, True, False, float("inf"), float("nan"), "2.5", "x", None, [1]):
        with pytest.raises((ValueError, TypeError)):
            whole_number(bad)


def test_node_side_capabilities_refuse_bad_values() -> None:
    from flexlora.engines.flower.node import NodeError, capabilities

    assert capabilities({"partition-id": 2, "budget": "2e6"}) == {"partition-id": 2, "budget": 2e6,
                                                                   "budget-unit": "params", "own-data": False}
    assert capabilities({"partition-id": 1, "data": "/d/mine.jsonl"})["own-data"] is True
    assert capabilities({"partition-id": 1, "data": "  "})["own-data"] is False  # as node_examples reads it
    for cfg, match in (({"partition-id": 2.7}, "whole number"), ({"partition-id": True}, "whole number"),
                       ({"partition-id": 0, "budget": "12GB"}, "budget must be a positive number"),
                       ({"partition-id": 0, "budget": -5}, "budget must be a positive number"),
                       ({"partition-id": 0, "budget": "nan"}, "budget must be a positive number")):
        with pytest.raises(NodeError, match=match):
            capabilities(cfg)


def test_server_side_capabilities_from_a_peer_that_skipped_the_node_checks(fed) -> None:
    """A peer's capability record is parsed defensively: every bad value is a WireError (the node is
    ignored with a warning), never a crash of the ServerApp, and a budget error names the partition."""
    from flexlora.engines.flower.strategy import FlexLoRAStrategy

    strategy = FlexLoRAStrategy(fed, log=lambda m: None)
    assert strategy._resolve(7, ConfigRecord({"partition-id": 2}))[0] == 2
    for caps, match in (({"partition-id": float("inf")}, "whole-number partition-id"),
                        ({"partition-id": 2.7}, "whole-number partition-id"),
                        ({"partition-id": True}, "whole-number partition-id"),
                        ({"partition-id": 1, "budget": [1.0, 2.0]}, "budget .* must be a positive number"),
                        ({"partition-id": 1, "budget": float("nan")}, "must be a positive number"),
                        ({"partition-id": 3, "budget": 5.0}, "^partition 3: budget 5")):
        with pytest.raises(WireError, match=match):
            strategy._resolve(7, ConfigRecord(caps))

"""Atomic run checkpoints: everything needed to resume a run exactly.

A checkpoint is one ``torch.save`` file holding plain values and tensors only (it is loaded with
``weights_only=True``, so a checkpoint cannot run code). It is written to a temporary file in the
same directory, flushed to disk, and renamed over the previous one, so a crash at any moment
leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from flexlora._atomic import atomic_open, atomic_write_text
from flexlora.data import JSONL_FIELD_DEFAULTS
from flexlora.methods.privacy import PrivacyOptions

__all__ = ["CheckpointError", "atomic_open", "atomic_write_text", "config_fingerprint", "load_checkpoint",
           "run_fingerprint", "run_lock", "save_checkpoint"]

FORMAT_VERSION = 1
LATEST = "latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or belongs to a different run configuration."""


def config_fingerprint(config: dict[str, Any], *, ignore: tuple[str, ...] = ("rounds",)) -> str:
    """sha256 of the canonical JSON of ``config`` without the keys in ``ignore``.

    ``rounds`` is ignored so that a finished run can be resumed with more rounds.
    """
    clean = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(ckpt_dir: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as ``ckpt_dir/latest.pt`` and return its path."""
    path = Path(ckpt_dir) / LATEST
    with atomic_open(path) as f:
        torch.save({"format_version": FORMAT_VERSION, **payload}, f)
    return path


def load_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Read ``ckpt_dir/latest.pt``.

    Raises
    ------
    CheckpointError
        When it is missing, unreadable (truncated or corrupted), or of an unknown format.
    """
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; the run has not finished a round yet (start it again without --resume)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupted archives
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: {exc}); "
            "delete it to restart the run from scratch"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has an unknown format (expected version {FORMAT_VERSION})")
    return payload


# Keys added after runs were first checkpointed, with their defaults: a key at its default is
# left out of the fingerprint, so that a run checkpointed before the key existed still resumes.
_LATER_KEYS: dict[tuple[str, str], Any] = {
    ("lora", "rslora"): False,
    ("lora", "init"): "shared",
    **{("data_options", k): v for k, v in JSONL_FIELD_DEFAULTS.items()},
    ("eval", "data"): "",
    ("eval", "stem"): False,
    **{("eval", k): v for k, v in JSONL_FIELD_DEFAULTS.items()},
    **{("privacy", f.name): f.default for f in dataclasses.fields(PrivacyOptions)},
}
# Sections added later: left out of the fingerprint when every key of theirs is at its default.
_LATER_SECTIONS = ("privacy",)


def run_fingerprint(cfg: Any) -> str:
    """The identity of a run that a checkpoint must match to be resumed.

    Everything but ``rounds`` and the [flower] settings, taken over the config layout from before
    the methods had their own sections (:meth:`flexlora.methods.Method.legacy_config`), so that
    every checkpoint and benchmark row recorded earlier keeps its fingerprint; keys added to the
    config later (such as ``lora.rslora``) count only when they differ from their default.
    """
    from flexlora.methods import method_class

    d = cfg.to_dict()
    for name in cfg.method_options:
        d.pop(name, None)
    legacy = dict(method_class(cfg.aggregator).legacy_config(cfg.method_options))
    d["aggregator_options"] = legacy.pop("aggregator_options", {})
    d["train"] = {**d["train"], **legacy.pop("train", {})}
    d.update(legacy)
    for (section, key), default in _LATER_KEYS.items():
        if section in d and key in d[section] and d[section][key] == default:
            d[section] = {k: v for k, v in d[section].items() if k != key}
    for section in _LATER_SECTIONS:
        if d.get(section) == {}:
            del d[section]
    return config_fingerprint(d, ignore=("rounds", "flower"))


def checkpoint_payload(fed: Any, rnd: int) -> dict[str, Any]:
    """Everything :func:`restore_run` needs to continue ``fed`` after round ``rnd``: the global
    adapter, the method's own state, the rank assignment, the records and the RNG states."""
    py_version, py_state, py_gauss = random.getstate()
    return {
        "round": rnd,
        "fingerprint": fed.fingerprint,
        "config": fed.cfg.to_dict(),
        "global_state": fed.state.state_dict() if fed.state is not None else None,
        "assignment": [list(a) for a in fed.assignment()],
        **fed.method.checkpoint(),
        "partition_hash": fed.partition.manifest()["hash"],
        "records": fed.records,
        "rng": {"torch": torch.get_rng_state(), "python": list(py_state), "python_version": py_version,
                "python_gauss": py_gauss},
    }


def restore_run(fed: Any) -> list[tuple[str, int, int, float]]:
    """Load ``fed``'s latest checkpoint into it (global adapter, method state, records, RNG
    states, the round to start from, the clients' types); returns the checkpoint's rank assignment.

    Raises
    ------
    CheckpointError
        When the checkpoint is missing, malformed, from another configuration or data, or does
        not fit the model; the message says how to go on.
    """
    from flexlora.core.aggregators import GlobalState
    from flexlora.methods import StateError

    where = fed.run_dir / "checkpoints" / LATEST
    if fed.read_only and not where.is_file():
        raise CheckpointError(f"{fed.run_dir} has no checkpoint yet (no round has finished), so there is no "
                              "global adapter to evaluate or export; run it first (flexlora run --resume "
                              "continues a run that has one)")
    ckpt = load_checkpoint(fed.run_dir / "checkpoints")
    missing = [k for k in ("round", "fingerprint", "partition_hash", "assignment", "global_state", "records",
                           "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {where} is malformed (no {', '.join(missing)}); delete it to restart "
                              "the run")
    done = ckpt["round"]
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise CheckpointError(f"checkpoint {where} is malformed (round {done!r}); delete it to restart the run")
    if fed.read_only and done == 0:
        raise CheckpointError(f"{fed.run_dir} has finished no round yet (its checkpoint is of round 0), so there "
                              "is no global adapter to evaluate or export; continue it with flexlora run --resume")
    if not isinstance(ckpt["records"], list) or not all(isinstance(r, dict) for r in ckpt["records"]):
        raise CheckpointError(f"checkpoint {where} is malformed (its records are not a list of rounds); delete "
                              "it to restart the run")
    cfg = fed.cfg
    if done > cfg.rounds:
        raise CheckpointError(f"{fed.run_dir} has already run {done} rounds, more than rounds = {cfg.rounds}; "
                              f"resume with --set rounds={done} or more")
    if ckpt["fingerprint"] != fed.fingerprint:
        # min_clients only decides whether a round is accepted, never what it computes: after
        # nodes were lost a run may continue with fewer. It is part of the fingerprint (older
        # checkpoints hold it), so a change of it alone is recognised here.
        then = (ckpt.get("config") or {}).get("min_clients") if isinstance(ckpt.get("config"), dict) else None
        if (isinstance(then, int) and not isinstance(then, bool) and then != cfg.min_clients
                and run_fingerprint(dataclasses.replace(cfg, min_clients=then)) == ckpt["fingerprint"]):
            fed.log(f"min_clients changed from {then} to {cfg.min_clients} for the rounds left")
        else:
            raise CheckpointError(
                f"the checkpoint in {fed.run_dir} was written with a different configuration; resume with the "
                "run's own config.toml (only `rounds`, `min_clients` and the [flower] settings may change)"
            )
    if ckpt["partition_hash"] != fed.partition.manifest()["hash"]:
        raise CheckpointError("the data partition differs from the checkpoint's (did the data change?)")
    try:
        assignment = [(str(a[0]), int(a[1]), int(a[2]), float(a[3])) for a in ckpt["assignment"]]
        fed.state = GlobalState.from_state_dict(ckpt["global_state"]) if ckpt["global_state"] is not None else None
        fed.records = list(ckpt["records"])
        fed.method.restore(ckpt, str(where))
        fed.start_round = int(ckpt["round"]) + 1
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    except StateError as exc:
        raise CheckpointError(str(exc)) from exc
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {fed.run_dir / 'checkpoints'} is malformed ({exc!r}); delete it to restart the run"
        ) from exc
    if fed.state is not None:
        if fed.state.shapes != fed.shapes:
            odd = sorted(set(fed.state.shapes.items()) ^ set(fed.shapes.items()))[:3]
            raise CheckpointError(f"checkpoint {where}: its global adapter does not fit model {cfg.model!r} "
                                  f"(modules or shapes differ: {odd}); delete it to restart the run")
        bad = fed.state.nonfinite_modules()
        if bad:
            raise CheckpointError(f"checkpoint {where}: its global adapter holds NaN or Inf in {bad[:3]}; delete "
                                  "it to restart the run")
    if len(assignment) != fed.num_clients:
        raise CheckpointError("the checkpoint's rank assignment has a different number of clients")
    fed.log(f"{'opened' if fed.read_only else 'resuming'} {fed.run_dir} {'at' if fed.read_only else 'after'} "
            f"round {ckpt['round']}")
    return assignment


def run_lock(run_dir: Path) -> Any:
    """Hold ``run_dir/.lock`` exclusively (``flock``) while this process writes the run; the
    open file is returned and the lock released when it is closed (or the process ends).

    Raises
    ------
    CheckpointError
        Another process (or another open run in this one) is writing this directory.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not guarded against a second writer
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise CheckpointError(f"{run_dir} is being written by another flexlora run right now; wait for it "
                              "to finish, or choose another --output") from None
    return fh

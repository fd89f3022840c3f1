"""A real Flower deployment on 127.0.0.1 (SuperLink, SuperNodes and `flwr run .` as separate
processes, through scripts/flower-loopback.sh): the same adapter and metrics as the in-process
engine, and a node whose ClientApp is SIGKILLed mid-round is dropped while the run goes on.

Slow (each round starts a ClientApp process per node); every process is stopped by PID by the
script's trap, which the test triggers with SIGTERM if the run overruns its time bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import faults_plan
import pytest
import torch
from engine_common import TINY
from safetensors.torch import load_file

from flexlora.engines.config import load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.simulation import Simulation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def _deploy(out: Path, node_configs: list[str], sets: list[str], plan: str | None, port: int,
            limit: float = 420) -> subprocess.CompletedProcess:
    """Run the deployment; ``plan``: the test seam's fault plan every process of it installs
    (tests/seam/faults_plan.py), or None."""
    set_value = ";".join(s.replace('"', '\\"') for s in sets)
    cmd = ["bash", str(ROOT / "scripts" / "flower-loopback.sh"), str(out), *node_configs, "--",
           f'set="{set_value}"']
    env = {**os.environ, "PY": str(Path(os.sys.executable)), "FLEXLORA_BASE_PORT": str(port),
           "TIMEOUT": str(int(limit - 20))}
    if plan:
        env = faults_plan.seam_env(plan, env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap stops its SuperLink and SuperNodes by PID
        stdout, _ = proc.communicate(timeout=30)
        pytest.fail(f"the deployment did not finish within {limit}s:\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def _metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _quoted(sets: list[str]) -> list[str]:
    # TOML strings for the values that are bare words (model names).
    return [s if not s.startswith("model=") else f"model='{s.split('=', 1)[1]}'" for s in sets]


def test_serverapp_killed_then_resumed_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    """The ServerApp process is SIGKILLed during round 2 and the run resumed from round 1's
    checkpoint on the same SuperLink and SuperNodes: the adapter and the metrics (evaluation
    included) equal those of an uninterrupted in-process run. This is also CI's proof that a
    deployment gives the in-process engine's numbers (the plain parity test below is `long`)."""
    import time

    import torch as _torch

    # Two rounds suffice: the ServerApp is killed during round 2, after round 1's checkpoint.
    sets = [*TINY, "rounds=2"]
    local = Simulation(load_config(None, sets), tmp_path / "local", progress=False, log=lambda m: None)
    local.run()
    out, port = tmp_path / "killed", 19590
    set_value = ";".join(s.replace('"', '\\"') for s in _quoted(sets))
    cmd = ["bash", str(ROOT / "scripts" / "flower-loopback.sh"), str(out), *[f"partition-id={i}" for i in range(4)],
           "--", f'set="{set_value}"']
    env = {**os.environ, "PY": str(Path(os.sys.executable)), "FLEXLORA_BASE_PORT": str(port), "TIMEOUT": "300",
           "RESUME_ON_FAILURE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # SIGKILL the SuperLink's ServerApp process once round 1 is checkpointed (round 2 is running).
        ckpt, deadline, killed = out / "checkpoints" / "latest.pt", time.monotonic() + 300, False
        while time.monotonic() < deadline and not killed:
            if ckpt.is_file() and _torch.load(ckpt, weights_only=True)["round"] >= 1:
                ps = subprocess.run(["pgrep", "-f", f"flwr-serverapp .*127.0.0.1:{port}"], capture_output=True,
                                    text=True)
                for pid in ps.stdout.split():
                    os.kill(int(pid), signal.SIGKILL)
                    killed = True
            time.sleep(0.3)
        assert killed, "the ServerApp was never seen running round 2"
        stdout, _ = proc.communicate(timeout=600)
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        raise
    assert proc.returncode == 0, stdout[-4000:]
    assert "resuming it from its checkpoint" in stdout
    a, b = _adapter(local.run_dir), _adapter(out)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert deterministic_view(_metrics(local.run_dir)) == deterministic_view(_metrics(out))


@pytest.mark.long
def test_loopback_deployment_matches_the_in_process_engine(tmp_path: Path) -> None:
    """An uninterrupted deployment gives the in-process engine's adapter and metrics (CI leaves it
    out: the ServerApp-kill test above proves the same with a kill and a resume in between)."""
    _deployed_equals_local(tmp_path, [*TINY, "rounds=2"], port=19290)


def _deployed_equals_local(tmp_path: Path, sets: list[str], port: int) -> Path:
    """Run ``sets`` in process and on a 4-node loopback deployment; assert the same nonzero adapter
    (within 1e-5) and the same metrics; return the deployment's run directory."""
    local = Simulation(load_config(None, sets), tmp_path / "local", progress=False, log=lambda m: None)
    local.run()
    out = tmp_path / "deployed"
    res = _deploy(out, [f"partition-id={i}" for i in range(4)], _quoted(sets), None, port=port)
    assert res.returncode == 0, res.stdout[-4000:]
    a, b = _adapter(local.run_dir), _adapter(out)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(t.abs().max()) for t in a.values()) > 0
    assert deterministic_view(_metrics(local.run_dir)) == deterministic_view(_metrics(out))
    return out


def test_slora_deployment_matches_the_in_process_engine(tmp_path: Path) -> None:
    """SLoRA across processes: round 1 is the sparse stage (masks drawn on the nodes from the
    task's seed, sparse values on the wire), round 2 starts every node from the stage-1 change at
    its own ranks; the adapter and metrics equal the in-process engine's."""
    sets = [*TINY, "rounds=2", "aggregator=slora", "slora.stage1_rounds=1", "slora.then=flexlora",
            "eval.every=0", "eval.baseline=false", "eval.per_type=false"]
    out = _deployed_equals_local(tmp_path, sets, port=19790)
    assert [r.get("slora_stage") for r in _metrics(out) if r["round"] > 0] == [1, 2]


def test_a_poisoning_node_is_bounded_as_in_process(tmp_path: Path) -> None:
    """One SuperNode replies -1000x its update in every round (the test seam's ``scale`` fault);
    with privacy.clip_norm the deployment's global equals the in-process run under the same
    poisoning, and the poisoner is recorded as clipped."""
    import faults_plan as plan

    from flexlora.engines import faults as seam

    sets = [*TINY, "rounds=2", "privacy.clip_norm=0.05", "eval.every=0", "eval.baseline=false",
            "eval.per_type=false"]
    seam.clear_hooks()
    plan.install_local_poison(0, -1000.0)
    try:
        local = Simulation(load_config(None, sets), tmp_path / "local", progress=False, log=lambda m: None)
        local.run()
    finally:
        seam.clear_hooks()
    out = tmp_path / "deployed"
    nodes = [f"partition-id={i}" + (" fault='scale@*:-1000'" if i == 0 else "") for i in range(4)]
    res = _deploy(out, nodes, _quoted(sets), "node-faults", port=19890)
    assert res.returncode == 0, res.stdout[-4000:]
    a, b = _adapter(local.run_dir), _adapter(out)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    mine, theirs = deterministic_view(_metrics(local.run_dir)), deterministic_view(_metrics(out))
    assert mine == theirs
    assert all(r["clip"]["client00000"]["clipped"] for r in _metrics(out) if "client00000" in r.get("clip", {}))
    assert any("client00000" in r.get("clip", {}) for r in _metrics(out))


def test_tls_and_supernode_authentication(tmp_path: Path) -> None:
    """Over Flower's TLS (a CA and server certificate made for this test) with SuperNode
    authentication on: the registered node trains, the unregistered one is refused, and a
    plaintext client cannot talk to the SuperLink."""
    out = tmp_path / "secure"
    sets = ["model='builtin:tiny-llama'", "rounds=1", "num_clients=2", "clients_per_round=2", "local_steps=2",
            "data_options.max_per_task=4", "eval.max_tasks=1", "eval.max_examples_per_task=2",
            "eval.max_new_tokens=4", "eval.per_type=false", "flower.wait_for_nodes=15"]
    set_value = ";".join(s.replace('"', '\\"') for s in sets)
    cmd = ["bash", str(ROOT / "scripts" / "flower-secure-loopback.sh"), str(out), "--", f'set="{set_value}"']
    env = {**os.environ, "PY": str(Path(os.sys.executable)), "FLEXLORA_BASE_PORT": "19490", "TIMEOUT": "240"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=330)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
        pytest.fail(f"the secure deployment did not finish in time:\n{stdout[-3000:]}")
    assert proc.returncode == 0, stdout[-4000:]
    logs = Path(f"{out}.logs")
    assert "--insecure" not in (ROOT / "scripts" / "flower-secure-loopback.sh").read_text()
    nodes = json.loads((logs / "supernodes.json").read_text())["nodes"]
    assert len(nodes) == 1 and nodes[0]["status"] == "online"  # only the registered node joined
    intruder = (logs / "supernode-intruder.log").read_text()
    assert "Failed to activate SuperNode" in intruder or "Exit Code: 305" in intruder, intruder[-2000:]
    plaintext = (logs / "plaintext.log").read_text()
    assert not plaintext.rstrip().endswith("exit 0"), plaintext
    rec = _metrics(out)[-1]
    assert [d["client"] for d in rec["dropped"]] == ["client00001"]  # the intruder's partition
    assert "client00000" in rec["bytes"] and rec["bytes"]["client00000"]["up"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_killed_and_slow_nodes_are_dropped_and_the_run_continues(tmp_path: Path) -> None:
    """Round 2 samples all four clients: one node's ClientApp SIGKILLs itself mid-training, one
    sleeps past the 90 s round timeout, one SuperNode process is SIGKILLed by PID from outside as
    round 2 starts; the fourth trains, and the run finishes."""
    import threading
    import time

    import torch as _torch

    killed, slow, dead = 0, 1, 2
    faults = {killed: " fault='kill@2'", slow: " fault='sleep@2:200'"}
    nodes = [f"partition-id={i}" + faults.get(i, "") for i in range(4)]
    sets = [*TINY, "clients_per_round=4", "rounds=2", "eval.every=0", "eval.baseline=false", "eval.per_type=false",
            "flower.round_timeout=90"]
    out = tmp_path / "crash"

    def kill_a_supernode() -> None:
        ckpt, pids, deadline = out / "checkpoints" / "latest.pt", Path(f"{out}.logs") / "pids", time.monotonic() + 300
        while time.monotonic() < deadline:
            if ckpt.is_file() and pids.is_file() and _torch.load(ckpt, weights_only=True)["round"] >= 1:
                os.kill(int(pids.read_text().split()[1 + dead]), signal.SIGKILL)
                return
            time.sleep(0.2)

    t = threading.Thread(target=kill_a_supernode, daemon=True)
    t.start()
    res = _deploy(out, nodes, _quoted(sets), "node-faults", port=19390)
    t.join(timeout=5)
    assert res.returncode == 0, res.stdout[-4000:]
    rec = _metrics(out)[-1]
    dropped = {d["client"]: d["reason"] for d in rec.get("dropped", [])}
    assert set(dropped) == {f"client{k:05d}" for k in (killed, slow, dead)}, dropped
    assert "no reply within 90s" in dropped[f"client{slow:05d}"]
    assert "dropped from this round" in res.stdout
    assert sum(g["clients"] for g in rec["groups"].values()) == 1


def test_bad_reply_rejected_and_min_clients_enforced_on_loopback(tmp_path: Path) -> None:
    """A node that sends NaN factors is rejected by name (node and module); with min_clients = 3 the
    round cannot go on, so the run stops with a clear error and the round-1 checkpoint intact."""
    import torch as _torch

    nodes = [f"partition-id={i}" + (" fault='nan@2'" if i == 0 else "") for i in range(4)]
    sets = [*TINY, "clients_per_round=4", "rounds=2", "min_clients=4", "eval.every=0", "eval.baseline=false",
            "eval.per_type=false"]
    out = tmp_path / "bad"
    res = _deploy(out, nodes, _quoted(sets), "node-faults", port=19690)
    assert res.returncode != 0  # no adapter: the run stopped
    assert "client00000 on node" in res.stdout and "NaN or Inf" in res.stdout and "module '" in res.stdout
    assert "min_clients = 4" in res.stdout and "--resume" in res.stdout
    ckpt = _torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["round"] == 1 and ckpt["global_state"] is not None

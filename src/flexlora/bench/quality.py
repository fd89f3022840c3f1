"""Run the quality grid (``flexlora bench quality``): every row of a preset with the in-process engine,
resumable, into one directory.

Layout of the output directory ``DIR``::

    DIR/results.jsonl       one JSON object per finished row (see :func:`collect_result`)
    DIR/results.md          the report (flexlora.bench.report), rewritten after every invocation
    DIR/*.png               its plots
    DIR/bench.log           everything logged, appended by every invocation
    DIR/runs/<row>/         each row's run directory (config.toml, metrics.jsonl, checkpoints/, adapter/, ...)

Resuming: a row already in ``results.jsonl`` (with the same configuration) is skipped; a row whose
run directory holds a checkpoint continues from it (``resume=True``), so a grid killed in the
middle of a run picks that run up at its last finished round. Each row's run is the engine's own
(:class:`~flexlora.engines.simulation.Simulation`), so a row run in a grid equals the same row run
alone (``--only``) bit for bit, apart from wall-clock fields.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.bench.grid import (
    DATASETS,
    BenchError,
    Preset,
    Row,
    get_preset,
    grid_rows,
)
from flexlora.bench.report import grid_settings, write_report
from flexlora.engines.checkpoint import atomic_write_text, run_fingerprint
from flexlora.engines.config import ConfigError, RunConfig, load_config, parse_override
from flexlora.engines.outputs import read_metrics, write_metrics
from flexlora.engines.simulation import Simulation

RESULTS = "results.jsonl"


@dataclass
class QualityResult:
    """What :func:`run_quality` did."""

    output: Path = field(metadata={"help": "The output directory."})
    rows: list[Row] = field(metadata={"help": "The selected rows, in grid order."})
    ran: list[str] = field(default_factory=list, metadata={"help": "Rows run from the start in this call."})
    resumed: list[str] = field(default_factory=list, metadata={"help": "Rows continued from their checkpoint."})
    skipped: list[str] = field(default_factory=list, metadata={"help": "Rows already in results.jsonl."})
    failed: dict[str, str] = field(default_factory=dict, metadata={"help": "Row id -> error of rows that failed."})
    results: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "Every row of results.jsonl."})
    report: list[Path] = field(default_factory=list, metadata={"help": "results.md and the plots written."})


# --------------------------------------------------------------------------- inputs
def parse_data_args(items: Sequence[str]) -> dict[str, str | None]:
    """``["ni=PATH", "dolly"]`` -> ``{"ni": "PATH", "dolly": None}`` (None: the default path).

    Raises
    ------
    BenchError
        An unknown data set name or a name given twice.
    """
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if name not in DATASETS:
            raise BenchError(f"--data {item}: unknown data set {name!r}; use one of {', '.join(DATASETS)} "
                             "(as NAME or NAME=PATH)")
        if name in out:
            raise BenchError(f"--data {item}: data set {name!r} is given twice; give it once")
        if sep and not path.strip():
            raise BenchError(f"--data {item}: empty path; use --data {name}=PATH, or --data {name} for the default")
        out[name] = path.strip() if sep else None
    return out


def _keys(sets: Sequence[str]) -> list[str]:
    return [".".join(parse_override(s)[0]) for s in sets]


@dataclass(frozen=True)
class Plan:
    """A row of the grid ready to run."""

    row: Row = field(metadata={"help": "The row."})
    sets: tuple[str, ...] = field(metadata={"help": "Its full override list: preset, data set, row, user."})
    cfg: RunConfig = field(metadata={"help": "The validated config built from them."})


def _plan(preset: Preset, rows: Sequence[Row], dataset_sets: dict[str, tuple[str, ...]],
          user_sets: Sequence[str]) -> list[Plan]:
    # Every row's config is built (and validated) before anything runs, so that a typo in --set
    # fails in a second, not after hours of earlier rows.
    plans = []
    for row in rows:
        sets = (*preset.sets, *dataset_sets[row.dataset], *row.sets, *user_sets)
        try:
            cfg = load_config(None, list(sets))
        except ConfigError as exc:
            raise ConfigError(f"row {row.id}: {exc}") from exc
        plans.append(Plan(row, sets, cfg))
    return plans


# -------------------------------------------------------------------------- results
_TEXT_FIELDS = ("id", "method", "distribution", "dataset")
_ROUND_FIELDS = ("rougeL", "eval_loss", "train_loss", "aggregate_seconds", "tail_energy")


def _row_problem(row: Any) -> str | None:
    """Why a parsed line of ``results.jsonl`` is not a row the report can use (None when it is)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in _TEXT_FIELDS:
        if not isinstance(row.get(key), str) or not row[key]:
            return f"field {key!r} is {row.get(key)!r}, expected a non-empty string"
    if isinstance(row.get("seed"), bool) or not isinstance(row.get("seed"), int):
        return f"field 'seed' is {row.get('seed')!r}, expected an int"
    final = row.get("rougeL_final")
    if isinstance(final, bool) or not isinstance(final, int | float):
        return f"field 'rougeL_final' is {final!r}, expected a number"
    for key in _ROUND_FIELDS:
        d = row.get(key, {})
        if not isinstance(d, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in d.items()):
            return f"field {key!r} must map round numbers (\"1\", \"2\", ...) to numbers"
    return None


def read_results(path: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``.

    A torn last line (a kill while writing) is skipped with a warning and kept in
    ``results.jsonl.bad``; any other unreadable line is an error naming it, so that nothing a
    user cannot see is ever dropped from the file.

    Raises
    ------
    BenchError
        A file that is not UTF-8, or a line (but a torn last one) that is not a JSON row object
        with the fields the report reads.
    """
    if not path.is_file():
        return []
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the first row.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise BenchError(f"{path} is not UTF-8 text ({exc}); restore it from a copy, or move it away to run "
                         "every row again") from exc
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                bad = path.with_name(path.name + ".bad")
                with bad.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
                log(f"warning: {path}:{i} is not valid JSON (a write cut short?); it is ignored, kept in {bad}, "
                    "and its row will run again")
                continue
            raise BenchError(f"{path}:{i} is not valid JSON ({exc.msg}); fix or delete that line (its row then "
                             "runs again)") from exc
        problem = _row_problem(row)
        if problem is not None:
            raise BenchError(f"{path}:{i} is not a result row: {problem}; fix or delete that line (its row then "
                             "runs again)")
        out.append(row)
    return out


def write_results(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``results.jsonl`` atomically (a kill leaves the old or the new file, never half a line)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in results))


def _by_round(records: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    # JSON object keys are strings: rounds are written as "1", "2", ...
    return {str(r["round"]): r[key] for r in records if key in r and r.get(key) is not None}


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def bytes_summary(records: Sequence[dict[str, Any]], direction: str) -> dict[str, Any]:
    """Bytes per client per round in ``direction`` ("up" or "down") from the records' ``bytes`` field.

    Returns
    -------
    dict
        ``per_round``: {round: mean over the round's clients}; ``per_type``: {type: mean over every
        (client, round) of that type}; ``mean``: mean over every (client, round). Round 1 sends no
        factors down (clients draw the round's shared fresh LoRA from a seed), which the means include.
    """
    per_round: dict[str, float] = {}
    per_type: dict[str, list[float]] = {}
    every: list[float] = []
    for r in records:
        clients = r.get("bytes")
        if not isinstance(clients, dict) or not clients:
            continue
        vals = [float(c[direction]) for c in clients.values()]
        per_round[str(r["round"])] = _mean(vals)
        every.extend(vals)
        for c in clients.values():
            per_type.setdefault(str(c.get("type", "?")), []).append(float(c[direction]))
    return {"per_round": per_round, "per_type": {t: _mean(v) for t, v in sorted(per_type.items())},
            "mean": _mean(every)}


def collect_result(row: Row, records: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One line of ``results.jsonl`` from a finished row's ``metrics.jsonl`` records.

    Fields: ``id, method, distribution, dataset, seed, sets`` (the row's own overrides);
    ``rougeL`` {round: value} over the evaluated rounds; ``rougeL_final``, ``rougeL_per_task``
    and (when present) ``rougeL_by_type`` of the last evaluation; ``eval_loss`` and
    ``train_loss`` {round: value}; ``bytes_up``/``bytes_down`` (:func:`bytes_summary`);
    ``aggregate_seconds`` {round: s}; ``tail_energy`` {round: value} when the records carry it;
    ``rounds``; and ``extra`` (``wall_seconds``, ``resumed``, ``fingerprint``, ...).
    """
    evals = [r for r in records if isinstance(r.get("rougeL"), int | float)]
    last = evals[-1] if evals else {}
    out: dict[str, Any] = {
        "id": row.id, "method": row.method, "distribution": row.distribution, "dataset": row.dataset,
        "seed": row.seed, "sets": list(row.sets),
        "rougeL": _by_round(evals, "rougeL"),
        "rougeL_final": last.get("rougeL", math.nan),
        "rougeL_per_task": last.get("rougeL_per_task", {}),
    }
    by_type = next((r["rougeL_by_type"] for r in reversed(records) if r.get("rougeL_by_type")), None)
    if by_type:
        out["rougeL_by_type"] = by_type
    trained = [r for r in records if r.get("round", 0) >= 1]
    out["rounds"] = max((int(r["round"]) for r in trained), default=0)
    out["eval_loss"] = _by_round(evals, "eval_loss")
    out["train_loss"] = _by_round(trained, "train_loss")
    out["bytes_up"] = bytes_summary(trained, "up")
    out["bytes_down"] = bytes_summary(trained, "down")
    out["aggregate_seconds"] = _by_round(trained, "aggregate_seconds")
    if any("tail_energy" in r for r in records):
        out["tail_energy"] = _by_round(records, "tail_energy")
    out.update(extra)
    return out


# ------------------------------------------------------------------------------ run
def _run_base(plan: Plan, run_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    # The untuned base model: a federation of the data set's config evaluated before any round
    # (no global state), the same evaluation a run's round 0 would do. Its record is written like
    # a run's metrics.jsonl so the row directory looks like every other.
    t0 = time.perf_counter()
    sim = Simulation(plan.cfg, run_dir, progress=False, log=log)
    res = sim.evaluate()
    records = [{"round": 0, **res}]
    write_metrics(run_dir / "metrics.jsonl", records)
    del sim
    row = plan.row
    return {
        "id": row.id, "method": row.method, "distribution": row.distribution, "dataset": row.dataset,
        "seed": row.seed, "sets": list(row.sets), "rougeL": _by_round(records, "rougeL"),
        "rougeL_final": res.get("rougeL", math.nan), "rougeL_per_task": res.get("rougeL_per_task", {}),
        "eval_loss": _by_round(records, "eval_loss"), "eval_examples": res.get("eval_examples", 0),
        "wall_seconds": time.perf_counter() - t0,
    }


def _run_row(plan: Plan, run_dir: Path, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim = Simulation(plan.cfg, run_dir, resume=resume, progress=False, log=log)
    sim.run()
    del sim
    wall = time.perf_counter() - t0
    return collect_result(plan.row, read_metrics(run_dir / "metrics.jsonl"), wall_seconds=wall, resumed=resume)


def plan_quality(
    preset: str | Preset,
    *,
    data: Sequence[str] = (),
    sets: Sequence[str] = (),
    only: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[Plan]:
    """The selected rows of a grid with their full override lists and validated configs (nothing runs).

    Takes the parameters of :func:`run_quality` and raises its errors.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    given = parse_data_args(data)
    names = list(given) if given else list(p.datasets)
    paths = {n: DATASETS[n].resolve_path(given.get(n)) for n in names}
    user_keys = _keys(sets)
    if p.needs_model and "model" not in user_keys:
        raise BenchError(f"--preset {p.name} needs the model: add --set model=<hub id or local directory> (the "
                         "paper used a 1.3B LLaMA-architecture model from Data-Juicer)")
    log(f"flexlora bench quality --preset {p.name}: data {', '.join(f'{n}={paths[n] or n}' for n in names)}"
        + (f"; --set {' '.join(sets)}" if sets else ""))
    rows = grid_rows(p, names)
    if only:
        # Each --only must match: a typo beside a good one would silently leave its rows out.
        for s in only:
            if not s.strip() or not any(s in r.id for r in rows):
                raise BenchError(f"--only {s!r}: matches no row of preset {p.name}; row ids look like "
                                 f"{', '.join(r.id for r in rows[:3])} (all: {len(rows)}; list them with --list)")
        rows = [r for r in rows if any(s in r.id for s in only)]
    grid_keys = {k for r in rows for k in _keys(r.sets)}
    for k in sorted(set(user_keys) & grid_keys):
        log(f"warning: --set {k} overrides a key the grid sets per row; every row gets the same value")
    dataset_sets = {n: (*DATASETS[n].sets(paths[n]), *p.dataset_sets.get(n, ())) for n in names}
    return _plan(p, rows, dataset_sets, sets)


def _check_interrupted_row(ckpt: Path, rid: str, fingerprint: str) -> None:
    """An interrupted row resumes from its checkpoint only with the settings it was started with."""
    from flexlora.engines.checkpoint import CheckpointError, load_checkpoint

    try:
        saved = load_checkpoint(ckpt.parent).get("fingerprint")
    except CheckpointError as exc:
        raise BenchError(f"row {rid}: {exc}; or add --only {rid} --force to run the row again from the start") from exc
    if saved != fingerprint:
        raise BenchError(f"row {rid} was interrupted in {ckpt.parent.parent} with other settings than these (a "
                         f"different --set, --data path or preset); run it with its own settings to resume it, or "
                         f"add --only {rid} --force to run it again from the start")


def _check_same_table(plans: Sequence[Plan], others: Sequence[dict[str, Any]], results_path: Path) -> None:
    """Refuse to add rows to a data set's table whose other rows were run with other settings (another
    preset, --set or --data path): results.md would average them into one cell as if they were alike."""
    ours = {pl.row.dataset: grid_settings({"config_sets": list(pl.sets), "sets": list(pl.row.sets)})
            for pl in plans}
    for r in others:
        theirs, mine = grid_settings(r), ours.get(r["dataset"])
        if theirs is None or mine is None or theirs == mine:
            continue
        only_then = [x for x in theirs if x not in mine]
        only_now = [x for x in mine if x not in theirs]
        what = "; ".join(part for part in (
            f"then: {' '.join(only_then[:4])}{' ...' if len(only_then) > 4 else ''}" if only_then else "",
            f"now: {' '.join(only_now[:4])}{' ...' if len(only_now) > 4 else ''}" if only_now else "",
        ) if part) or "the same overrides in another order"
        raise BenchError(f"{results_path}: row {r['id']} of data set {r['dataset']} was run with other settings than "
                         f"these ({what}); one table must not mix them. Use another --output for these settings, "
                         "or run with the settings of the rows already there")


def _check_data(plans: Sequence[Plan]) -> None:
    """Load each data set of the grid once, before anything runs: a bad file or a data set without
    unseen examples to evaluate fails here in seconds, not once per row."""
    from flexlora.data.errors import DataError
    from flexlora.engines.run_setup import load_run_data, load_run_eval_data

    seen: set[tuple[str, str]] = set()
    for pl in plans:
        key = (pl.row.dataset, pl.cfg.data)
        if key in seen:
            continue
        seen.add(key)
        try:
            data = load_run_data(pl.cfg)
            separate = load_run_eval_data(pl.cfg)
        except DataError as exc:
            raise BenchError(f"data set {pl.row.dataset}: {exc}") from exc
        unseen = (separate or data).unseen
        if not any(unseen.values()):
            raise BenchError(f"data set {pl.row.dataset} ({pl.cfg.data}) has no unseen-task examples to evaluate "
                             f"(unseen tasks: {sorted(unseen)[:5]}); every row would score Rouge-L nan. Check the "
                             "data set's test split or data_options.unseen_tasks")


def _tee(output: Path, log: Callable[[str], None]) -> Callable[[str], None]:
    path = output / "bench.log"

    def emit(msg: str) -> None:
        log(msg)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    return emit


def run_quality(
    preset: str | Preset,
    output: str | Path,
    *,
    data: Sequence[str] = (),
    sets: Sequence[str] = (),
    only: Sequence[str] = (),
    force: bool = False,
    log: Callable[[str], None] = print,
) -> QualityResult:
    """Run (or continue) a preset's grid into ``output`` and write its report.

    Parameters
    ----------
    preset : str or Preset
        ``"smoke"``, ``"quick"`` or ``"paper"`` (flexlora.bench.grid).
    output : path
        The grid's directory (created); running again into it skips finished rows and resumes an
        interrupted one.
    data : sequence of str
        ``NAME`` or ``NAME=PATH`` per data set to run (demo, ni, dolly); without any, the preset's
        data sets at their default paths.
    sets : sequence of str
        ``--set`` overrides applied to every row (after the grid's own).
    only : sequence of str
        Run only the rows whose id contains one of these substrings.
    force : bool, default False
        Run the selected rows again from the start, discarding their results and run directories.
    log : callable, default print

    Returns
    -------
    QualityResult
        A row that raised is in ``failed`` (with the error; the other rows still run); the caller
        decides the exit code.

    Raises
    ------
    BenchError
        An unknown preset or data set, a missing or malformed data set (loaded once, before any
        row runs) or one without unseen examples, an ``--only`` that matches nothing, the paper
        preset without ``--set model=...``, a finished or interrupted row recorded with other
        settings, fewer rounds than a finished row ran, an ``--output`` that is a file, or a
        ``results.jsonl`` line that is not a result row.
    ConfigError
        A ``--set`` that no row's config accepts (the message names the row and the key).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(output)
    # Everything is checked before the output directory is made: a bad request leaves nothing behind.
    notes: list[str] = []
    plans = plan_quality(p, data=data, sets=sets, only=only, log=notes.append)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--output {out} is a file, not a directory; choose a directory for the grid")
    _check_data(plans)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--output {out}: cannot create the grid's directory ({exc})") from exc
    log = _tee(out, log)
    log(f"output {out}")
    for note in notes:
        log(note)

    results_path = out / RESULTS
    results = read_results(results_path, log)
    done = {r["id"]: r for r in results}
    selected_ids = {pl.row.id for pl in plans}
    fingerprints = {pl.row.id: run_fingerprint(pl.cfg) for pl in plans}
    _check_same_table(plans, [r for r in results if r["id"] not in selected_ids], results_path)
    if not force:
        for rid in selected_ids & set(done):
            if done[rid].get("fingerprint") != fingerprints[rid]:
                raise BenchError(f"{results_path}: row {rid} was run with other settings than these (a different "
                                 "--set, --data path or preset); use another --output, or add "
                                 f"--only {rid} --force to run it again with these")
        for pl in plans:
            rid = pl.row.id
            prev_rounds = done.get(rid, {}).get("rounds")
            if not pl.row.is_base and isinstance(prev_rounds, int) and prev_rounds > pl.cfg.rounds:
                raise BenchError(f"{results_path}: row {rid} has run {prev_rounds} rounds, more than rounds = "
                                 f"{pl.cfg.rounds}; a row's rounds can only grow (add --only {rid} --force to run "
                                 "it again from the start)")
            ckpt = out / "runs" / pl.row.dirname / "checkpoints" / "latest.pt"
            if rid not in done and not pl.row.is_base and ckpt.is_file():
                _check_interrupted_row(ckpt, rid, fingerprints[rid])
    else:
        for pl in plans:
            run_dir = out / "runs" / pl.row.dirname
            if pl.row.id in done or run_dir.exists():
                log(f"--force: discarding {pl.row.id} ({run_dir})")
            shutil.rmtree(run_dir, ignore_errors=True)
        results = [r for r in results if r["id"] not in selected_ids]
        write_results(results_path, results)
        done = {r["id"]: r for r in results}

    res = QualityResult(output=out, rows=[pl.row for pl in plans])
    n = len(plans)
    for i, pl in enumerate(plans, 1):
        row = pl.row
        tag = f"[{i}/{n}] {row.id}"
        fingerprint = fingerprints[row.id]
        prev = done.get(row.id)
        if prev is not None:
            if row.is_base or prev.get("rounds") == pl.cfg.rounds:
                log(f"{tag}: skipped, already in {RESULTS}")
                res.skipped.append(row.id)
                continue
            # Only `rounds` changed: the engine continues a finished run from its checkpoint. The
            # row's previous result stays in results.jsonl until the continuation has finished.
            log(f"{tag}: in {RESULTS} with {prev.get('rounds')} rounds, continuing to {pl.cfg.rounds}")
        run_dir = out / "runs" / row.dirname
        if row.is_base:
            # A base row has no checkpoint to resume; what an interrupted one left is redone.
            shutil.rmtree(run_dir, ignore_errors=True)
        resume = not row.is_base and (run_dir / "checkpoints" / "latest.pt").is_file()
        log(f"{tag}: {'resuming from its checkpoint' if resume else 'running'} in {run_dir}")

        def row_log(msg: str, _id: str = row.id) -> None:
            log(f"  {_id}: {msg}")

        try:
            if row.is_base:
                result = _run_base(pl, run_dir, row_log)
            else:
                result = _run_row(pl, run_dir, resume, row_log)
        except Exception as exc:  # noqa: BLE001 - one failed row must not cost the rest of a long grid
            log(f"{tag}: FAILED: {exc}\n{traceback.format_exc()}")
            res.failed[row.id] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            gc.collect()  # the row's model and optimizer state go before the next row loads its own
        result.update(preset=p.name, fingerprint=fingerprint, config_sets=list(pl.sets))
        results = [r for r in results if r["id"] != row.id] + [result]
        write_results(results_path, results)
        (res.resumed if resume else res.ran).append(row.id)
        log(f"{tag}: done, Rouge-L {result['rougeL_final']:.4f} ({result['wall_seconds']:.0f}s)")

    res.results = results
    res.report = write_report(results, out)
    log(f"report: {out / 'results.md'} ({len(results)} rows in {RESULTS}); ran {len(res.ran)}, resumed "
        f"{len(res.resumed)}, skipped {len(res.skipped)}, failed {len(res.failed)}")
    for rid, err in res.failed.items():
        log(f"failed: {rid}: {err}")
    return res

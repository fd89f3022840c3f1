"""The report of a quality grid: ``results.md`` and PNG plots from the rows of ``results.jsonl``.

Per data set: the final Rouge-L of every method (rows) under every client-resource distribution
(columns) as mean ± sample standard deviation over seeds, the base model on top; the bytes per
client per round and the server's aggregation time per method; and, for every pair of rows run
with several seeds, whether their difference is larger than their spread. Rows run with one seed
have no spread: they are shown as ``mean (1)`` and left out of the pairwise comparison.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.bench.grid import BASE_METHOD, DATASETS, DISTRIBUTION_COLUMNS, METHOD_ORDER
from flexlora.engines.checkpoint import atomic_write_text

Group = tuple[str, str, str]  # (dataset, method, distribution)


# ------------------------------------------------------------------------- settings
def grid_settings(row: dict[str, Any]) -> tuple[str, ...] | None:
    """The overrides a row shares with every row of its table: its full list (``config_sets``:
    preset, data set, row, user) without the row's own (``sets``: method, distribution, seed)
    and without ``rounds=`` (a grid grows by continuing its rows to more rounds). ``None`` for a
    row that does not record them (written before they were kept)."""
    full, own = row.get("config_sets"), row.get("sets")
    if not isinstance(full, list) or not isinstance(own, list):
        return None
    rest = list(full)
    for i in range(len(full) - len(own) + 1):
        if full[i:i + len(own)] == own:
            rest = full[:i] + full[i + len(own):]
            break
    return tuple(str(s) for s in rest if not str(s).replace(" ", "").startswith("rounds="))


def _settings_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    # What every row of a table was run with, so a reader can reproduce it and can see that the
    # cells compare like with like; the number of rounds is listed apart, as rows may be mid-growth.
    lines = []
    settings = {grid_settings(r) for r in rows} - {None}
    presets = sorted({str(r["preset"]) for r in rows if r.get("preset")})
    if len(settings) == 1:
        lines.append(f"Settings of every row (preset {', '.join(presets) or 'unknown'}; each row adds its method, "
                     f"distribution and seed): `{' '.join(next(iter(settings)))}`.")
    elif len(settings) > 1:
        lines.append(f"**Warning: these rows were run with {len(settings)} different settings** (presets: "
                     f"{', '.join(presets) or 'unknown'}); their cells do not compare like with like. Run each "
                     "setting into its own --output.")
    trained = [r for r in rows if isinstance(r.get("rounds"), int) and r.get("method") != BASE_METHOD]
    rounds = sorted({int(r["rounds"]) for r in trained})
    if len(rounds) > 1:
        counts = {k: sum(1 for r in trained if r["rounds"] == k) for k in rounds}
        lines.append("**Warning: the rows ran different numbers of rounds** ("
                     + ", ".join(f"{k} rounds: {n} row{'' if n == 1 else 's'}" for k, n in counts.items())
                     + "); finish the grid with one `--set rounds=N` before reading the table.")
    elif rounds:
        lines.append(f"Rounds: {rounds[0]}.")
    return lines


# ------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; 0 for a single value) and count, NaNs dropped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), std, len(vals)


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``"0.2000 ± 0.1000 (3)"``; one value: ``"0.2000 (1)"``; none: ``"–"``."""
    m, s, n = mean_std(values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{m:.{digits}f} (1)"
    return f"{m:.{digits}f} ± {s:.{digits}f} ({n})"


def spread_verdict(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, str]:
    """Difference of means ``mean(a) - mean(b)``, the spread ``std(a) + std(b)`` and the verdict:
    ``"larger than the spread"`` when ``|difference| > spread``, else ``"within the spread"``."""
    ma, sa, _ = mean_std(a)
    mb, sb, _ = mean_std(b)
    diff, spread = ma - mb, sa + sb
    return diff, spread, "larger than the spread" if abs(diff) > spread else "within the spread"


# --------------------------------------------------------------------------- grouping
def _order(values: Sequence[str], canonical: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in canonical if v in seen] + [v for v in seen if v not in canonical]


def _groups(results: Sequence[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    out: dict[Group, list[dict[str, Any]]] = {}
    for r in results:
        if r.get("method") == BASE_METHOD:
            continue
        out.setdefault((r["dataset"], r["method"], r["distribution"]), []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r.get("seed", 0))
    return out


def _sorted_groups(groups: dict[Group, list[dict[str, Any]]], dataset: str) -> list[Group]:
    keys = [g for g in groups if g[0] == dataset]
    methods = _order([g[1] for g in keys], METHOD_ORDER)
    dists = _order([g[2] for g in keys], DISTRIBUTION_COLUMNS)
    return sorted(keys, key=lambda g: (methods.index(g[1]), dists.index(g[2])))


def _finals(rows: Sequence[dict[str, Any]]) -> list[float]:
    return [float(r.get("rougeL_final", math.nan)) for r in rows]


def _label(g: Group) -> str:
    return f"{g[1]} / {g[2]}"


def _bytes(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, int | float) and not math.isnan(v) else "–"


def _mean_of(rows: Sequence[dict[str, Any]], get: Any) -> float:
    vals = [v for v in (get(r) for r in rows) if isinstance(v, int | float) and not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


# ---------------------------------------------------------------------------- markdown
def render_markdown(results: Sequence[dict[str, Any]]) -> str:
    """``results.md`` for the rows of ``results.jsonl`` (any order, any subset of a grid)."""
    groups = _groups(results)
    bases = {r["dataset"]: r for r in results if r.get("method") == BASE_METHOD}
    datasets = _order([r["dataset"] for r in results], list(DATASETS))
    presets = sorted({str(r["preset"]) for r in results if r.get("preset")})
    lines = [
        "# Quality: the paper's comparison",
        "",
        f"Preset: {', '.join(presets) or 'unknown'}. Written by `flexlora bench quality` from `results.jsonl` "
        f"({len(results)} rows). Each cell is the final Rouge-L of the global model on the unseen tasks "
        "(zero-shot), as mean ± sample standard deviation (number of seeds); a single seed shows no "
        "spread. Bytes are factor bytes per client per round (round 1 sends nothing down: clients start "
        "from the round's shared fresh LoRA, drawn from a seed); aggregation time is the server's mean per round.",
    ]
    for ds in datasets:
        keys = _sorted_groups(groups, ds)
        lines += ["", f"## Data set: {ds}", ""]
        for paragraph in _settings_lines([r for r in results if r["dataset"] == ds]):
            lines += [paragraph, ""]
        base = bases.get(ds)
        if base is not None:
            lines.append(f"Base model (untuned): Rouge-L {base['rougeL_final']:.4f} "
                         f"({base.get('eval_examples', '?')} answers).")
        else:
            lines.append("Base model (untuned): not evaluated (its row is not in results.jsonl).")
        lines.append("")
        dists = _order([g[2] for g in keys], DISTRIBUTION_COLUMNS)
        cols = list(DISTRIBUTION_COLUMNS) + [d for d in dists if d not in DISTRIBUTION_COLUMNS]
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
        if base is not None:
            lines.append(f"| base (untuned) | {base['rougeL_final']:.4f} |" + " |" * (len(cols) - 1))
        for method in _order([g[1] for g in keys], METHOD_ORDER):
            cells = [format_mean_std(_finals(groups[(ds, method, d)])) if (ds, method, d) in groups else ""
                     for d in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")

        lines += ["", "### Communication and server time", "",
                  "| method | distribution | up, B/client/round | down, B/client/round | up per client type | "
                  "aggregation, s/round | wall, s/run |",
                  "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
        for g in keys:
            rows = groups[g]
            up = _mean_of(rows, lambda r: (r.get("bytes_up") or {}).get("mean"))
            down = _mean_of(rows, lambda r: (r.get("bytes_down") or {}).get("mean"))
            types = sorted({t for r in rows for t in ((r.get("bytes_up") or {}).get("per_type") or {})})
            per_type = ", ".join(
                f"{t}: {_bytes(_mean_of(rows, lambda r, t=t: r['bytes_up']['per_type'].get(t)))}" for t in types)
            agg = _mean_of(rows, lambda r: statistics.fmean(r["aggregate_seconds"].values())
                           if r.get("aggregate_seconds") else math.nan)
            wall = _mean_of(rows, lambda r: r.get("wall_seconds"))
            agg_s = f"{agg:.4f}" if not math.isnan(agg) else "–"
            wall_s = f"{wall:.0f}" if not math.isnan(wall) else "–"
            lines.append(f"| {g[1]} | {g[2]} | {_bytes(up)} | {_bytes(down)} | {per_type or '–'} | {agg_s} | "
                         f"{wall_s} |")

        tail_keys = [g for g in keys if any(r.get("tail_energy") for r in groups[g])]
        if tail_keys:
            rounds = sorted({int(k) for g in tail_keys for r in groups[g] for k in (r.get("tail_energy") or {})})
            lines += ["", "### Rank collapse: energy beyond the smallest client rank", "",
                      "Share of the global update's energy beyond the smallest client rank of each module, over "
                      "every adapted module, `sum_m sum_{i > r_min(m)} s_i^2 / sum_m sum_i s_i^2`, after each round "
                      "(mean over seeds). Under homogeneous ranks it is 0 by definition.", "",
                      "| method | distribution | " + " | ".join(f"round {k}" for k in rounds) + " |",
                      "| --- | --- | " + " | ".join("---:" for _ in rounds) + " |"]
            for g in tail_keys:
                cells = []
                for k in rounds:
                    v = _mean_of(groups[g], lambda r, k=k: (r.get("tail_energy") or {}).get(str(k)))
                    cells.append(f"{v:.4f}" if not math.isnan(v) else "–")
                lines.append(f"| {g[1]} | {g[2]} | " + " | ".join(cells) + " |")

        lines += ["", "### Differences larger than the spread", ""]
        multi = [g for g in keys if mean_std(_finals(groups[g]))[2] >= 2]
        if len(multi) < 2:
            lines.append("Fewer than two rows of this data set were run with several seeds; nothing to compare.")
        else:
            lines += ["Every pair of rows run with several seeds: the difference of their mean final Rouge-L, "
                      "and whether it is larger than the sum of their standard deviations.", "",
                      "| row a | row b | mean a − mean b | std a + std b | verdict |",
                      "| --- | --- | ---: | ---: | --- |"]
            for a, b in itertools.combinations(multi, 2):
                diff, spread, verdict = spread_verdict(_finals(groups[a]), _finals(groups[b]))
                lines.append(f"| {_label(a)} | {_label(b)} | {diff:+.4f} | {spread:.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots
def _rounds(d: dict[str, Any] | None) -> tuple[list[int], list[float]]:
    pts = sorted((int(k), float(v)) for k, v in (d or {}).items() if isinstance(v, int | float))
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``rougeL_per_round_<dataset>.png``, ``rougeL_final.png`` and ``tail_energy_<dataset>.png``
    (only for data sets whose rows carry ``tail_energy``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = _groups(results)
    bases = {r["dataset"]: r for r in results if r.get("method") == BASE_METHOD}
    datasets = _order([r["dataset"] for r in results], list(DATASETS))
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    for ds in datasets:
        rows = [r for g in _sorted_groups(groups, ds) for r in groups[g]]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
        for r in rows:
            x, y = _rounds(r.get("rougeL"))
            ax.plot(x, y, marker="o", markersize=3, linewidth=1, label=r["id"].split("/", 1)[1])
        if ds in bases:
            ax.axhline(bases[ds]["rougeL_final"], color="black", linestyle="--", linewidth=1, label="base (untuned)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Rouge-L (unseen tasks)")
        ax.set_title(f"Rouge-L per round: {ds}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, f"rougeL_per_round_{ds}.png")

        tail = [r for r in rows if r.get("tail_energy")]
        if tail:
            fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
            for r in tail:
                x, y = _rounds(r["tail_energy"])
                ax.plot(x, y, marker="o", markersize=3, linewidth=1, label=r["id"].split("/", 1)[1])
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("tail energy")
            ax.set_title(f"Energy of the global update beyond the smallest client rank: {ds}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
            save(fig, f"tail_energy_{ds}.png")

    with_rows = [ds for ds in datasets if _sorted_groups(groups, ds)]
    if with_rows:
        fig, axes = plt.subplots(len(with_rows), 1, figsize=(10, 4 * len(with_rows)), dpi=110, squeeze=False)
        for ax, ds in zip(axes[:, 0], with_rows):
            keys = _sorted_groups(groups, ds)
            stats = [mean_std(_finals(groups[g])) for g in keys]
            ax.bar(range(len(keys)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, color="tab:blue")
            if ds in bases:
                ax.axhline(bases[ds]["rougeL_final"], color="black", linestyle="--", linewidth=1,
                           label="base (untuned)")
                ax.legend(fontsize=7)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([f"{_label(g)} ({s[2]})" for g, s in zip(keys, stats)], rotation=60, ha="right",
                               fontsize=7)
            ax.set_ylabel("final Rouge-L")
            ax.set_title(f"Final Rouge-L (mean ± std over seeds): {ds}")
            ax.grid(axis="y", alpha=0.3)
        save(fig, "rougeL_final.png")
    return written


def write_report(results: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``results.md`` and the plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    atomic_write_text(md, render_markdown(results))
    return [md, *write_plots(results, out)]

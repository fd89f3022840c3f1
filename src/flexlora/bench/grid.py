"""The grid of ``flexlora bench quality``: its rows (one federated run each), the data sets and the
presets (smoke, quick, paper).

A :class:`Row` is one run of the paper's comparison (Bai et al., NeurIPS 2024, Tables 2-4): a
method (an aggregator with its local optimizer), a client-resource distribution, a data set and a
seed, written as ``--set`` overrides. The config of a row is

    load_config(None, [*preset.sets, *dataset sets, *row.sets, *user --set])

so a preset holds the sizes, a data set its path and partition, and a row only what makes it that
row. Every preset has the same rows per data set (see :func:`grid_rows`); they differ in sizes,
distributions and seeds.

Row ids are ``<dataset>/<method>/<distribution>/s<seed>`` with spaces in the method label written as
``-`` (``ni/FlexLoRA+FedIT/heavy-tail-light/s1``, ``demo/FedIT-rich/homo/s0``); the base model's row
is ``<dataset>/base``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class BenchError(ValueError):
    """A benchmark request that cannot run: the message names the option or file, the problem and the fix."""


BASE_METHOD = "base"
"""The method label of the untuned base model's row (evaluated once per data set)."""

DISTRIBUTION_COLUMNS = ("homo", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal")
"""The client-resource distributions in the order of the report's columns (flexlora.core.distributions)."""


def _h(help: str, **kw: Any) -> Any:
    # A required field with its help text, like engines/config.py's fields.
    return field(metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One run of the grid (or the base model's evaluation, ``method == "base"``)."""

    id: str = _h("Unique id, '<dataset>/<method>/<distribution>/s<seed>' or '<dataset>/base'.")
    method: str = _h("Method label as in the paper's tables, e.g. 'FlexLoRA+FedIT'.")
    distribution: str = _h("Client-resource distribution (rank_distribution), '-' for the base row.")
    dataset: str = _h("Data set name: demo, ni or dolly.")
    seed: int = _h("Seed of the run (partition, rank draw, client sampling, training).")
    sets: tuple[str, ...] = _h("The row's own config overrides ('aggregator=flexlora', ...), applied after the "
                               "preset's and the data set's.")

    @property
    def is_base(self) -> bool:
        return self.method == BASE_METHOD

    @property
    def dirname(self) -> str:
        """The row's run directory name under ``DIR/runs`` (the id with ``/`` replaced)."""
        return self.id.replace("/", "__")


def row_id(dataset: str, method: str, distribution: str, seed: int) -> str:
    """``<dataset>/<method>/<distribution>/s<seed>``; spaces in ``method`` become ``-`` (shell-friendly)."""
    return f"{dataset}/{method.replace(' ', '-')}/{distribution}/s{seed}"


def base_row(dataset: str) -> Row:
    """The base model's row of ``dataset``: evaluated once, shared by every row of the data set."""
    return Row(id=f"{dataset}/{BASE_METHOD}", method=BASE_METHOD, distribution="-", dataset=dataset, seed=0, sets=())


# -------------------------------------------------------------------------- data sets
def repo_root() -> Path:
    """The repository root (default data paths are relative to it): the checkout holding this
    package in a source install, else the current directory."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def _toml_str(s: str) -> str:
    # --set values are read as TOML; quoting keeps a path like "1e3" or "true" a string.
    return json.dumps(s)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set of the grid: where it is by default and how it is split into clients."""

    name: str = _h("Name used in row ids and --data NAME=PATH.")
    description: str = _h("One line for the docs and --help.")
    default_path: str | None = _h("Default location, relative to the repository root (None: built in).")
    partition_sets: tuple[str, ...] = _h("Overrides of the partition: data_options.*, num_clients.")

    def resolve_path(self, given: str | None, root: Path | None = None) -> str | None:
        """The data path to use (``given`` or the default), checked to exist.

        Raises
        ------
        BenchError
            The path does not exist or is not of the expected kind.
        """
        if self.default_path is None and given is None:
            return None
        if self.default_path is None:
            raise BenchError(f"--data {self.name}={given}: data set {self.name!r} is built in and takes no path; "
                             f"use --data {self.name}")
        raw = given if given is not None else self.default_path
        p = Path(os.path.expanduser(raw))
        if not p.is_absolute():
            p = (Path.cwd() if given is not None else (root or repo_root())) / p
        p = p.resolve()
        where = f"--data {self.name}={given}" if given is not None else f"the default path of {self.name!r}"
        if not p.exists():
            raise BenchError(f"{where}: {p} does not exist; pass --data {self.name}=PATH to the {self.description}")
        if self.name == "ni":
            if not (p / "tasks").is_dir() or not (p / "splits").is_dir():
                raise BenchError(f"{where}: {p} is not a Natural Instructions directory (it needs tasks/ and "
                                 f"splits/); pass --data ni=PATH to the directory holding them")
        if self.name == "dolly" and p.is_dir():
            # The shared folder holds the JSONL next to a README: take the JSONL in it.
            found = sorted(p.glob("*.jsonl"))
            if len(found) != 1:
                raise BenchError(f"{where}: {p} is a directory with {len(found)} .jsonl files; pass "
                                 f"--data dolly=PATH to the Dolly-15k .jsonl file itself")
            p = found[0]
        return str(p)

    def sets(self, path: str | None) -> tuple[str, ...]:
        """The data set's overrides for a resolved ``path``."""
        data = "builtin:demo-tasks" if path is None else path
        return (f"data={_toml_str(data)}", *self.partition_sets)


DOLLY_UNSEEN = ("summarization", "closed_qa")
"""Dolly categories held out for the zero-shot evaluation. Both have grounded reference answers
(a summary or an answer taken from the given context), so Rouge-L against them is meaningful;
the loader's default creative_writing is open-ended, where Rouge-L says little."""

DATASETS: dict[str, DatasetSpec] = {
    "demo": DatasetSpec(
        name="demo", description="built-in synthetic demo tasks (builtin:demo-tasks)", default_path=None,
        partition_sets=(),
    ),
    "ni": DatasetSpec(
        name="ni", description="Natural Instructions directory (tasks/ + splits/)",
        default_path="../shared/data/natural-instructions",
        # One client per train task (num_clients 0 = one per task), test tasks unseen.
        partition_sets=("data_options.partition=natural", "num_clients=0"),
    ),
    "dolly": DatasetSpec(
        name="dolly", description="Dolly-15k JSONL file (or the directory holding it)",
        default_path="../shared/data/dolly-15k",
        partition_sets=("data_options.partition=dirichlet", "data_options.dirichlet_alpha=0.5", "num_clients=20",
                        "data_options.unseen_tasks=" + json.dumps(list(DOLLY_UNSEEN))),
    ),
}


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A size of the comparison: the model, the run sizes, the distributions and seeds of each method."""

    name: str = _h("Preset name (--preset).")
    description: str = _h("What it is for, in one sentence.")
    datasets: tuple[str, ...] = _h("Data sets run when no --data is given.")
    sets: tuple[str, ...] = _h("Overrides applied to every run: model, sizes, eval caps.")
    dataset_sets: Mapping[str, tuple[str, ...]] = _h("Per data set overrides of this preset (after the data set's "
                                                     "own), e.g. longer answers for Dolly.")
    sgd_lr: float = _h("Local learning rate of the SGD rows (FedAvg, FlexLoRA+FedAvg); the AdamW rows use train.lr.")
    combo_distributions: tuple[str, ...] = _h("Distributions of FlexLoRA+FedAvg/FedIT/SLoRA.")
    het_distributions: tuple[str, ...] = _h("Distributions of HetLoRA and FLoRA.")
    rslora_distributions: tuple[str, ...] = _h("Distributions of FlexLoRA+FedIT rsLoRA.")
    remedy_distributions: tuple[str, ...] = _h("Distributions of FlexLoRA+FedIT with each rank-collapse remedy "
                                               "(server-memory, rank-partitioned).")
    largest_type: tuple[int, int] = _h("[attention, mlp] ranks of the largest client type (the FedIT rich row).")
    slora_stage1_rounds: int = _h("SLoRA stage-1 rounds (sparse full fine-tuning) of the SLoRA rows.")
    robust_distributions: tuple[str, ...] = _h("Distributions of FlexLoRA+FedIT with each client's contribution "
                                               "bounded (the adaptive median bound) and of its DP rows.")
    dp_epsilons: tuple[float, ...] = _h("The epsilons of the client-level DP rows (FlexLoRA+FedIT DP eps=E, at "
                                        "delta DP_DELTA, over the preset's rounds); () = none.")
    dp_clip_norm: float = _h("The fixed bound C of the DP rows (about the clients' median norm, measured on the "
                             "preset's clipped row).")
    methods: tuple[str, ...] = _h("Only these method labels (and the base row); () = every method.")
    seeds: tuple[int, ...] = _h("Seeds of every row.")
    multi_seeds: tuple[int, ...] = _h("Seeds of the rows in multi_seed_rows (mean and std in the report).")
    multi_seed_rows: tuple[tuple[str, str], ...] = _h("(method, distribution) rows run with multi_seeds.")
    needs_model: bool = _h("The user must name the model with --set model=... (no default fits).")
    estimate: str = _h("Per-run size and time estimate, for the docs.")


# One place for the quick preset's sizes. A Natural Instructions example is about 140 tokens (Alpaca
# prompt + answer, cutoff 256); one run trains 4 rounds x 5 clients x 4 steps x 1 example = 80 examples
# and evaluates 24 answers (1 per unseen task, up to 16 new tokens; 90 % of NI references are shorter)
# at rounds 2 and 4. Measured with the grid alone on the 2-core machine: FedIT/homo 133-145 s per run,
# rows with rank-200 clients up to about 6 min, 29 NI rows in 1 h 50 min (2026-12-02); the 37 rows
# therefore take about 2 h 20 min. Timings taken while other jobs share the cores are several times
# longer (torch's threads spin-wait on each other).
QUICK_SIZES = (
    "rounds=4",
    "clients_per_round=5",
    "local_steps=4",
    "train.micro_batch_size=1",
    "train.lr=1e-3",
    "train.cutoff_len=256",
    "eval.every=2",
    "eval.max_tasks=0",
    "eval.max_examples_per_task=1",
    "eval.max_new_tokens=16",
    # Each client type's own evaluation would add up to 4 more generation passes per run;
    # --set eval.per_type=true turns it on.
    "eval.per_type=false",
)
# Dolly's references are long (median 38 tokens, 90 % under 95): 64 new tokens, and more answers
# per task since it holds out only two categories (2 x 12 = 24 answers per evaluation). Those
# answers cost more than NI's, so Dolly is evaluated once, after the last round (eval.every=0).
# Measured with the grid alone (2026-12-06): the 37 rows in 1 h 47 min, 113-264 s per row
# (FedIT/homo 125-138 s, FLoRA/uniform the longest), the base row 36 s.
QUICK_DATASET_SETS = {"dolly": ("eval.max_examples_per_task=12", "eval.max_new_tokens=64", "eval.every=0")}

_COMMON = ("eval.baseline=false",)  # the base model is evaluated once per data set, as its own row

SMOKE = Preset(
    name="smoke",
    description="every method once on the built-in demo tasks with builtin:tiny-llama, 2 rounds; about a "
                "minute on 2 cores (the test suite runs it)",
    datasets=("demo",),
    sets=(*_COMMON, "model=builtin:tiny-llama", "rounds=2", "num_clients=3", "clients_per_round=2",
          "local_steps=2", "data_options.max_per_task=4", "train.micro_batch_size=2", "train.lr=5e-3",
          "train.cutoff_len=64", "eval.every=1", "eval.max_tasks=2", "eval.max_examples_per_task=1",
          "eval.max_new_tokens=4", "lora.types=[[2, 4], [4, 8], [8, 16]]"),
    dataset_sets={},
    sgd_lr=5e-2,
    combo_distributions=("uniform",),
    het_distributions=("uniform",),
    rslora_distributions=("uniform",),
    remedy_distributions=("uniform",),
    largest_type=(8, 16),
    slora_stage1_rounds=1,
    robust_distributions=("uniform",),
    dp_epsilons=(8.0,),
    dp_clip_norm=1.0,
    methods=(),
    seeds=(0,),
    multi_seeds=(0,),
    multi_seed_rows=(),
    needs_model=False,
    estimate="tiny-llama, 3 clients (2 per round), 2 local steps of 2 examples, 2 eval answers of 4 tokens: "
             "a few seconds per run after the first (imports), about a minute for the grid",
)

# The rows whose differences the reading turns on: the paper's main comparison, and the remedies where
# most clients cannot hold the higher directions (heavy-tail-light), where rank collapse is strongest.
_MULTI_SEED_ROWS = (("FedIT", "homo"), ("FlexLoRA+FedIT", "uniform"), ("FlexLoRA+FedIT", "heavy-tail-light"),
                    ("FlexLoRA+FedIT server-memory", "heavy-tail-light"),
                    ("FlexLoRA+FedIT rank-partitioned", "heavy-tail-light"))

QUICK = Preset(
    name="quick",
    description="the paper's grid at CPU size: SmolLM2-135M-Instruct on Natural Instructions (one client per "
                "train task), 4 rounds of 5 clients, about 2-6 minutes per run on 2 cores",
    datasets=("ni",),
    sets=(*_COMMON, "model=builtin:smollm2-135m-instruct", *QUICK_SIZES),
    dataset_sets=QUICK_DATASET_SETS,
    sgd_lr=1e-1,
    combo_distributions=("uniform", "heavy-tail-light", "heavy-tail-strong", "normal"),
    het_distributions=("uniform", "heavy-tail-light"),
    rslora_distributions=("uniform", "heavy-tail-light"),
    remedy_distributions=("uniform", "heavy-tail-light"),
    largest_type=(200, 200),
    slora_stage1_rounds=1,
    robust_distributions=("uniform",),
    dp_epsilons=(2.0, 8.0),
    # The median of the five clients' norms in round 1 of ni/FlexLoRA+FedIT-clipped/uniform/s0 (1.79).
    dp_clip_norm=1.8,
    methods=(),
    seeds=(0,),
    multi_seeds=(0, 1, 2),
    multi_seed_rows=_MULTI_SEED_ROWS,
    needs_model=False,
    estimate="per run on ni: 4 rounds x 5 clients x 4 steps x 1 example = 80 training examples of about 140 "
             "tokens and two evaluations of 24 answers: 2-6 min alone on this 2-core machine; the grid (36 "
             "training rows and the base row) about 2 h 20 min. On dolly (256-token inputs, one evaluation of "
             "24 answers of 64 tokens) 2-4.5 min per run and 1 h 47 min per grid (measured alone)",
)

PAPER = Preset(
    name="paper",
    description="the paper's protocol for a GPU: your model (--set model=...), Natural Instructions and "
                "Dolly-15k, 5 percent of clients per round, the paper's four rank types, 1 local epoch of batch 4, "
                "cutoff 512, full evaluation",
    datasets=("ni", "dolly"),
    sets=(*_COMMON, "rounds=20", "clients_per_round=0.05", "local_steps=0", "train.epochs=1.0",
          "train.micro_batch_size=4", "train.cutoff_len=512", "eval.every=5", "eval.max_tasks=0",
          "eval.max_examples_per_task=0", "eval.max_new_tokens=64"),
    dataset_sets={"dolly": ("eval.max_new_tokens=128",)},
    sgd_lr=1e-1,
    combo_distributions=("uniform", "heavy-tail-light", "heavy-tail-strong", "normal"),
    het_distributions=("uniform", "heavy-tail-light"),
    rslora_distributions=("uniform", "heavy-tail-light"),
    remedy_distributions=("uniform", "heavy-tail-light"),
    largest_type=(200, 200),
    slora_stage1_rounds=2,
    robust_distributions=("uniform",),
    dp_epsilons=(8.0,),
    dp_clip_norm=1.0,
    methods=(),
    seeds=(0,),
    multi_seeds=(0, 1, 2),
    multi_seed_rows=_MULTI_SEED_ROWS,
    needs_model=True,
    estimate="per run: 20 rounds of 5 % of the clients, each one epoch over its data; on the full Natural "
             "Instructions (about 1,600 clients) that is 80 clients per round; not sized for a CPU",
)

# Client-level DP needs many clients per round: the noise on the average falls as 1 / m. This
# preset is the quick one (sizes, bound, epsilons) with 1,600 clients on Dolly-15k (9 examples each), 5 % (80) per round,
# FlexLoRA+FedIT with the bound alone against its DP rows.
DP_SCALE = replace(
    QUICK,
    name="dp-scale",
    description="client-level DP at scale: SmolLM2-135M on Dolly-15k split over 1,600 clients, 80 per round, "
                "FlexLoRA+FedIT bounded, with and without DP noise; about 10 minutes per run on 2 cores",
    datasets=("dolly",),
    dataset_sets={"dolly": (*QUICK_DATASET_SETS["dolly"], "num_clients=1600", "clients_per_round=0.05")},
    combo_distributions=("uniform",),
    het_distributions=(),
    rslora_distributions=(),
    remedy_distributions=(),
    methods=("FlexLoRA+FedIT", "FlexLoRA+FedIT clipped", "FlexLoRA+FedIT DP eps=2", "FlexLoRA+FedIT DP eps=8"),
    multi_seeds=(0,),
    multi_seed_rows=(),
    estimate="per run: 4 rounds x 80 clients x 4 steps x 1 example = 1,280 training examples and one "
             "evaluation of 24 answers of 64 tokens",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (SMOKE, QUICK, PAPER, DP_SCALE)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises
    ------
    BenchError
        Unknown name (the message lists the presets).
    """
    if name not in PRESETS:
        raise BenchError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------------------ grid
@dataclass(frozen=True)
class _Method:
    label: str
    sets: Callable[[Preset], tuple[str, ...]]
    distributions: Callable[[Preset], tuple[str, ...]]


_ADAMW = "train.optimizer=adamw"


def _sgd(p: Preset) -> tuple[str, ...]:
    return ("train.optimizer=sgd", f"train.lr={p.sgd_lr!r}")


def _slora(p: Preset, then: str) -> tuple[str, ...]:
    return ("aggregator=slora", f"slora.then={then}", f"slora.stage1_rounds={p.slora_stage1_rounds}", _ADAMW)


def _homo(p: Preset) -> tuple[str, ...]:
    return ("homo",)


DP_DELTA = 1e-4
"""The delta of the grid's DP rows (below 1 / N for every data set here: N <= 1,600)."""

# The bound of the robust and DP rows: no hand-set C, the median of the clients' norms tracked
# from 1.0 (Andrew et al., NeurIPS 2021). The DP rows draw their noise from the row's seed, so a
# row repeats exactly (privacy.reproducible: a benchmark, not a private deployment).
_BOUNDED = ("aggregator=flexlora", "train.optimizer=adamw", "privacy.clip_norm=1.0", "privacy.adaptive_quantile=0.5")


def _dp(epsilon: float) -> Callable[[Preset], tuple[str, ...]]:
    # A fixed bound: an adaptive one under DP spends budget on its noisy count, which a round of a
    # few clients cannot afford, and over 4 rounds it moves by at most exp(0.4) anyway.
    return lambda p: ("aggregator=flexlora", "train.optimizer=adamw", f"privacy.clip_norm={p.dp_clip_norm!r}",
                      f"privacy.target_epsilon={epsilon!r}", f"privacy.delta={DP_DELTA!r}", "privacy.reproducible=true")


def _dp_distributions(epsilon: float) -> Callable[[Preset], tuple[str, ...]]:
    return lambda p: p.robust_distributions if epsilon in p.dp_epsilons else ()


# The paper's rows (Tables 2-4) and this project's additions, in the report's order.
METHODS: tuple[_Method, ...] = (
    _Method("FedAvg", lambda p: ("aggregator=fedavg", *_sgd(p)), _homo),
    _Method("FedIT", lambda p: ("aggregator=fedit", _ADAMW), _homo),
    _Method("SLoRA", lambda p: _slora(p, "fedit"), _homo),
    _Method("FlexLoRA+FedAvg", lambda p: ("aggregator=flexlora", *_sgd(p)), lambda p: p.combo_distributions),
    _Method("FlexLoRA+FedIT", lambda p: ("aggregator=flexlora", _ADAMW), lambda p: p.combo_distributions),
    _Method("FlexLoRA+SLoRA", lambda p: _slora(p, "flexlora"), lambda p: p.combo_distributions),
    _Method("HetLoRA", lambda p: ("aggregator=hetlora", _ADAMW), lambda p: p.het_distributions),
    _Method("FLoRA", lambda p: ("aggregator=flora", _ADAMW), lambda p: p.het_distributions),
    _Method("FlexLoRA+FedIT rsLoRA", lambda p: ("aggregator=flexlora", _ADAMW, "lora.rslora=true"),
            lambda p: p.rslora_distributions),
    # Beyond the paper: FlexLoRA with a rank-collapse remedy (flexlora.core.aggregators.flexlora).
    _Method("FlexLoRA+FedIT server-memory",
            lambda p: ("aggregator=flexlora", _ADAMW, 'flexlora.remedy="server-memory"'),
            lambda p: p.remedy_distributions),
    _Method("FlexLoRA+FedIT rank-partitioned",
            lambda p: ("aggregator=flexlora", _ADAMW, 'flexlora.remedy="rank-partitioned"'),
            lambda p: p.remedy_distributions),
    # Reference: every client at the largest type, the upper end FlexLoRA's heterogeneous rows aim at.
    _Method("FedIT rich", lambda p: ("aggregator=fedit", _ADAMW, f"lora.types=[[{p.largest_type[0]}, "
                                     f"{p.largest_type[1]}]]"), _homo),
    # Beyond the paper: each client's contribution bounded ([privacy]), and client-level DP.
    _Method("FlexLoRA+FedIT clipped", lambda p: _BOUNDED, lambda p: p.robust_distributions),
    *(_Method(f"FlexLoRA+FedIT DP eps={e:g}", _dp(e), _dp_distributions(e)) for e in (2.0, 8.0)),
)
METHOD_ORDER: tuple[str, ...] = (BASE_METHOD, *(m.label for m in METHODS))
"""Every method label in the report's row order."""


def grid_rows(preset: Preset | str, datasets: Sequence[str] | None = None) -> list[Row]:
    """Every row of ``preset`` on ``datasets`` (default: the preset's), base rows first per data set.

    Parameters
    ----------
    preset : Preset or str
    datasets : sequence of str, optional
        Data set names (keys of :data:`DATASETS`).

    Returns
    -------
    list of Row

    Raises
    ------
    BenchError
        An unknown preset or data set name.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    names = list(datasets) if datasets is not None else list(p.datasets)
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise BenchError(f"unknown data set {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    multi = set(p.multi_seed_rows)
    rows: list[Row] = []
    for ds in names:
        rows.append(base_row(ds))
        for m in METHODS:
            if p.methods and m.label not in p.methods:
                continue
            for dist in m.distributions(p):
                seeds = p.multi_seeds if (m.label, dist) in multi else p.seeds
                for seed in seeds:
                    sets = (*m.sets(p), f"rank_distribution={dist}", f"seed={seed}")
                    rows.append(Row(row_id(ds, m.label, dist, seed), m.label, dist, ds, seed, sets))
    return rows

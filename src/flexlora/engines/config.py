"""The run configuration: dataclasses whose fields carry their help text, loaded from TOML or
YAML, overridden with ``--set key=value``, and validated with messages that name the key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.methods.privacy import PrivacyOptions
from flexlora.settings import ConfigError, check_types, field_default, non_defaults, setting

__all__ = ["ConfigError", "RunConfig", "describe", "from_dict", "load_config", "parse_override", "to_toml",
           "validate"]


_f = setting


@dataclass
class TrainSection:
    """Local training of each sampled client."""

    optimizer: str = _f("adamw", "Local optimizer: 'adamw' (FedIT) or 'sgd' (FedAvg).", choices=("adamw", "sgd"))
    lr: float = _f(1e-3, "Peak learning rate of local training.")
    weight_decay: float = _f(0.0, "Weight decay of the local optimizer.")
    momentum: float = _f(0.0, "SGD momentum (sgd only).")
    micro_batch_size: int = _f(4, "Examples per forward/backward pass.")
    grad_accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    epochs: float = _f(0.0, "Local epochs per round; used when local_steps is 0.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler: str = _f("constant", "Within-round schedule: constant, linear or cosine.",
                           choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "Linear warm-up steps at the start of each local round.")
    cutoff_len: int = _f(256, "Maximum tokens per training example (prompt + answer).")
    train_on_inputs: bool = _f(False, "Also compute the loss on prompt tokens (default: response only).")
    template: str = _f("alpaca", "Prompt template: 'alpaca' (the paper's), 'chat' (the model's chat template) "
                       "or 'plain'.", choices=("alpaca", "chat", "plain"))


@dataclass
class LoraSection:
    """LoRA settings shared by all clients (ranks come from the client types)."""

    alpha: float = _f(16.0, "LoRA alpha of every client type (scaling alpha / r, or alpha / sqrt(r) with rslora).")
    rslora: bool = _f(False, "rsLoRA: scale updates by alpha / sqrt(r) instead of alpha / r in training, "
                      "aggregation and the exported adapter (PEFT's use_rslora), so high-rank clients are not "
                      "scaled down against low-rank ones.")
    dropout: float = _f(0.0, "LoRA dropout during local training.")
    init: str = _f("shared", "How clients start when there is no global adapter yet (round 1, and every FLoRA "
                   "round): 'shared' = every client of the round draws the same fresh adapter from the run's "
                   "seed (what averaging factors needs; FedIT's reference code does the same); 'per-client' = "
                   "each client draws its own (PEFT's initialisation seeded per client), so a product "
                   "aggregator (flexlora, flora) starts round 2 from a global spanning up to the sum of the "
                   "clients' ranks. 'per-client' is refused for the factor-averaging aggregators (fedavg, fedit, "
                   "hetlora); slora's stage 2 starts from its stage-1 SVD either way.",
                   choices=("shared", "per-client"))
    targets: str = _f("all", "Adapted modules: 'all' (attention and MLP projections), 'attention' or 'mlp'.",
                      choices=("all", "attention", "mlp"))
    types: list = _f([], "Custom client types as [[attention_rank, mlp_rank], ...], smallest first; "
                     "empty = the paper's four types (8/8, 30/30, 30/200, 200/200).")
    ranks: list = _f([], "Explicit per-client ranks (int or [attention, mlp] per client); overrides "
                     "rank_distribution when given.")


@dataclass
class DataSection:
    """How data is split into clients and prompted."""

    partition: str = _f("natural", "Client partition: natural (one task or category per client), dirichlet, iid.",
                        choices=("natural", "dirichlet", "iid"))
    dirichlet_alpha: float = _f(0.5, "Concentration of the Dirichlet partition (smaller = more skewed).")
    max_per_task: int = _f(0, "Cap on training examples per task (0 = no cap).")
    unseen_tasks: list = _f([], "Held-out task names for zero-shot evaluation (loader default when empty).")
    # The field names of a generic JSON/JSONL `data` file; the defaults are the generic loader's
    # (flexlora.data.JSONL_FIELD_DEFAULTS), and only changed ones are passed on.
    task_field: str = _f("task", "JSON/JSONL data: the record field naming each record's task (one client per task "
                         "with the natural partition); \"\" puts every record in one task named after the file. "
                         "Setting any *_field reads a JSON file with the generic loader, also one in Dolly's format.")
    instruction_field: str = _f("instruction", "JSON/JSONL data: the record field holding the instruction.")
    input_field: str = _f("input", "JSON/JSONL data: the optional record field holding the input (context); "
                          "\"\" = none.")
    output_field: str = _f("output", "JSON/JSONL data: the record field holding the answer (a string or a list "
                           "of acceptable strings).")
    id_field: str = _f("id", "JSON/JSONL data: the record field holding a unique id; \"\" (or a record without "
                       "it) = '<file stem>-<line>'.")


@dataclass
class EvalSection:
    """Evaluation of the global model on unseen tasks."""

    data: str = _f("", "A separate data set to evaluate on instead of the held-out tasks of `data` (empty = those): "
                   "a natural-instructions directory (its test tasks), a Dolly or generic JSON/JSONL file (every "
                   "task in it) or builtin:demo-tasks (its unseen tasks). The limits below apply to it too.")
    task_field: str = _f("task", "Like data_options.task_field, for a generic JSON/JSONL eval.data file.")
    instruction_field: str = _f("instruction", "Like data_options.instruction_field, for eval.data.")
    input_field: str = _f("input", "Like data_options.input_field, for eval.data.")
    output_field: str = _f("output", "Like data_options.output_field, for eval.data.")
    id_field: str = _f("id", "Like data_options.id_field, for eval.data.")
    every: int = _f(2, "Evaluate every k rounds (the last round is always evaluated); 0 = only at the end.")
    baseline: bool = _f(True, "Evaluate the base model (round 0) before training.")
    per_type: bool = _f(True, "After the last round, also evaluate the global model at each client type's ranks "
                        "(what each type receives).")
    max_tasks: int = _f(0, "Cap on unseen tasks evaluated (0 = all).")
    max_examples_per_task: int = _f(8, "Cap on examples per unseen task (0 = all).")
    max_new_tokens: int = _f(24, "Tokens generated per answer (greedy).")
    stem: bool = _f(False, "Porter-stem words before Rouge-L, as the Natural Instructions metric does "
                    "(rouge-score's use_stemmer): 'answers' then matches 'answer'. Off by default, the "
                    "setting every recorded figure of this project used.")
    batch_size: int = _f(16, "Prompts per generation batch.")
    loss_batch_size: int = _f(8, "Examples per batch for the eval loss.")


@dataclass
class ExportSection:
    """What is written at the end of a run."""

    rank: int = _f(0, "Rank of the exported PEFT adapter (0 = the largest client rank).")
    merged: bool = _f(False, "Also write the merged model (base + adapter) to run_dir/merged.")


@dataclass
class FlowerSection:
    """Settings of the Flower engine only (not part of the run's identity: a run may resume with other values)."""

    num_supernodes: int = _f(0, "flower-sim: virtual SuperNodes of the Ray simulation (0 = num_clients).")
    round_timeout: float = _f(600.0, "Seconds the server waits for a round's replies; later ones are dropped.")
    wire_dtype: str = _f("float32", "Dtype of the factors on the wire: float32 (exact) or float16 (half the bytes).",
                         choices=("float32", "float16"))
    wait_for_nodes: float = _f(120.0, "Seconds the server waits at start-up for every client's node to connect; "
                               "it then starts with the nodes it has when at least min_clients are there.")
    client_cpus: float = _f(1.0, "flower-sim: CPUs Ray reserves per virtual SuperNode.")
    fold_order: str = _f("task", "Order in which the server folds a round's replies into the aggregate: task (the "
                         "tasks' order; an early reply waits for the earlier tasks' replies, and the numbers equal the "
                         "in-process engine's bit for bit) or arrival (each reply as it comes: at most one update held "
                         "at a time; equal to float32 accuracy).", choices=("task", "arrival"))


@dataclass
class RunConfig:
    """A federated fine-tuning run (the `flexlora run` configuration)."""

    model: str = _f("builtin:smollm2-135m-instruct", "Base model: builtin:smollm2-135m-instruct, builtin:tiny-llama, "
                    "a local model directory, a .gguf file, or a hub id (online).")
    data: str = _f("builtin:demo-tasks", "Data: builtin:demo-tasks, a natural-instructions directory, a Dolly-15k "
                   "JSONL (or databricks/databricks-dolly-15k online), or a generic JSON/JSONL file.")
    aggregator: str = _f("flexlora", "The federated method: flexlora, fedit (fedavg), hetlora, flora, slora (or a "
                         "registered one); its settings are the section of its name, e.g. [flexlora].")
    rank_distribution: str = _f("uniform", "Client resource distribution: homo, uniform, heavy-tail-light, "
                                "heavy-tail-strong, normal.")
    num_clients: int = _f(0, "Number of clients (0 = one per task of the data).")
    clients_per_round: float = _f(0.2, "Clients sampled per round: below 1 a fraction of all clients "
                                  "(at least one), from 1 up a count (capped at num_clients).")
    rounds: int = _f(4, "Federated rounds.")
    local_steps: int = _f(8, "Optimizer steps per client per round (0 = use train.epochs).")
    min_clients: int = _f(1, "Fewest valid client updates a round needs. Missing, failed or rejected replies are "
                          "dropped from their round; below this number the run stops with an error and its last "
                          "checkpoint intact.")
    seed: int = _f(0, "Seed of everything: partition, rank assignment, sampling, training.")
    device: str = _f("auto", "Torch device: auto, cpu, cuda, cuda:1, mps.")
    dtype: str = _f("float32", "Base model dtype: float32, bfloat16 or float16.",
                    choices=("float32", "bfloat16", "float16"))
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "Local training."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA settings."})
    data_options: DataSection = field(default_factory=DataSection, metadata={"help": "Data partition."})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "Evaluation."})
    export: ExportSection = field(default_factory=ExportSection, metadata={"help": "Exports."})
    flower: FlowerSection = field(default_factory=FlowerSection, metadata={"help": "Flower engine."})
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions,
                                    metadata={"help": "Bounds on each client's contribution."})
    method_options: dict = field(default_factory=dict, metadata={
        "help": "The method's settings sections ({section name: options}); in a file, the section of the "
                "method's name ([flexlora], [hetlora], [slora], ...).", "sections": True})

    def __post_init__(self) -> None:
        validate(self)

    def options(self, section: str | None = None) -> Any:
        """The options of ``section`` (default: the method's own, named like ``aggregator``)."""
        from flexlora.methods import method_class

        return self.method_options[section or method_class(self.aggregator).name]

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the method's sections appear as top-level tables named after them."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "method_options"}
        for k, v in d.items():
            if dataclasses.is_dataclass(v):
                d[k] = dataclasses.asdict(v)
        for name, opts in self.method_options.items():
            d[name] = dataclasses.asdict(opts)
        return d


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: RunConfig) -> None:
    """Check types, choices and ranges of every field; raise :class:`ConfigError` naming the key."""
    _check_types(cfg, "")
    from flexlora.core.distributions import available_distributions
    from flexlora.methods import method_class

    method = method_class(cfg.aggregator)
    cfg.method_options = method_sections(cfg.aggregator, cfg.method_options)
    own = cfg.method_options[method.name]
    if cfg.rank_distribution not in available_distributions():
        _fail("rank_distribution", f"unknown distribution {cfg.rank_distribution!r}; "
              f"choose one of {available_distributions()}")
    if cfg.num_clients < 0:
        _fail("num_clients", "must be >= 0 (0 = one client per task)")
    cpr = cfg.clients_per_round
    if not (0 < cpr < 1 or (cpr >= 1 and float(cpr).is_integer())):
        _fail("clients_per_round", f"must be a fraction in (0, 1) or a whole count >= 1, got {cpr!r}")
    if cfg.min_clients < 1:
        _fail("min_clients", "must be >= 1")
    fl = cfg.flower
    if fl.num_supernodes < 0:
        _fail("flower.num_supernodes", "must be >= 0 (0 = num_clients)")
    if not fl.round_timeout > 0 or not fl.wait_for_nodes >= 0 or not fl.client_cpus > 0:
        _fail("flower", "round_timeout and client_cpus must be > 0, wait_for_nodes >= 0")
    if cfg.rounds < 1:
        _fail("rounds", "must be >= 1")
    if cfg.local_steps < 0:
        _fail("local_steps", "must be >= 0")
    if cfg.local_steps == 0 and cfg.train.epochs <= 0:
        _fail("local_steps", "is 0, so train.epochs must be > 0")
    t = cfg.train
    for key, v, lo in (("train.lr", t.lr, 0.0), ("train.micro_batch_size", t.micro_batch_size, 1),
                       ("train.grad_accum_steps", t.grad_accum_steps, 1), ("train.cutoff_len", t.cutoff_len, 8)):
        if not v >= lo or (key == "train.lr" and v <= 0):
            _fail(key, f"must be {'> 0' if key == 'train.lr' else f'>= {lo}'}, got {v!r}")
    if t.max_grad_norm < 0 or t.weight_decay < 0 or t.warmup_steps < 0:
        _fail("train", "max_grad_norm, weight_decay and warmup_steps must be >= 0")
    if cfg.lora.alpha <= 0:
        _fail("lora.alpha", "must be > 0")
    agg = cfg.aggregator.lower()
    if cfg.lora.init == "per-client" and method.averages_factors:
        _fail("lora.init", f"'per-client' with aggregator {agg!r} would average independent random A matrices "
              "(it averages the factors, not their products); use lora.init='shared', or an aggregator of "
              "products (flexlora, flora)")
    if not 0 <= cfg.lora.dropout < 1:
        _fail("lora.dropout", "must be in [0, 1)")
    for key, entries in (("lora.types", cfg.lora.types), ("lora.ranks", cfg.lora.ranks)):
        if any(isinstance(x, bool) for r in entries for x in (r if isinstance(r, list) else [r])):
            _fail(key, "ranks must be positive ints, not true/false")
    for i, r in enumerate(cfg.lora.types):
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 1 for x in r)):
            _fail("lora.types", f"entry {i} must be [attention_rank, mlp_rank] of positive ints, got {r!r}")
    for i, r in enumerate(cfg.lora.ranks):
        ok = (isinstance(r, int) and r >= 1) or (
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 1 for x in r))
        if not ok:
            _fail("lora.ranks", f"entry {i} must be a positive int or [attention, mlp], got {r!r}")
    if [tuple(t) for t in cfg.lora.types] != sorted(tuple(t) for t in cfg.lora.types):
        # The distributions index the types by size ("homo" = the first, heavy tails weigh the ends).
        _fail("lora.types", f"list the types smallest first, got {cfg.lora.types!r}")
    if cfg.lora.ranks and method.homogeneous(own):
        distinct = {(r, r) if isinstance(r, int) else tuple(r) for r in cfg.lora.ranks}
        if len(distinct) > 1:
            _fail("lora.ranks", f"aggregator {cfg.aggregator!r} averages factors entrywise, so every client needs the "
                  f"same ranks, got {sorted(distinct)}; use one rank, or a heterogeneous aggregator (flexlora, "
                  "hetlora, flora)")
    if cfg.seed < 0:
        _fail("seed", f"must be >= 0, got {cfg.seed}")
    t = cfg.train
    if t.momentum and t.optimizer != "sgd":
        _fail("train.momentum", f"applies to optimizer 'sgd' only (the optimizer is {t.optimizer!r}); leave it at 0")
    if not 0 <= t.momentum < 1:
        _fail("train.momentum", f"must be in [0, 1), got {t.momentum!r}")
    if cfg.lora.ranks and cfg.num_clients and len(cfg.lora.ranks) != cfg.num_clients:
        _fail("lora.ranks", f"gives {len(cfg.lora.ranks)} ranks but num_clients is {cfg.num_clients}")
    if cfg.data_options.dirichlet_alpha <= 0:
        _fail("data_options.dirichlet_alpha", "must be > 0")
    if not all(isinstance(t, str) and t.strip() for t in cfg.data_options.unseen_tasks):
        _fail("data_options.unseen_tasks", f"must be a list of task names (strings), got {cfg.data_options.unseen_tasks!r}")
    if cfg.data_options.max_per_task < 0:
        _fail("data_options.max_per_task", "must be >= 0 (0 = no cap)")
    for section, sec in (("data_options", cfg.data_options), ("eval", cfg.eval)):
        for key in ("instruction_field", "output_field"):
            # Unlike task/input/id, these fields cannot be absent, so "" (none) has no meaning.
            if not getattr(sec, key).strip():
                _fail(f"{section}.{key}", "must name a record field (it is required in every record)")
    e = cfg.eval
    for key, v in (("eval.every", e.every), ("eval.max_tasks", e.max_tasks),
                   ("eval.max_examples_per_task", e.max_examples_per_task)):
        if v < 0:
            _fail(key, "must be >= 0")
    for key, v in (("eval.max_new_tokens", e.max_new_tokens), ("eval.batch_size", e.batch_size),
                   ("eval.loss_batch_size", e.loss_batch_size)):
        if v < 1:
            _fail(key, "must be >= 1")
    if cfg.export.rank < 0:
        _fail("export.rank", "must be >= 0 (0 = the largest client rank)")
    cfg.privacy.check()
    refusal = method.unbounded_contributions(own) if cfg.privacy.enabled else None
    if refusal:
        _fail("privacy.clip_norm", f"aggregator {cfg.aggregator!r} cannot bound its clients' contributions: "
              f"{refusal}; leave privacy.clip_norm at 0, or use flexlora, fedit, hetlora or flora")
    refusal = method.dp_refusal(own) if cfg.privacy.dp else None
    if refusal:
        key = "privacy.target_epsilon" if cfg.privacy.target_epsilon else "privacy.noise_multiplier"
        _fail(key, f"aggregator {cfg.aggregator!r} cannot run with differential privacy: {refusal}; use flexlora, "
              "fedit or flora")


def _check_types(cfg: RunConfig, prefix: str) -> None:
    # The method sections are checked against their own dataclasses when they are built.
    if not isinstance(cfg.method_options, dict):
        _fail("method_options", f"must map section names to options, got {type(cfg.method_options).__name__}")
    check_types(cfg, prefix)


def method_sections(aggregator: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options sections a run of ``aggregator`` reads: those in ``given`` (section name ->
    options dataclass), defaults for the rest; sections of other methods are dropped."""
    from flexlora.methods import method_class

    cls = method_class(aggregator)
    own = given.get(cls.name)
    if own is None:
        own = cls.Options()
    out = {}
    for name in cls.sections(own):
        opts = own if name == cls.name else given.get(name)
        out[name] = opts if opts is not None else method_class(name).Options()
    for name, opts in out.items():
        if not isinstance(opts, method_class(name).Options):
            _fail(name, f"must be a {method_class(name).Options.__name__}, got {type(opts).__name__}")
    return out


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


def _known_top_keys() -> list[str]:
    from flexlora.methods import available_methods

    return [k for k in _known_keys(RunConfig) if k != "method_options"] + available_methods()


def _known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


# Keys of configs written before the methods had their own sections (every config.toml of an
# older run holds them): read into the section they now belong to.
_LEGACY_TRAIN_KEYS = {"hetlora_strength": "strength", "hetlora_gamma": "gamma", "hetlora_prune": "prune",
                      "hetlora_prune_threshold": "prune_threshold", "hetlora_min_rank": "min_rank"}
_LEGACY_BATCH = {True: "always", False: "never"}


def _translate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """``train.hetlora_*`` into ``[hetlora]`` and ``aggregator_options`` into the method's section
    (for slora: its stage 2's); a key given in the section itself wins."""
    from flexlora.methods import method_class

    data = dict(data)
    agg = data.get("aggregator", RunConfig.__dataclass_fields__["aggregator"].default)
    if not isinstance(agg, str):
        return data  # the type check names the key
    train = data.get("train")
    if isinstance(train, dict) and any(k in _LEGACY_TRAIN_KEYS for k in train):
        train = dict(train)
        moved = {_LEGACY_TRAIN_KEYS[k]: train.pop(k) for k in list(train) if k in _LEGACY_TRAIN_KEYS}
        data["train"] = train
        if method_class(agg).name == "hetlora":
            section = data.get("hetlora", {})
            if isinstance(section, dict):
                data["hetlora"] = {**moved, **section}
    if "aggregator_options" in data:
        legacy = data.pop("aggregator_options")
        if not isinstance(legacy, dict):
            raise ConfigError(f"config key 'aggregator_options': must be a table of settings, got {legacy!r}")
        bad = [k for k in legacy if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"config key 'aggregator_options': setting names must be strings, got {bad!r}")
        target = method_class(agg).name
        if target == "slora":
            slora = data.get("slora")
            target = method_class(slora.get("then", "fedit") if isinstance(slora, dict) else "fedit").name
        legacy = {k: _LEGACY_BATCH.get(v, v) if k == "batch_modules" and isinstance(v, bool) else v
                  for k, v in legacy.items()}
        if legacy:
            section = data.get(target, {})
            if isinstance(section, dict):
                data[target] = {**legacy, **section}
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested plain values; unknown keys are errors.

    A method's settings are the section of its name (``[flexlora]``); a section of another
    method than the run's is refused unless it holds only defaults (older config.toml files list
    every section). The keys of older configs (``aggregator_options``, ``train.hetlora_*``) are
    read into their sections.
    """
    from flexlora.methods import method_class, options_of

    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a table of settings, got {type(data).__name__}")
    data = _translate_legacy(data)
    sections = _section_types()
    kwargs: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': must be a table of settings, got {value!r}")
            sub_known = _known_keys(sections[key])
            for sk in value:
                if sk not in sub_known:
                    raise _unknown(f"{key}.{sk}", sub_known)
            kwargs[key] = sections[key](**value)
        elif key in _known_top_keys() and key not in _known_keys(RunConfig):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': must be a table of settings (the options of method "
                                  f"{key!r}), got {value!r}")
            given[method_class(key).name] = (key, value)
        elif key in _known_top_keys():
            kwargs[key] = value
        else:
            raise _unknown(key, _known_top_keys())
    agg = kwargs.get("aggregator", RunConfig.__dataclass_fields__["aggregator"].default)
    if not isinstance(agg, str):
        _fail("aggregator", f"must be str, got {type(agg).__name__} {agg!r}")
    cls = method_class(agg)
    own_key, own_values = given.get(cls.name, (cls.name, {}))
    own = options_of(cls, own_values, f"{own_key}.")
    needed = cls.sections(own)
    options: dict[str, Any] = {cls.name: own}
    for name, (key, values) in given.items():
        if name == cls.name:
            continue
        opts = options_of(method_class(name), values, f"{key}.")
        if name in needed:
            options[name] = opts
        elif non_defaults(opts):
            raise ConfigError(f"config key '{key}': section [{key}] holds the settings of method {key!r}, but "
                              f"aggregator = {agg!r} does not read them; remove the section, or set "
                              f"aggregator = {key!r}")
    kwargs["method_options"] = options
    return RunConfig(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are read as TOML values
    (numbers, booleans, arrays, quoted strings); anything else is a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config, apply ``--set`` overrides, validate.

    Raises
    ------
    ConfigError
        For a missing or unreadable file, a syntax error (with the parser's position), an
        unknown key, or a value of the wrong type or range.
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a directory; give a .toml or .yaml file")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc}); save the config as UTF-8") from exc
        suffix = p.suffix.lower()
        if suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
        elif suffix in (".yaml", ".yml"):
            data = _load_yaml(p, text)
        else:
            raise ConfigError(f"{p}: unknown config format {p.suffix!r}; use .toml, .yaml or .yml")
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the config must be a table of settings (key: value lines), got "
                              f"{type(data).__name__} {data!r:.60}")
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a table")
        node[parts[-1]] = value
    return from_dict(data)


def _load_yaml(p: Path, text: str) -> Any:
    """YAML with the checks TOML makes itself: a key given twice, or a key that is not text, is an error."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"{p}, line {line}: key {key!r} is not a name; quote it or fix the line")
            if key in out:
                raise ConfigError(f"{p}, line {line}: key {key!r} is given twice; keep one")
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    # PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; YAML 1.2 and TOML read it as the
    # number every user means (`lr: 3e-4`).
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    return {} if data is None else data


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text (top-level keys first, then one table per section)."""
    d = cfg.to_dict()
    lines: list[str] = []
    tables = []
    for k, v in d.items():
        if isinstance(v, dict) and (k in _section_types() or k in cfg.method_options):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        # TOML basic strings: backslash, quote and control characters must be escaped.
        return '"' + "".join(
            "\\\\" if c == "\\" else '\\"' if c == '"' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
            else c for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def describe() -> str:
    """Every key with its default and help text (``flexlora config``), then each registered
    method's own section."""
    from flexlora.methods import available_methods, method_class

    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("sections"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            choices = f.metadata.get("choices")
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            out.append(f"{prefix}{f.name} = {_toml_value(field_default(f))}\n    {f.metadata.get('help', '')}{extra}")

    walk(RunConfig, "")
    seen = set()
    for name in available_methods():
        cls = method_class(name)
        if cls in seen:
            continue
        seen.add(cls)
        aliases = [n for n in available_methods() if method_class(n) is cls and n != cls.name]
        also = f" (also aggregator = {', '.join(repr(a) for a in aliases)})" if aliases else ""
        out.append(f"\n[{cls.name}]: settings of aggregator = {cls.name!r}{also}. "
                   f"{(cls.Options.__doc__ or '').strip()}")
        walk(cls.Options, f"{cls.name}.")
    return "\n".join(out)

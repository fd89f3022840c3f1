"""Per-client LoRA adapters on one shared base model.

A federated round trains many clients one after another on the same frozen base model. Each
client gets its own PEFT LoRA adapter at ITS OWN per-module ranks (:func:`attach_adapter`), the
server's factors are copied in (:func:`set_factors`), the client trains, its factors are read back
(:func:`get_factors`) and the adapter is removed again (:func:`detach_adapter`), leaving the base
exactly as it was for the next client. :func:`client_adapter` wraps the cycle in a context manager.

Factors follow :mod:`flexlora.core.types`: ``{module_name: (A, B)}`` keyed by the base model's
module name (as in ``base_model.named_modules()``), ``A: (r, in_features)``,
``B: (out_features, r)``, effective update ``(alpha / r) * B @ A``, or ``(alpha / sqrt(r)) * B @ A``
with rsLoRA (``rslora=True``, peft's ``use_rslora``).

Name matching in peft
---------------------
peft matches a ``target_modules`` *list* entry ``t`` against a module name ``k`` by
``k == t or k.endswith("." + t)``, and a ``rank_pattern`` key ``p`` by the regex
``re.match(rf"(.*\\.)?({p})$", k)``. Plain module names are therefore unsafe keys: their dots are
regex wildcards, and a name is also a suffix of any module nested under a longer prefix (for
instance ``vision.model.layers.1.self_attn.q_proj``). :func:`rank_pattern_key` escapes the name
and anchors it with ``^`` so that it matches exactly one module, and :func:`target_modules_spec`
falls back to a full-match regex when a plain list would over-match. After injection,
:func:`attach_adapter` verifies the wrapped modules, their ranks and their scalings.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from flexlora.core.types import Factors, lora_scaling

__all__ = [
    "attach_adapter",
    "check_ranks",
    "client_adapter",
    "detach_adapter",
    "get_factors",
    "linear_shapes",
    "merged_weight",
    "live_factors",
    "rank_pattern_key",
    "set_factors",
    "target_modules_spec",
]

# Attribute under which attach_adapter stores what detach_adapter must restore on the base.
_SAVED_STATE_ATTR = "_flexlora_base_state"


def merged_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` in ``weight``'s dtype and device, rounded once: the sum is formed in
    float32 (adding a delta already rounded to bf16/fp16 would round twice)."""
    return (weight.to(torch.float32) + delta.to(weight.device, torch.float32)).to(weight.dtype)


def rank_pattern_key(module_name: str) -> str:
    """Key for peft's ``rank_pattern`` that matches ``module_name`` and no other module.

    peft tests a key ``p`` with ``re.match(rf"(.*\\.)?({p})$", name)``. Escaping turns the dots
    into literals, and the leading ``^`` fails whenever the optional prefix group consumed
    anything, so only the exact name matches (not ``x.<name>``, and not
    ``model.layers.11...`` for ``model.layers.1...``).
    """
    return "^" + re.escape(module_name) + "$"


def target_modules_spec(targets: Iterable[str], all_module_names: Iterable[str]) -> list[str] | str:
    """Value for ``LoraConfig.target_modules`` that selects exactly ``targets``.

    A sorted list of names when peft's suffix matching cannot hit any other module (readable in
    ``adapter_config.json``); otherwise a regex that peft full-matches against each name.
    """
    wanted = sorted(set(targets))
    wanted_set = set(wanted)
    suffixes = {"." + t for t in wanted}
    for name in all_module_names:
        if name in wanted_set:
            continue
        # Only the suffix after some dot can collide, so test each dot-suffix of the name.
        pos = name.find(".")
        while pos != -1:
            if name[pos:] in suffixes:
                return "(?:" + "|".join(re.escape(t) for t in wanted) + ")"
            pos = name.find(".", pos + 1)
    return wanted


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return None


def linear_shapes(base_model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each named ``nn.Linear`` of ``base_model``.

    Raises
    ------
    ValueError
        A name the model does not have, or a module that is not an ``nn.Linear``.
    """
    modules = dict(base_model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"module {name!r}: the base model has no module of that name")
        dims = _linear_dims(modules[name])
        if dims is None:
            raise ValueError(f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
        shapes[name] = dims
    return shapes


def check_ranks(base_model: nn.Module, ranks: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Check a client's per-module ranks against ``base_model``; return each module's ``(out, in)``.

    Raises
    ------
    ValueError
        No ranks, a module missing or not an ``nn.Linear``, or a rank that is not a positive int
        of at most ``min(out, in)``.
    """
    if not ranks:
        raise ValueError("ranks is empty: give a LoRA rank for at least one module")
    shapes = linear_shapes(base_model, ranks)
    for name, r in ranks.items():
        dims = shapes[name]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"module {name!r}: rank must be a positive int, got {r!r}")
        if r > min(dims):
            raise ValueError(
                f"module {name!r}: rank {r} exceeds min(out, in) = {min(dims)} of its {dims[0]} x {dims[1]} "
                "weight; cap it (ClientType.module_ranks caps a type's ranks at each module's min(out, in))"
            )
    return shapes


def _lora_layers(peft_model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """LoRA-wrapped layers of a peft model, keyed by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    inner = _base_of(peft_model)
    name = adapter_name if adapter_name is not None else _active_adapter(peft_model)
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _base_of(peft_model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel -> the user's base model; names below it are the base's names.
    try:
        return peft_model.base_model.model
    except AttributeError as exc:
        raise TypeError(f"expected a peft.PeftModel with a LoRA adapter, got {type(peft_model).__name__}") from exc


def _active_adapter(peft_model: nn.Module) -> str:
    active = getattr(peft_model, "active_adapter", "default")
    if isinstance(active, list | tuple):
        if len(active) != 1:
            raise ValueError(f"expected one active adapter, got {active}")
        active = active[0]
    return str(active)


def attach_adapter(
    base_model: nn.Module,
    ranks: Mapping[str, int],
    alpha: float,
    *,
    dropout: float = 0.0,
    adapter_name: str = "default",
    rslora: bool = False,
):
    """Wrap ``base_model`` in a PEFT LoRA adapter with per-module ranks.

    Module ``m`` gets rank ``ranks[m]`` and scaling ``alpha / ranks[m]`` (``alpha / sqrt(ranks[m])``
    with ``rslora``, peft's ``use_rslora``). New factors use peft's
    standard initialisation (``A`` Kaiming-uniform, ``B`` zero, so the update starts at zero)
    drawn from the global torch RNG: seed it before calling for reproducible clients.

    Parameters
    ----------
    base_model : nn.Module
        The shared causal LM. It is modified in place (LoRA layers are inserted) until
        :func:`detach_adapter` is called.
    ranks : mapping of str to int
        Base-model module name (``model.layers.0.self_attn.q_proj``) -> rank, each in
        ``1..min(out, in)``.
    alpha : float
        LoRA ``alpha`` of this client (positive).
    dropout : float, default 0.0
        LoRA dropout probability.
    adapter_name : str, default "default"
    rslora : bool, default False
        Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Returns
    -------
    peft.PeftModel
        Only the LoRA factors require grad.

    Raises
    ------
    ValueError
        Unknown or non-linear module, bad rank, alpha or dropout.
    RuntimeError
        ``base_model`` already carries a peft adapter (a previous client was not detached), or
        peft did not produce exactly the requested ranks and scalings.
    """
    import peft

    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"rslora must be True or False, got {rslora!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(base_model, peft.PeftModel) or hasattr(base_model, "peft_config"):
        raise RuntimeError(
            "the base model already carries a peft adapter; detach the previous client's adapter "
            "(detach_adapter / client_adapter) before attaching a new one"
        )
    shapes = check_ranks(base_model, ranks)
    ranks = {m: int(ranks[m]) for m in shapes}
    all_names = [n for n, _ in base_model.named_modules()]
    config = peft.LoraConfig(
        target_modules=target_modules_spec(ranks, all_names),
        # Every module is also in rank_pattern; r only matters to peft as a fallback.
        r=max(ranks.values()),
        rank_pattern={rank_pattern_key(m): r for m, r in ranks.items()},
        lora_alpha=float(alpha),
        use_rslora=rslora,
        lora_dropout=float(dropout),
        bias="none",
        task_type="CAUSAL_LM",
    )
    saved = {
        "requires_grad": {n: p.requires_grad for n, p in base_model.named_parameters()},
        "training": {n: m.training for n, m in base_model.named_modules()},
    }
    with warnings.catch_warnings():
        # peft probes a deprecated transformers property; the warning is noise for our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.get_peft_model(base_model, config, adapter_name=adapter_name)
    object.__setattr__(model, _SAVED_STATE_ATTR, saved)
    try:
        _verify(model, ranks, float(alpha), adapter_name, rslora)
    except Exception:
        detach_adapter(model)
        raise
    return model


def _verify(model: nn.Module, ranks: Mapping[str, int], alpha: float, adapter_name: str, rslora: bool) -> None:
    layers = _lora_layers(model, adapter_name)
    if set(layers) != set(ranks):
        extra = sorted(set(layers) - set(ranks))[:5]
        missing = sorted(set(ranks) - set(layers))[:5]
        raise RuntimeError(f"peft adapted the wrong modules (unexpected: {extra}, not adapted: {missing})")
    for name, layer in layers.items():
        r = layer.r[adapter_name]
        # The server's maths assumes this exact scaling; a peft that scaled differently (or
        # ignored use_rslora) would silently train a different update.
        want = lora_scaling(alpha, ranks[name], rslora)
        if r != ranks[name] or not math.isclose(layer.scaling[adapter_name], want, rel_tol=1e-12):
            raise RuntimeError(
                f"module {name!r}: peft built rank {r} with scaling {layer.scaling[adapter_name]}, "
                f"expected rank {ranks[name]} with scaling {want}"
            )


def live_factors(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's trainable factor parameters ``{module: (A, B)}`` (not copies).

    For losses that must reach the factors, such as HetLoRA's rank self-pruning penalty.
    """
    name = _active_adapter(peft_model)
    return {m: (layer.lora_A[name].weight, layer.lora_B[name].weight) for m, layer in _lora_layers(peft_model).items()}


def set_factors(peft_model: nn.Module, factors: Mapping[str, Factors]) -> None:
    """Copy ``factors`` into the adapter's ``lora_A`` / ``lora_B`` weights.

    Values are cast to the adapter's dtype and device.

    Raises
    ------
    ValueError
        The factors name a module the adapter lacks, or miss one it has (a partial load would
        silently leave fresh initial values in place), or a factor's shape is not the adapter's
        ``A: (r, in)`` / ``B: (out, r)``. The message names the module.
    """
    live = live_factors(peft_model)
    missing = sorted(set(live) - set(factors))
    unknown = sorted(set(factors) - set(live))
    if unknown:
        raise ValueError(f"factors name modules the adapter does not hold: {unknown[:5]}")
    if missing:
        raise ValueError(f"factors lack modules the adapter holds: {missing[:5]}; give (A, B) for every module")
    for name, (a_param, b_param) in live.items():
        pair = factors[name]
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"module {name!r}: factors must be a pair (A, B)")
        a, b = pair
        for label, src, dst, layout in (("A", a, a_param, "(r, in)"), ("B", b, b_param, "(out, r)")):
            if not isinstance(src, torch.Tensor):
                raise ValueError(f"module {name!r}: factor {label} must be a torch.Tensor, got {type(src).__name__}")
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"module {name!r}: factor {label} has shape {tuple(src.shape)} but the adapter expects "
                    f"{tuple(dst.shape)} {layout}; the factors' rank must equal the adapter's rank for this module"
                )
    with torch.no_grad():
        for name, (a_param, b_param) in live.items():
            a, b = factors[name]
            a_param.copy_(a.detach())
            b_param.copy_(b.detach())


def get_factors(peft_model: nn.Module, *, device: torch.device | str | None = "cpu") -> dict[str, Factors]:
    """Detached fp32 copies of the adapter's factors, ``{module: (A, B)}``.

    Parameters
    ----------
    device : torch.device, str or None, default "cpu"
        Where the copies live; None keeps the adapter's device.
    """
    out: dict[str, Factors] = {}
    for name, (a, b) in live_factors(peft_model).items():
        # clone() after to(): to() returns the same tensor when nothing changes.
        out[name] = (
            a.detach().to(device=device, dtype=torch.float32).clone(),
            b.detach().to(device=device, dtype=torch.float32).clone(),
        )
    return out


def detach_adapter(peft_model: nn.Module) -> nn.Module:
    """Remove the LoRA layers and return the original, unchanged base model.

    peft's ``unload()`` puts every wrapped layer's original ``base_layer`` back in place (its
    weights were never touched) and deletes the ``peft_config`` attribute it set on the base. peft
    also froze all base parameters when attaching; their ``requires_grad`` flags and every
    module's train/eval mode are restored to what they were before :func:`attach_adapter`.
    """
    from peft.tuners.lora import LoraLayer

    saved = getattr(peft_model, _SAVED_STATE_ATTR, None)
    base = peft_model.unload()
    leftovers = [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if leftovers:
        raise RuntimeError(f"LoRA layers remain after unloading: {leftovers[:5]}")
    if saved is not None:
        for n, p in base.named_parameters():
            flag = saved["requires_grad"].get(n)
            if flag is not None:
                p.requires_grad_(flag)
        for n, m in base.named_modules():
            mode = saved["training"].get(n)
            if mode is not None:
                m.training = mode
        # Drop the bookkeeping so a lingering reference to the wrapper holds nothing of the base's.
        object.__delattr__(peft_model, _SAVED_STATE_ATTR)
    return base


@contextlib.contextmanager
def client_adapter(
    base_model: nn.Module,
    ranks: Mapping[str, int],
    alpha: float,
    factors: Mapping[str, Factors] | None = None,
    *,
    dropout: float = 0.0,
    adapter_name: str = "default",
    rslora: bool = False,
) -> Iterator[nn.Module]:
    """Attach a client's adapter for the duration of a ``with`` block.

    Yields the peft model (with ``factors`` loaded when given, otherwise peft's seeded fresh
    initialisation) and detaches it on exit, also when the block raises. The arguments are
    those of :func:`attach_adapter` (``rslora`` selects ``alpha / sqrt(r)`` scaling).

    Examples
    --------
    >>> with client_adapter(base, ranks, 16.0, factors) as model:  # doctest: +SKIP
    ...     train_local(model, features, cfg, seed=0)
    ...     update = get_factors(model)
    """
    model = attach_adapter(base_model, ranks, alpha, dropout=dropout, adapter_name=adapter_name, rslora=rslora)
    try:
        if factors is not None:
            set_factors(model, factors)
        yield model
    finally:
        detach_adapter(model)

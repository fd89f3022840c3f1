"""Generation-based evaluation: greedy answers, Rouge-L against references, and eval loss.

The paper's headline metric is the Rouge-L of the global model's *generated* answers on unseen
tasks, averaged weighted by task size. This module generates with real autoregressive decoding
(not teacher-forced argmax tokens) and scores with a Unicode-aware tokenizer: rouge-score's
default tokenizer keeps only ``[a-z0-9]`` and so scores any non-Latin answer as 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flexlora.training.batching import collate_for_training
from flexlora.training.local import token_loss_sum

__all__ = [
    "EvalResult",
    "UnicodeTokenizer",
    "eval_loss",
    "evaluate_generation",
    "generate_greedy",
    "rouge_l",
]

# Scripts written without spaces between words: each character is a token, as is usual for
# Chinese/Japanese ROUGE. Otherwise "\w+" would turn a whole sentence into one token and any
# partial match would score 0.
_CJK = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0002ebef"  # CJK Extensions B-F
)
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


class UnicodeTokenizer:
    """Rouge tokenizer: lower-cased word runs (``\\w+``, any script), one token per CJK character.

    With ``stem``, tokens longer than three characters are reduced by the Porter stemmer, as
    rouge-score's own tokenizer does with ``use_stemmer=True`` (the Natural Instructions metric).
    """

    def __init__(self, stem: bool = False) -> None:
        self.stem = stem
        self._stemmer = None
        if stem:
            from nltk.stem import porter  # a dependency of rouge-score

            self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN_RE.findall(text.lower())
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 else t for t in tokens]
        return tokens


_SCORERS: dict[bool, object] = {}


def _scorer(stem: bool):
    if stem not in _SCORERS:
        from rouge_score import rouge_scorer

        _SCORERS[stem] = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer(stem))
    return _SCORERS[stem]


def rouge_l(prediction: str, references: Sequence[str], *, stem: bool = False) -> float:
    """Rouge-L F-measure of ``prediction``, the maximum over ``references``.

    Tokens are lower-cased ``\\w+`` runs of any script, with each CJK character a token of its
    own (see :class:`UnicodeTokenizer`); no stemming unless ``stem`` (Porter, as the Natural
    Instructions metric does: "answers" then matches "answer").

    Raises
    ------
    ValueError
        ``references`` is empty or a plain string (pass ``[reference]``).
    """
    if isinstance(references, str):
        raise ValueError("references must be a sequence of strings, not one string; pass [reference]")
    if len(references) == 0:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer(stem)
    return max(float(scorer.score(ref, prediction)["rougeL"].fmeasure) for ref in references)


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    return sorted(ids)


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of tokenised prompts, decoded.

    Prompts are sorted by length and batched with LEFT padding (so every row continues from its
    last real token); position ids follow the attention mask, so a prompt's continuation does
    not depend on the batch it lands in. Decoding stops at the tokenizer's (and the model's
    generation config's) end-of-sequence tokens.

    Parameters
    ----------
    model : nn.Module
        A causal LM, plain or wrapped by peft. It is put in eval mode for the call and its mode
        restored afterwards.
    tokenizer
        Provides ``pad_token_id`` (or ``eos_token_id``), ``eos_token_id`` and ``decode``.
    prompts : sequence of sequences of int
        Token ids, each non-empty.
    max_new_tokens : int, default 32
    batch_size : int, default 8

    Returns
    -------
    list of str
        One continuation per prompt, in input order, without the prompt, special tokens or
        surrounding whitespace.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    eos = _eos_ids(model, tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=int(pad),
        eos_token_id=eos or None,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), longest), int(pad), dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                p = torch.as_tensor(list(prompts[i]), dtype=torch.long)
                ids[row, longest - len(p) :] = p
                mask[row, longest - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
            )
            for row, i in enumerate(chunk):
                new = out[row, longest:].tolist()
                # Rows that finished early are padded; cut at the first end-of-sequence token.
                for k, tok in enumerate(new):
                    if tok in eos:
                        new = new[:k]
                        break
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


@dataclass
class EvalResult:
    """Rouge-L of generated answers."""

    overall: float = field(metadata={"help": "Mean Rouge-L over all examples (tasks weighted by their size)."})
    per_task: dict[str, float] = field(metadata={"help": "Mean Rouge-L per task."})
    counts: dict[str, int] = field(metadata={"help": "Evaluated examples per task."})
    predictions: list[str] = field(metadata={"help": "Generated answer per item, in input order."})
    scores: list[float] = field(metadata={"help": "Rouge-L per item, in input order."})


def evaluate_generation(
    model: nn.Module,
    tokenizer,
    items: Sequence[tuple[str, Sequence[int], Sequence[str]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stem: bool = False,
) -> EvalResult:
    """Generate greedy answers for ``items`` and score them with Rouge-L.

    Parameters
    ----------
    items : sequence of (task, prompt_ids, references)
        ``references`` holds one or more acceptable answers; an item scores the best of them.
    stem : bool, default False
        Porter-stem the tokens before scoring (see :func:`rouge_l`).

    Returns
    -------
    EvalResult
        ``overall`` weights each task by its number of evaluated examples, which equals the mean
        over all items. An empty ``items`` gives ``overall`` NaN.
    """
    prompts = [list(p) for _, p, _ in items]
    predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [rouge_l(pred, list(refs), stem=stem) for pred, (_, _, refs) in zip(predictions, items, strict=True)]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for (task, _, _), s in zip(items, scores, strict=True):
        sums[task] = sums.get(task, 0.0) + s
        counts[task] = counts.get(task, 0) + 1
    per_task = {t: sums[t] / counts[t] for t in sums}
    total = sum(counts.values())
    overall = sum(per_task[t] * counts[t] for t in per_task) / total if total else float("nan")
    return EvalResult(overall=overall, per_task=per_task, counts=counts, predictions=predictions, scores=scores)


@torch.no_grad()
def eval_loss(
    model: nn.Module, features: Sequence[dict], batch_size: int = 8, *, pad_token_id: int | None = None
) -> float:
    """Token-mean next-token cross entropy over all target tokens of ``features``.

    Every target token counts once, whatever batch it falls in (not a mean of batch means).
    Returns NaN when the features hold no target token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_token_id is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_token_id = pad if isinstance(pad, int) else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for start in range(0, len(features), batch_size):
            batch = collate_for_training(features[start : start + batch_size], pad_token_id)
            loss_sum, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan

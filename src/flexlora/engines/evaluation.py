"""The evaluation of a run's global model: its eval set (the unseen tasks, or ``eval.data``),
Rouge-L of greedy answers and the eval loss, and the scores per client type."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexlora._atomic import atomic_write_text
from flexlora.core.types import Factors
from flexlora.data import Example
from flexlora.data.templates import encode_example, encode_prompt
from flexlora.engines.run_setup import load_run_eval_data
from flexlora.training.adapter import client_adapter
from flexlora.training.evaluate import eval_loss, evaluate_generation, rouge_l

if TYPE_CHECKING:
    from flexlora.engines.federation import Federation


class Evaluation:
    """The eval set of a run and the scoring of its global model (``fed.evaluation``).

    Attributes
    ----------
    items : list of (task, prompt ids, references)
    features : list of encoded examples (for the eval loss)
    examples : list of Example
        The examples behind ``items``, in the same order (what was evaluated, for inspection).
    """

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.items: list[tuple[str, list[int], tuple[str, ...]]] = []
        self.features: list[dict[str, list[int]]] = []
        self.examples: list[Example] = []
        self.build()

    def build(self) -> None:
        """(Re)build the eval set from the run's ``eval`` settings."""
        fed = self.fed
        cfg = fed.cfg.eval
        separate = load_run_eval_data(fed.cfg)
        source = fed.data.unseen if separate is None else separate.unseen
        if separate is not None:
            fed.log(f"evaluating on eval.data {cfg.data}: {len(source)} tasks")
            shared = sorted(set(source) & set(fed.data.train))
            if shared:
                fed.log(f"warning: eval.data tasks {shared[:5]} are also training tasks, so their scores "
                        "are not zero-shot")
        tasks = sorted(source)
        if cfg.max_tasks:
            tasks = tasks[: cfg.max_tasks]
        self.items, self.features, self.examples = [], [], []
        enc = fed.encoding
        for task in tasks:
            exs = source[task]
            if cfg.max_examples_per_task:
                exs = exs[: cfg.max_examples_per_task]
            self.examples.extend(exs)
            for ex in exs:
                prompt = encode_prompt(fed.tokenizer, ex, template=enc.template, cutoff_len=enc.cutoff_len)
                self.items.append((task, prompt, ex.references or (ex.output,)))
                self.features.append(encode_example(fed.tokenizer, ex, template=enc.template,
                                                    cutoff_len=enc.cutoff_len, train_on_inputs=False))

    def evaluate(self, factors: dict[str, Factors] | None = None, *, with_loss: bool = True,
                 base: bool = False, answers: str | None = None) -> dict[str, Any]:
        """Rouge-L of greedy answers (and the eval loss) on the unseen tasks.

        ``factors`` defaults to the current global adapter at the export rank; without a global
        adapter (before the first round, or inside a method's stage without one) the method's
        global model is evaluated (:meth:`flexlora.methods.Method.base_context`). ``base``
        evaluates the base model itself (``flexlora eval --base``). ``answers`` names the file
        ``RUN_DIR/eval/<answers>.jsonl`` that keeps every answer (:func:`write_answers`).
        """
        if not self.items:
            return {}
        fed = self.fed
        t0 = time.perf_counter()
        cfg = fed.cfg.eval
        if factors is None and fed.state is not None and not base:
            factors = fed.global_factors()
        if base:
            ctx: contextlib.AbstractContextManager = contextlib.nullcontext(fed.model)
        elif factors is None:
            ctx = _with_model(fed.method.base_context(fed.model), fed.model)
        else:
            ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
            ctx = client_adapter(fed.model, ranks, fed.cfg.lora.alpha, factors, rslora=fed.cfg.lora.rslora)
        with ctx as model:
            model.eval()
            gen = evaluate_generation(model, fed.tokenizer, self.items, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, stem=cfg.stem)
            loss = eval_loss(model, self.features, batch_size=cfg.loss_batch_size) if with_loss else None
        if answers is not None:
            write_answers(self.fed.run_dir / "eval" / f"{answers}.jsonl", self.examples, self.items, gen.predictions,
                          gen.scores, stem=cfg.stem)
        out: dict[str, Any] = {"rougeL": gen.overall, "rougeL_per_task": gen.per_task}
        if with_loss:
            out["eval_loss"] = loss
        out["eval_examples"] = len(self.items)
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    def per_type(self, answers: str | None = None) -> dict[str, float]:
        """Rouge-L of the global model as each client type receives it (distributed to its ranks);
        types whose method sends no such adapter are left out. With ``answers``, each type's answers
        go to ``eval/<answers>_<type>.jsonl``."""
        fed = self.fed
        assert fed.state is not None
        out = {}
        for i in sorted(set(fed.client_type)):
            t, ranks = fed.types[i], fed.type_ranks[i]
            factors = fed.method.type_factors(ranks, t.alpha)
            if factors is None:
                continue
            name = f"{answers}_{t.name}" if answers is not None else None
            out[t.name] = self.evaluate(factors, with_loss=False, answers=name)["rougeL"]
        return out


def write_answers(path: Path, examples: Sequence[Example], items: Sequence[tuple[str, list[int], tuple[str, ...]]],
                  predictions: Sequence[str], scores: Sequence[float], *, stem: bool) -> None:
    """One JSON record per evaluated answer: ``task``, ``id``, ``prediction``, ``references``,
    ``rougeL`` (and ``stem``, the scoring setting), in the eval set's order; written atomically."""
    lines = []
    for ex, (task, _, refs), pred, score in zip(examples, items, predictions, scores, strict=True):
        lines.append(json.dumps({"task": task, "id": ex.id, "prediction": pred, "references": list(refs),
                                 "rougeL": score, "stem": stem}, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The records of an answers file (:func:`write_answers`).

    Raises
    ------
    ValueError
        A line that is not such a record (the file and line are named).
    """
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("prediction"), str) \
                    or not isinstance(rec.get("references"), list) or not isinstance(rec.get("task"), str):
                raise ValueError("not an answer record (task, id, prediction, references, rougeL)")
        except ValueError as exc:
            raise ValueError(f"{path}, line {i}: {exc}") from None
        out.append(rec)
    return out


def rescore(records: Sequence[dict[str, Any]], *, stem: bool) -> dict[str, Any]:
    """Rouge-L of saved answers under other scoring settings, without generating again: the
    overall mean (every answer counts once, as in the run's metrics) and the per-task means."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in records:
        s = rouge_l(r["prediction"], [str(x) for x in r["references"]], stem=stem)
        sums[r["task"]] = sums.get(r["task"], 0.0) + s
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    total = sum(counts.values())
    return {"rougeL": sum(sums.values()) / total if total else float("nan"),
            "rougeL_per_task": {t: sums[t] / counts[t] for t in sorted(sums)}, "answers": total, "stem": stem}


@contextlib.contextmanager
def _with_model(ctx: contextlib.AbstractContextManager, model: Any) -> Any:
    with ctx:
        yield model

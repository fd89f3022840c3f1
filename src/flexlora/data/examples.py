"""The records every loader produces: one instruction example, and a task-keyed data set."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from flexlora.data.errors import DataError

UNSEEN_KINDS = ("tasks", "instances")


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    Parameters
    ----------
    id : str
        Unique, stable identifier (for example the Natural Instructions instance id, or
        ``"dolly-<line no>"``). Partitions and manifests refer to examples by this id.
    instruction : str
        The task instruction or definition.
    input : str
        The input or context; ``""`` when there is none.
    output : str
        The primary reference answer; used as the training target.
    task : str
        Task name (Natural Instructions) or category (Dolly); the natural client key.
    references : tuple of str, default ()
        Every acceptable reference answer, for Rouge-L. Left empty, it becomes ``(output,)``,
        so after construction it is never empty.
    """

    id: str
    instruction: str
    input: str
    output: str
    task: str
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__. A list passed by a caller
        # is turned into a tuple so that Example stays hashable.
        refs = tuple(self.references) if self.references else (self.output,)
        object.__setattr__(self, "references", refs)


def iter_examples(groups: Mapping[str, list[Example]]) -> Iterator[Example]:
    """Yield the examples of a ``task -> examples`` mapping, task by task, in order."""
    for examples in groups.values():
        yield from examples


@dataclass
class TaskData:
    """A multi-task instruction data set, split into training tasks and unseen tasks.

    Parameters
    ----------
    train : dict[str, list[Example]]
        Task -> training examples. These are the tasks clients see.
    unseen : dict[str, list[Example]]
        Task -> held-out examples for evaluation.
    name : str
        Description of the source (path and options), for logs and partition manifests.
    unseen_kind : {"tasks", "instances"}, default "tasks"
        ``"tasks"``: ``unseen`` holds tasks that never occur in ``train`` (zero-shot
        evaluation; the tasks must be disjoint). ``"instances"``: ``unseen`` holds held-out
        instances of the training tasks, under the same task names; used for sources that
        have no unseen tasks of their own.

    Raises
    ------
    DataError
        If ids repeat, an example sits under a task key other than its own ``task``, or
        (with ``unseen_kind="tasks"``) a task is both in ``train`` and ``unseen``.
    """

    train: dict[str, list[Example]]
    unseen: dict[str, list[Example]]
    name: str
    unseen_kind: str = field(default="tasks")

    def __post_init__(self) -> None:
        if self.unseen_kind not in UNSEEN_KINDS:
            raise DataError(
                f"unseen_kind must be one of {UNSEEN_KINDS}, got {self.unseen_kind!r}."
            )
        if self.unseen_kind == "tasks":
            both = sorted(set(self.train) & set(self.unseen))
            if both:
                raise DataError(
                    f"{self.name}: tasks {both[:5]} are both train and unseen tasks.",
                    fix="remove them from one side, or use unseen_kind='instances' for "
                    "held-out instances of seen tasks.",
                )
        seen: set[str] = set()
        for split, groups in (("train", self.train), ("unseen", self.unseen)):
            for task, examples in groups.items():
                for ex in examples:
                    if ex.task != task:
                        raise DataError(
                            f"{self.name}: example {ex.id!r} has task {ex.task!r} but is "
                            f"listed under {split} task {task!r}."
                        )
                    if ex.id in seen:
                        raise DataError(
                            f"{self.name}: example id {ex.id!r} occurs more than once.",
                            fix="give every example a unique id.",
                        )
                    seen.add(ex.id)

    # -- iteration and counts ------------------------------------------------------------

    def iter_train(self) -> Iterator[Example]:
        """Yield every training example, task by task."""
        return iter_examples(self.train)

    def iter_unseen(self) -> Iterator[Example]:
        """Yield every unseen (evaluation) example, task by task."""
        return iter_examples(self.unseen)

    def train_examples(self) -> list[Example]:
        """All training examples as one list, task by task."""
        return list(self.iter_train())

    @property
    def train_tasks(self) -> list[str]:
        """Names of the training tasks, in order."""
        return list(self.train)

    @property
    def unseen_tasks(self) -> list[str]:
        """Names of the unseen tasks, in order."""
        return list(self.unseen)

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return sum(len(v) for v in self.train.values())

    @property
    def num_unseen(self) -> int:
        """Number of unseen (evaluation) examples."""
        return sum(len(v) for v in self.unseen.values())

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per task: ``{"train": {task: n}, "unseen": {task: n}}``."""
        return {
            "train": {t: len(v) for t, v in self.train.items()},
            "unseen": {t: len(v) for t, v in self.unseen.items()},
        }

    def by_id(self) -> dict[str, Example]:
        """Map every example id (train and unseen) to its example."""
        out = {ex.id: ex for ex in self.iter_train()}
        out.update((ex.id, ex) for ex in self.iter_unseen())
        return out

    def summary(self) -> str:
        """One line for logs: source, task and example counts."""
        kind = "unseen tasks" if self.unseen_kind == "tasks" else "held-out tasks"
        return (
            f"{self.name}: {len(self.train)} train tasks / {self.num_train} examples, "
            f"{len(self.unseen)} {kind} / {self.num_unseen} examples"
        )

"""The data layer: instruction examples, loaders, generated demo tasks, client partitions
and prompt templates.

Depends on ``flexlora.core`` at most (never on training, engines or cli) and imports
neither transformers nor datasets: tokenizers are passed in and duck-typed.
"""

from flexlora.data.demo_tasks import (
    DEFAULT_UNSEEN_TASKS,
    DEMO_FAMILIES,
    DEMO_SPEC,
    TaskFamily,
    load_demo_tasks,
)
from flexlora.data.dolly import DOLLY_CATEGORIES, DOLLY_DEFAULT_UNSEEN, DOLLY_HUB_NAME, load_dolly
from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData, iter_examples
from flexlora.data.jsonl import JSONL_FIELD_DEFAULTS, load_jsonl
from flexlora.data.loaders import load_eval_data, load_task_data
from flexlora.data.natural_instructions import load_natural_instructions
from flexlora.data.partition import PARTITION_METHODS, Partition, partition_examples
from flexlora.data.records import read_records
from flexlora.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    encode_example,
    encode_prompt,
    format_prompt,
)

__all__ = [
    "DEFAULT_UNSEEN_TASKS",
    "DEMO_FAMILIES",
    "DEMO_SPEC",
    "DOLLY_CATEGORIES",
    "DOLLY_DEFAULT_UNSEEN",
    "DOLLY_HUB_NAME",
    "IGNORE_INDEX",
    "JSONL_FIELD_DEFAULTS",
    "PARTITION_METHODS",
    "TEMPLATES",
    "DataError",
    "Example",
    "Partition",
    "TaskData",
    "TaskFamily",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "iter_examples",
    "load_demo_tasks",
    "load_dolly",
    "load_eval_data",
    "load_jsonl",
    "load_natural_instructions",
    "load_task_data",
    "partition_examples",
    "read_records",
]

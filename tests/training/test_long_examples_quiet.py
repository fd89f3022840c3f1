"""An example longer than the tokenizer's maximum is cut to cutoff_len by flexlora without
transformers' misleading "Token indices sequence length is longer than ..." warning."""

from __future__ import annotations

import logging

from flexlora.data import Example
from flexlora.data.templates import encode_example
from flexlora.training.tiny_model import build_tiny_tokenizer


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_long_example_is_cut_without_the_tokenizers_warning() -> None:
    from transformers.utils import logging as hf_logging

    tok = build_tiny_tokenizer(model_max_length=32)
    handler = _Records()
    logger = hf_logging.get_logger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        ex = Example(id="x", task="t", instruction="word " * 200, input="", output="answer " * 50)
        enc = encode_example(tok, ex, cutoff_len=24)
        # A tokenizer does warn about such a text (the check is not vacuous); another instance,
        # since transformers warns once per tokenizer.
        build_tiny_tokenizer(model_max_length=32)("word " * 200)
    finally:
        logger.removeHandler(handler)
    assert len(enc["input_ids"]) <= 24
    warned = [m for m in handler.messages if "Token indices sequence length" in m]
    assert len(warned) == 1, handler.messages  # only the direct call above

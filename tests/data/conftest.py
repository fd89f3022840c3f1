"""Shared fixtures of the data-layer tests: fixture paths, the real shared data, and tiny
offline tokenizers (byte-level BPE with no merges: one token per byte, exact round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

EOS = "<|endoftext|>"
PAD = "<pad>"
BOS = "<s>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _build_tokenizer(*, prepend_bos: bool, chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in (EOS, PAD, BOS):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD, BOS])
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="session")
def tokenizer():
    """No BOS, no chat template."""
    return _build_tokenizer(prepend_bos=False, chat_template=None)


@pytest.fixture(scope="session")
def bos_tokenizer():
    """Prepends BOS when add_special_tokens=True (like Llama's)."""
    return _build_tokenizer(prepend_bos=True, chat_template=None)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Has a simple Jinja chat template."""
    return _build_tokenizer(prepend_bos=False, chat_template=CHAT_TEMPLATE)


@pytest.fixture()
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture()
def shared_data() -> Path:
    """Root of the real shared data sets, or skip the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real shared data not found at {SHARED_DATA} (it lives outside the repo)")
    return SHARED_DATA

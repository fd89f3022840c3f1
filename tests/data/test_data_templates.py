"""Prompt templates and tokenisation: exact prompt text, label masking, truncation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    encode_example,
    encode_prompt,
    format_prompt,
)

WITH_INPUT = Example(
    id="x1",
    instruction="Translate the word to French.",
    input="cat",
    output="chat",
    task="translate",
)
NO_INPUT = Example(id="x2", instruction="Name a primary color.", input="", output="red", task="t")


def test_alpaca_with_input_exact() -> None:
    assert format_prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate the word to French.\n\n"
        "### Input:\ncat\n\n"
        "### Response:\n"
    )


def test_alpaca_without_input_exact() -> None:
    assert format_prompt(NO_INPUT, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n"
        "### Instruction:\nName a primary color.\n\n"
        "### Response:\n"
    )


def test_plain_template() -> None:
    assert format_prompt(WITH_INPUT, "plain") == "Translate the word to French.\n\ncat\n\nAnswer:\n"
    assert format_prompt(NO_INPUT, "plain") == "Name a primary color.\n\nAnswer:\n"


def test_unknown_template() -> None:
    with pytest.raises(DataError, match="unknown template"):
        format_prompt(WITH_INPUT, "vicuna")


def test_chat_template(chat_tokenizer) -> None:
    text = format_prompt(WITH_INPUT, "chat", chat_tokenizer)
    assert text == "<|user|>\nTranslate the word to French.\n\ncat\n<|assistant|>\n"
    enc = encode_example(chat_tokenizer, WITH_INPUT, template="chat")
    n_prompt = len(chat_tokenizer.encode(text, add_special_tokens=False))
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert chat_tokenizer.decode(enc["labels"][n_prompt:]) == "chat<|endoftext|>"
    assert encode_prompt(chat_tokenizer, WITH_INPUT, "chat") == enc["input_ids"][:n_prompt]


def test_chat_template_missing(tokenizer) -> None:
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(WITH_INPUT, "chat", tokenizer)
    with pytest.raises(DataError, match="no chat template"):
        encode_example(tokenizer, WITH_INPUT, template="chat")
    with pytest.raises(DataError, match="needs a tokenizer"):
        format_prompt(WITH_INPUT, "chat")


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT])
def test_labels_mask_prompt_exactly(tokenizer, example) -> None:
    enc = encode_example(tokenizer, example)
    prompt_text = format_prompt(example)
    # The test tokenizer is one token per byte, so the prompt length is its UTF-8 length.
    n_prompt = len(prompt_text.encode("utf-8"))
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"])
    assert enc["attention_mask"] == [1] * len(ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in labels[n_prompt:]
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text
    assert tokenizer.decode(labels[n_prompt:]) == example.output + tokenizer.eos_token
    assert ids[-1] == tokenizer.eos_token_id


def test_train_on_inputs_labels_everything(tokenizer) -> None:
    enc = encode_example(tokenizer, WITH_INPUT, train_on_inputs=True)
    assert enc["labels"] == enc["input_ids"]


def test_no_eos(tokenizer) -> None:
    enc = encode_example(tokenizer, WITH_INPUT, add_eos=False)
    assert enc["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.decode(enc["input_ids"]).endswith("### Response:\nchat")


def test_bos_not_doubled(bos_tokenizer) -> None:
    enc = encode_example(bos_tokenizer, WITH_INPUT)
    ids = enc["input_ids"]
    assert ids[0] == bos_tokenizer.bos_token_id
    assert ids.count(bos_tokenizer.bos_token_id) == 1  # not repeated before the answer
    assert bos_tokenizer.decode(ids) == "<s>" + format_prompt(WITH_INPUT) + "chat<|endoftext|>"


def test_answer_truncated_on_the_right(tokenizer) -> None:
    long_answer = Example(
        id="y", instruction="Say a lot.", input="", output="word " * 100, task="t"
    )
    n_prompt = len(format_prompt(long_answer).encode())
    # The prompt leaves more than a quarter of the budget for the answer: it stays whole.
    cutoff = n_prompt + 60
    assert 60 > cutoff // 4
    enc = encode_example(tokenizer, long_answer, cutoff_len=cutoff)
    assert len(enc["input_ids"]) == cutoff
    assert tokenizer.decode(enc["input_ids"][n_prompt:]) == ("word " * 100)[:60]
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(enc["input_ids"][:n_prompt]) == format_prompt(long_answer)


def test_long_prompt_truncated_on_the_left(tokenizer, bos_tokenizer) -> None:
    long_prompt = Example(
        id="z", instruction="Read this. " * 50, input="context " * 40, output="yes", task="t"
    )
    enc = encode_example(tokenizer, long_prompt, cutoff_len=64)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == 64
    # The whole (short) answer survives, and the prompt keeps its end.
    assert tokenizer.decode(ids[-4:]) == "yes<|endoftext|>"
    assert labels[:-4] == [IGNORE_INDEX] * 60 and labels[-4:] == ids[-4:]
    assert tokenizer.decode(ids[:-4]).endswith("context \n\n### Response:\n")

    enc_bos = encode_example(bos_tokenizer, long_prompt, cutoff_len=64)
    assert len(enc_bos["input_ids"]) == 64
    assert enc_bos["input_ids"][0] == bos_tokenizer.bos_token_id
    assert enc_bos["input_ids"][1:] == ids[1:]


def test_long_prompt_and_long_answer_keep_answer_share(tokenizer) -> None:
    ex = Example(id="w", instruction="x " * 300, input="", output="y" * 300, task="t")
    enc = encode_example(tokenizer, ex, cutoff_len=100)
    assert len(enc["input_ids"]) == 100
    n_answer = sum(1 for label in enc["labels"] if label != IGNORE_INDEX)
    assert n_answer == 25  # cutoff_len // 4
    # A prompt that fits but leaves less than a quarter is cut on the left as well.
    ex2 = Example(id="v", instruction="x " * 40, input="", output="y" * 300, task="t")
    n_prompt = len(format_prompt(ex2).encode())
    enc2 = encode_example(tokenizer, ex2, cutoff_len=n_prompt + 5)
    assert enc2["labels"].count(IGNORE_INDEX) == n_prompt + 5 - (n_prompt + 5) // 4


def test_encode_prompt_matches_training_prefix(tokenizer, bos_tokenizer) -> None:
    for tok in (tokenizer, bos_tokenizer):
        enc = encode_example(tok, WITH_INPUT)
        n = enc["labels"].count(IGNORE_INDEX)
        assert encode_prompt(tok, WITH_INPUT) == enc["input_ids"][:n]
    long_prompt = Example(id="z", instruction="Read. " * 50, input="", output="ok", task="t")
    ids = encode_prompt(bos_tokenizer, long_prompt, cutoff_len=32)
    assert len(ids) == 32 and ids[0] == bos_tokenizer.bos_token_id
    assert bos_tokenizer.decode(ids).endswith("### Response:\n")
    assert len(encode_prompt(tokenizer, long_prompt, cutoff_len=None)) > 32


def test_bad_cutoff(tokenizer) -> None:
    with pytest.raises(DataError, match="cutoff_len"):
        encode_example(tokenizer, WITH_INPUT, cutoff_len=1)


class CharTokenizer:
    """A duck-typed tokenizer with no transformers at all: one id per character."""

    eos_token_id = 0
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_duck_typed_tokenizer() -> None:
    enc = encode_example(CharTokenizer(), NO_INPUT)
    prompt = format_prompt(NO_INPUT)
    assert enc["input_ids"] == [ord(c) for c in prompt + "red"] + [0]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + [ord(c) for c in "red"] + [0]


class NoEosTokenizer(CharTokenizer):
    eos_token_id = None


def test_missing_eos_is_an_error() -> None:
    with pytest.raises(DataError, match="eos"):
        encode_example(NoEosTokenizer(), NO_INPUT)
    assert encode_example(NoEosTokenizer(), NO_INPUT, add_eos=False)["input_ids"][-1] == ord("d")


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    instruction=text,
    inp=text,
    output=text.filter(bool),
    cutoff=st.integers(min_value=2, max_value=400),
    template=st.sampled_from(["alpaca", "plain"]),
)
def test_encode_properties(tokenizer, instruction, inp, output, cutoff, template) -> None:
    ex = Example(id="h", instruction=instruction, input=inp, output=output, task="t")
    enc = encode_example(tokenizer, ex, template=template, cutoff_len=cutoff)
    ids, labels = enc["input_ids"], enc["labels"]
    assert 0 < len(ids) <= cutoff
    n_prompt = labels.count(IGNORE_INDEX)
    # -100 forms a prefix, and at least one answer token survives.
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert n_prompt < len(ids)
    assert labels[n_prompt:] == ids[n_prompt:]
    full_prompt = tokenizer.encode(format_prompt(ex, template), add_special_tokens=True)
    full_answer = tokenizer.encode(output, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(full_prompt) + len(full_answer) <= cutoff:
        assert ids == full_prompt + full_answer
    else:
        # The kept prompt is a suffix of the prompt, the kept answer a prefix of the answer.
        assert full_prompt[len(full_prompt) - n_prompt :] == ids[:n_prompt]
        assert full_answer[: len(ids) - n_prompt] == ids[n_prompt:]
        assert len(ids) == cutoff

"""Prompt templates and tokenisation of examples into training features.

Tokenizers are duck-typed: anything with ``encode(text, add_special_tokens=...)`` (or a
``__call__`` returning ``{"input_ids": ...}``), ``eos_token_id`` and, for the chat template,
``apply_chat_template`` and ``chat_template`` works; a Hugging Face tokenizer does.

Special tokens. The prompt and the answer are tokenised separately and their ids
concatenated, so the prompt/answer boundary in ``labels`` is exact (tokenising the joined
text could merge tokens across the boundary). For the ``alpaca`` and ``plain`` templates
the prompt is encoded with ``add_special_tokens=True`` (a tokenizer that prepends BOS, as
Llama's does, gets it once, at the start) and the answer with ``add_special_tokens=False``.
For the ``chat`` template the rendered text already holds the template's own special
tokens, so the prompt is also encoded with ``add_special_tokens=False`` (no doubled BOS).
The answer is followed by ``eos_token_id``; for chat models this is the end-of-turn token
(``<|im_end|>`` for SmolLM2-Instruct, for example), which is what a generation stops on.
:func:`encode_prompt` encodes the prompt exactly as :func:`encode_example` does (same template
and special tokens), so generation sees the tokens training saw, with one exception: a prompt too
long for ``cutoff_len`` is cut on the left to ``cutoff_len`` for generation, while training cuts
it further to leave room for the answer (at least ``min(len(answer), cutoff_len // 4)`` tokens),
so on such examples generation sees up to that many more prompt tokens than training did.
"""

from __future__ import annotations

from typing import Any

from flexlora.data.errors import DataError
from flexlora.data.examples import Example

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "TEMPLATES",
    "encode_example",
    "encode_prompt",
    "format_prompt",
]

IGNORE_INDEX = -100
"""Label of tokens excluded from the loss (PyTorch cross-entropy's default ignore_index)."""

TEMPLATES = ("alpaca", "chat", "plain")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _user_message(example: Example) -> str:
    if example.input:
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


def format_prompt(example: Example, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text of ``example``, up to where the answer starts.

    Parameters
    ----------
    example : Example
    template : {"alpaca", "chat", "plain"}, default "alpaca"
        ``alpaca``: the Stanford Alpaca prompt (the variant without the ``### Input:``
        section when ``example.input`` is empty). ``chat``: one user turn holding the
        instruction and the input (separated by a blank line), rendered by the tokenizer's
        chat template with the generation prompt. ``plain``: the instruction, the input
        (when there is one) and ``"Answer:"`` on separate paragraphs, ending in a newline.
    tokenizer : optional
        Needed for ``chat`` only.

    Returns
    -------
    str

    Raises
    ------
    DataError
        Unknown template, or ``chat`` without a tokenizer that has a chat template.
    """
    if template == "alpaca":
        if example.input:
            return ALPACA_PROMPT.format(instruction=example.instruction, input=example.input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=example.instruction)
    if template == "plain":
        parts = [p for p in (example.instruction, example.input) if p]
        return "\n\n".join([*parts, "Answer:\n"])
    if template == "chat":
        if tokenizer is None:
            raise DataError(
                "the chat template needs a tokenizer.",
                fix="pass tokenizer=..., or use template='alpaca' or 'plain'.",
            )
        if not getattr(tokenizer, "chat_template", None) or not hasattr(
            tokenizer, "apply_chat_template"
        ):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(
                f"tokenizer {name!r} has no chat template.",
                fix="use an instruct/chat model's tokenizer, or template='alpaca' or 'plain'.",
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _user_message(example)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if not isinstance(text, str):
            raise DataError(
                f"apply_chat_template returned {type(text).__name__}, expected str."
            )
        return text
    raise DataError(f"unknown template {template!r}.", fix=f"use one of {list(TEMPLATES)}.")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: the whole text is tokenised and then cut to cutoff_len here (encode_example), so
    # transformers' "Token indices sequence length is longer than the specified maximum" warning
    # about the uncut text would be misleading (it printed once per process, in every Ray actor).
    encode = getattr(tokenizer, "encode", None)
    try:
        if callable(encode):
            ids = encode(text, add_special_tokens=add_special_tokens, verbose=False)
        else:
            ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    except TypeError:  # a tokenizer-like object without the verbose keyword
        if callable(encode):
            ids = encode(text, add_special_tokens=add_special_tokens)
        else:
            ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def _prompt_ids(tokenizer: Any, example: Example, template: str) -> list[int]:
    text = format_prompt(example, template, tokenizer)
    return _encode(tokenizer, text, add_special_tokens=template != "chat")


def _keep_prompt_tail(prompt: list[int], budget: int, bos_id: int | None) -> list[int]:
    """The last ``budget`` prompt tokens, keeping a leading BOS in place when there is one.

    Cutting from the left drops the start of the instruction but keeps the end of the
    prompt (``### Response:`` and what precedes it), where the answer attaches.
    """
    if len(prompt) <= budget:
        return prompt
    if budget <= 0:
        return []
    if bos_id is not None and prompt and prompt[0] == bos_id and budget >= 2:
        return [bos_id, *prompt[len(prompt) - (budget - 1) :]]
    return prompt[len(prompt) - budget :]


def _check_cutoff(cutoff_len: int) -> None:
    if not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise DataError(f"cutoff_len must be an integer >= 2, got {cutoff_len!r}.")


def encode_example(
    tokenizer: Any,
    example: Example,
    *,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenise ``example`` for causal-LM training.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer or anything with the same ``encode`` / ``eos_token_id``.
    example : Example
        Its ``output`` is the target.
    template : {"alpaca", "chat", "plain"}, default "alpaca"
        See :func:`format_prompt`.
    cutoff_len : int, default 256
        Maximum number of tokens. When prompt + answer is longer, the answer keeps
        ``max(cutoff_len - len(prompt), min(len(answer), max(1, cutoff_len // 4)))`` tokens
        (cut on the right) and the prompt gets the rest (cut on the LEFT, keeping a leading
        BOS). So a short prompt keeps all of itself, and an over-long prompt still leaves at
        least a quarter of the budget (or the whole answer, if shorter) for answer tokens.
        A cut answer loses its EOS.
    train_on_inputs : bool, default False
        Also compute the loss on the prompt tokens.
    add_eos : bool, default True
        Append ``tokenizer.eos_token_id`` to the answer.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` (all ones; padding is the collator's job) and
        ``labels``: ``-100`` on the prompt tokens (unless ``train_on_inputs``), the token id
        on the answer tokens.

    Raises
    ------
    DataError
        Bad template or cutoff, or ``add_eos`` with a tokenizer without an EOS token.
    """
    _check_cutoff(cutoff_len)
    prompt = _prompt_ids(tokenizer, example, template)
    answer = _encode(tokenizer, example.output, add_special_tokens=False)
    if add_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataError(
                "the tokenizer has no eos_token_id, so the answer cannot be terminated.",
                fix="set tokenizer.eos_token, or pass add_eos=False.",
            )
        answer.append(int(eos))
    if len(prompt) + len(answer) > cutoff_len:
        reserve = min(len(answer), max(1, cutoff_len // 4))
        answer_keep = min(len(answer), max(cutoff_len - len(prompt), reserve))
        answer = answer[:answer_keep]
        prompt = _keep_prompt_tail(
            prompt, cutoff_len - answer_keep, getattr(tokenizer, "bos_token_id", None)
        )
    input_ids = prompt + answer
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + answer
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_prompt(
    tokenizer: Any, example: Example, template: str = "alpaca", cutoff_len: int | None = 256
) -> list[int]:
    """Token ids of the prompt of ``example``, for generation.

    Encoded exactly as in :func:`encode_example`. When longer than ``cutoff_len`` it is cut
    on the left to ``cutoff_len`` (keeping a leading BOS), not to the shorter length training
    keeps beside its answer (module docstring). ``None`` disables the cut.

    Returns
    -------
    list of int
    """
    prompt = _prompt_ids(tokenizer, example, template)
    if cutoff_len is None:
        return prompt
    _check_cutoff(cutoff_len)
    return _keep_prompt_tail(prompt, cutoff_len, getattr(tokenizer, "bos_token_id", None))

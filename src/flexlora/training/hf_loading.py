"""Shared steps of loading a Hugging Face causal LM and its tokenizer.

The ChatML chat template, seeding that leaves the caller's RNG untouched, reading a
model directory, and the post-processing (:func:`_finalize`) every loader applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CHATML_TEMPLATE"]

# ChatML, the format SmolLM2-Instruct was tuned on; also used by the tiny tokenizer so that
# prompt-building code behaves the same on the test model and the real one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Forking keeps loading side-effect free for the caller's RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ensure_chat_template(tok: PreTrainedTokenizerBase) -> None:
    if not getattr(tok, "chat_template", None) and "<|im_start|>" in tok.get_vocab():
        # Some GGUF exports drop the template; ChatML is right for any tokenizer that has
        # its markers as tokens.
        tok.chat_template = CHATML_TEMPLATE


def _finalize(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, name_or_path: str | None
) -> tuple[Any, Any]:
    """Shared post-processing: pad token, left padding, generation ids, eval mode."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tok))
    # Decoder-only generation continues from the last position of each row, so batched
    # prompts must be padded on the left. Training collators that want right padding
    # set ``padding_side`` themselves.
    tok.padding_side = "left"
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > 10**8):
        tok.model_max_length = int(max_pos)

    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
    if name_or_path is not None:
        # peft records this as base_model_name_or_path; a spec string lets exported
        # adapters be reloaded through load_base_model.
        model.config.name_or_path = name_or_path
        model.name_or_path = name_or_path
    model.eval()
    return model, tok


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _ensure_chat_template(tok)
    return model, tok

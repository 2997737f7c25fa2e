"""GGUF files through transformers' loader: tiny Llama and Qwen2 files written here with `gguf`.

Each file holds the weights of a tiny random model laid out as llama.cpp's converter lays them
out (Llama's query/key rows interleaved for its rotary layout, Qwen2's left alone), and a
byte-level vocabulary with merges chosen so that each pre-tokenizer gives different tokens:
``12345`` is one token under GPT-2's split, ``123``+``45`` under Llama 3's (digits in groups
of up to three) and five single digits under Qwen2's and SmolLM's; ``'M`` stays whole only
under the case-insensitive contractions of Llama 3 and Qwen2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_model

import longreach
from longreach.errors import LongreachError

MERGES = ["1 2", "12 3", "123 4", "1234 5", "4 5", "Ġ I", "' M"]
SPECIALS = {
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def vocabulary(family: str) -> list[str]:
    from tokenizers import pre_tokenizers

    merged = ["".join(m.split(" ")) for m in MERGES]
    specials = SPECIALS.get(family, SPECIALS["llama"])
    return [*specials, *sorted(pre_tokenizers.ByteLevel.alphabet()), *merged]


def tiny(family: str, **overrides):
    """A tiny random model whose vocabulary is the test's and whose norm epsilon survives
    GGUF's float32 metadata exactly (1e-6 would come back as 9.99999997e-07)."""
    return tiny_model(
        family, vocab_size=len(vocabulary(family)), rms_norm_eps=2.0**-20, **overrides
    )


def to_llama_cpp_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs, per head."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(
    path,
    family: str,
    model=None,
    pre: str = "llama-bpe",
    add_bos: bool = False,
    q8_0: bool = False,
    tokenizer_model: str = "gpt2",
    extra_tensors: dict | None = None,
):
    """Write ``model`` (a tiny HF Llama/Qwen2) as llama.cpp would; return the HF state dict the
    file decodes to (equal to the model's, or its Q8_0 round trip)."""
    import gguf

    tokens = vocabulary(family)
    writer = gguf.GGUFWriter(str(path), family)
    cfg = model.config if model is not None else None
    if cfg is not None:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0 if family == "llama" else 1)
    writer.add_eos_token_id(2 if family == "llama" else 0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ messages[0]['content'] }}")

    decoded = {}
    if model is not None:
        names = {
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        }
        for name, tensor in model.state_dict().items():
            w = tensor.detach().numpy().astype(np.float32)
            if name == "model.embed_tokens.weight":
                out = "token_embd.weight"
            elif name == "model.norm.weight":
                out = "output_norm.weight"
            elif name == "lm_head.weight":
                if cfg.tie_word_embeddings:
                    continue
                out = "output.weight"
            else:
                layer, rest = name.removeprefix("model.layers.").split(".", 1)
                module, kind = rest.rsplit(".", 1)
                out = f"blk.{layer}.{names[module]}.{kind}"
            stored = w
            if family == "llama" and ".attn_q." in out:
                stored = to_llama_cpp_rotary(w, cfg.num_attention_heads)
            elif family == "llama" and ".attn_k." in out:
                stored = to_llama_cpp_rotary(w, cfg.num_key_value_heads)
            if q8_0 and w.ndim == 2:
                qtype = gguf.GGMLQuantizationType.Q8_0
                packed = gguf.quants.quantize(stored, qtype)
                writer.add_tensor(out, packed, raw_shape=packed.shape, raw_dtype=qtype)
                # Q8_0 blocks run along rows, so the row permutation commutes with it.
                w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
            else:
                writer.add_tensor(out, np.ascontiguousarray(stored))
            decoded[name] = torch.from_numpy(np.ascontiguousarray(w))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def reference_logits(family: str, state: dict, ids: torch.Tensor, **overrides) -> torch.Tensor:
    model = tiny(family, **overrides)
    model.load_state_dict(state, strict=False)  # strict=False: a tied head is not in the file
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_HOME", str(tmp_path / "home"))


FAMILIES = {
    # family: (pre-tokenizer, config overrides, BOS added, expected tokens of "12345 I'M")
    "llama": ("llama-bpe", {"tie_word_embeddings": False}, True, ["123", "45", "ĠI", "'M"]),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, False, ["1", "2", "3", "4", "5", "ĠI", "'M"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_gguf_gives_the_logits_and_tokens_of_the_same_model(tmp_path, family):
    pre, overrides, add_bos, expected = FAMILIES[family]
    source = tiny(family, **overrides)
    path = tmp_path / f"{family}.gguf"
    state = write_gguf(path, family, source, pre=pre, add_bos=add_bos)

    model, tok = longreach.load(path, dtype="fp32")
    assert model.config.model_type == family
    assert model.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    for name, want in state.items():
        got = model.state_dict()[name]
        assert torch.equal(got, want), f"{name} differs from the written weights"

    assert tok.tokenize("12345 I'M") == expected
    ids = tok("12345 I'M", return_tensors="pt").input_ids
    bos = [tok.bos_token_id] if add_bos else []
    assert ids[0].tolist() == bos + tok.convert_tokens_to_ids(expected)
    assert tok.decode(ids[0], skip_special_tokens=True) == "12345 I'M"
    assert len(tok) == len(vocabulary(family)), "the tokenizer grew past the model's vocabulary"
    with torch.no_grad():
        got = model(ids).logits
    want = reference_logits(family, state, ids, **overrides)
    assert (got - want).abs().max().item() == 0.0, "GGUF logits differ from the state dict's"


def test_quantized_llama_gguf_is_dequantized_into_a_dense_model(tmp_path):
    source = tiny("llama")
    path = tmp_path / "q8.gguf"
    state = write_gguf(path, "llama", source, q8_0=True)
    model, tok = longreach.load(path, dtype="fp32")
    assert {type(m).__name__ for m in model.modules()} >= {"Linear", "Embedding"}
    assert not any("Gguf" in type(m).__name__ for m in model.modules()), "weights left packed"
    weight = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    want = state["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(weight, want), "Q8_0 q_proj does not decode to the gguf package's values"
    assert not torch.equal(want, source.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    ids = torch.tensor([[5, 70, 80, 90, 100, 3]])
    with torch.no_grad():
        got = model(ids).logits
    assert (got - reference_logits("llama", state, ids)).abs().max().item() == 0.0


@pytest.mark.parametrize(
    "pre, expected",
    [
        ("llama3", ["123", "45", "ĠI", "'M"]),
        ("llama-v3", ["123", "45", "ĠI", "'M"]),
        ("qwen2", ["1", "2", "3", "4", "5", "ĠI", "'M"]),
        ("deepseek-r1-qwen", ["1", "2", "3", "4", "5", "ĠI", "'M"]),
        # single digits, then GPT-2's split, whose contractions are lower-case only
        ("smollm", ["1", "2", "3", "4", "5", "ĠI", "'", "M"]),
        ("starcoder", ["1", "2", "3", "4", "5", "ĠI", "'", "M"]),
    ],
)
def test_each_pre_tokenizer_splits_as_its_vocabulary_was_trained(tmp_path, pre, expected):
    source = tiny("llama", num_hidden_layers=1)
    write_gguf(tmp_path / "m.gguf", "llama", source, pre=pre)
    _, tok = longreach.load(tmp_path / "m.gguf", dtype="fp32")
    assert tok.tokenize("12345 I'M") == expected


def test_special_tokens_come_from_the_files_ids(tmp_path):
    source = tiny("llama", num_hidden_layers=1)
    write_gguf(tmp_path / "m.gguf", "llama", source)
    model, tok = longreach.load(tmp_path / "m.gguf", dtype="fp32")
    # transformers 5.2 alone names the BOS as the EOS too
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    # the file names no padding token: pad with the EOS, never the BOS
    assert tok.pad_token == "<|eot_id|>" and model.generation_config.pad_token_id == 2
    assert tok.tokenize("<|end_of_text|>") == ["<|end_of_text|>"], "a control token was split"
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert tok.padding_side == "left"


def test_a_converted_gguf_is_cached_and_not_redone(tmp_path):
    source = tiny("qwen2", num_hidden_layers=1)
    write_gguf(tmp_path / "m.gguf", "qwen2", source, pre="qwen2")
    longreach.load(tmp_path / "m.gguf", dtype="fp32")
    (cached,) = [p for p in (tmp_path / "home" / "models" / "gguf").iterdir() if p.is_dir()]
    assert cached.name.startswith("m-")
    stamp = json.loads((cached / "longreach.json").read_text())
    assert stamp["source_name"] == "m.gguf" and stamp["format"] == 2
    saved = json.loads((cached / "config.json").read_text())
    # transformers 4.x (and the papers' code pinned to it) reads only the top-level field
    assert (
        saved["rope_theta"]
        == saved["rope_parameters"]["rope_theta"]
        == source.config.rope_parameters["rope_theta"]
    )
    files = {p: p.stat().st_mtime_ns for p in cached.rglob("*")}
    longreach.load(tmp_path / "m.gguf", dtype="fp32")
    assert {p: p.stat().st_mtime_ns for p in cached.rglob("*")} == files, "converted twice"
    # a folder finished before config.json carried the 4.x fields is completed in place
    del saved["rope_theta"]
    (cached / "config.json").write_text(json.dumps(saved))
    weights = (cached / "model.safetensors").stat().st_mtime_ns
    longreach.load(tmp_path / "m.gguf", dtype="fp32")
    assert (
        json.loads((cached / "config.json").read_text())["rope_theta"]
        == saved["rope_parameters"]["rope_theta"]
    )
    assert (cached / "model.safetensors").stat().st_mtime_ns == weights, "converted again"


def _refusal(tmp_path, **kwargs) -> str:
    path = tmp_path / "m.gguf"
    write_gguf(path, kwargs.pop("family", "llama"), **kwargs)
    with pytest.raises(LongreachError) as err:
        longreach.load(path)
    message = str(err.value)
    assert "\n" not in message, f"error message must be one line, got: {message!r}"
    gguf_dir = tmp_path / "home" / "models" / "gguf"
    left = [p.name for p in gguf_dir.glob("*") if not p.name.endswith(".lock")]
    assert left == [], f"a refused file left {left} in the cache"
    return message


@pytest.mark.parametrize("pre", ["deepseek-llm", "gpt-4o", "default"])
def test_other_pre_tokenizers_are_refused_not_guessed(tmp_path, pre):
    source = tiny("llama", num_hidden_layers=1)
    message = _refusal(tmp_path, model=source, pre=pre)
    assert message.startswith(
        f"this GGUF's tokenizer uses the {pre!r} pre-tokenizer, which longreach cannot rebuild"
    )


def test_sentencepiece_gguf_is_refused(tmp_path):
    message = _refusal(tmp_path, tokenizer_model="llama")
    assert message.endswith(
        "has a 'llama' tokenizer; longreach converts GGUF files with byte-level BPE (gpt2) "
        "tokenizers only (or pass a Hugging Face model directory)."
    )


def test_rope_freqs_gguf_is_refused_rather_than_loaded_with_unscaled_rope(tmp_path):
    source = tiny("llama", num_hidden_layers=1)
    freqs = {"rope_freqs.weight": np.ones(8, dtype=np.float32)}
    message = _refusal(tmp_path, model=source, extra_tensors=freqs)
    assert "scales its RoPE with a rope_freqs tensor (Llama 3.1 style)" in message


def test_untested_architecture_is_refused(tmp_path):
    message = _refusal(tmp_path, family="phi3")
    assert message.endswith(
        "is a 'phi3' GGUF; longreach converts llama, qwen2 GGUF files (or pass a Hugging Face "
        "model directory)."
    )


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(LongreachError) as err:
        longreach.load(path)
    assert str(err.value).startswith(f"{path} is not a readable GGUF file (")
    assert "\n" not in str(err.value)

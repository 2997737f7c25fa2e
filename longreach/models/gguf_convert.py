"""Convert a llama-architecture GGUF file into a Hugging Face safetensors directory, once.

Weights are dequantized with the ``gguf`` package (Q4_1, Q8_0, F16, F32, ...), the
query/key rows that llama.cpp's converter interleaved for its rotary layout are put
back in Hugging Face's half-split order, and the tokenizer is rebuilt from the GGUF
metadata by transformers. The result is a normal model directory, loadable by
``AutoModelForCausalLM.from_pretrained``.

The conversion is atomic: everything is written into a temporary sibling folder that
is renamed into place only after every file is complete and a ``longreach.json``
stamp records the source. A load trusts a cache folder only if that stamp exists and
names the same source file (path, size, mtime); a conversion killed half-way leaves
only a ``.tmp-*`` folder, which the next conversion removes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from longreach.errors import LongreachError

log = logging.getLogger(__name__)

STAMP = "longreach.json"
# GGUF pre-tokenizer names whose split is single digits, then GPT-2's byte-level regex.
_SPLIT_DIGITS_THEN_GPT2 = ("smollm", "starcoder")
FORMAT_VERSION = 1

# GGUF tensor name (per block) -> Hugging Face Llama parameter name.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def source_fingerprint(path: Path) -> dict[str, Any]:
    """Identify a source file cheaply: name, size and a hash of its first and last MiB.

    Not the mtime: the same wheel installed into two virtual environments has two
    mtimes but one conversion.
    """
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"source_name": path.name, "size": size, "sha256_ends": h.hexdigest()}


def is_complete(target: Path, fingerprint: dict[str, Any]) -> bool:
    """True when ``target`` holds a finished conversion of the same source file."""
    stamp = target / STAMP
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (
        data.get("format") == FORMAT_VERSION
        and data.get("size") == fingerprint["size"]
        and data.get("sha256_ends") == fingerprint["sha256_ends"]
        and (target / "model.safetensors").is_file()
        and (target / "config.json").is_file()
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (interleaved pairs -> two halves per head)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_from_gguf(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, this one is {arch!r}")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    vocab = int(g("vocab_size", 0)) or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": int(g("rope.dimension_count", hidden // n_heads)),
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(g("rope.freq_base", 10000.0)),
        },
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        # SmolLM2's GGUF names <|im_start|> (the BOS) as padding; pad with the EOS instead.
        "pad_token_id": (
            _field(reader, "tokenizer.ggml.eos_token_id")
            if _field(reader, "tokenizer.ggml.padding_token_id")
            in (None, _field(reader, "tokenizer.ggml.bos_token_id"))
            else _field(reader, "tokenizer.ggml.padding_token_id")
        ),
    }


def _state_dict(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the fastest axis first
        w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind not in _BLOCK_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            if kind == "attn_q":
                w = _unpermute(w, config["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute(w, config["num_key_value_heads"])
            name = f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.weight"
        elif t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name == "rope_freqs.weight":
            continue  # llama3-style frequency factors are not used by the models we ship
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        out[name] = np.ascontiguousarray(w)
    return out


def _write_tokenizer(reader: Any, config: dict[str, Any], out_dir: Path) -> None:
    """Rebuild the byte-level BPE tokenizer from the GGUF metadata with ``tokenizers``.

    transformers' own GGUF tokenizer conversion mislabels SmolLM2's special tokens
    (eos becomes ``<|im_start|>``) and differs between 5.x releases, so the tokenizer is
    built here: BPE over the GGUF vocabulary and merges, the ``smollm`` pre-tokenizer
    (single digits, then GPT-2's byte-level split), control tokens as special tokens.
    Like Hugging Face's SmolLM2 tokenizer, it adds no BOS to raw prompts.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gpt2-style) GGUF tokenizers are supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    kind = _field(reader, "tokenizer.ggml.pre")
    if kind not in _SPLIT_DIGITS_THEN_GPT2:
        # llama3, qwen2, deepseek and the rest split text with their own regular expressions;
        # the recipe below would give other token boundaries than the model was trained on.
        raise LongreachError(
            f"this GGUF's tokenizer uses the {kind!r} pre-tokenizer, which longreach cannot "
            f"rebuild (it rebuilds {', '.join(_SPLIT_DIGITS_THEN_GPT2)}); convert the model to a "
            "Hugging Face directory and pass that directory instead."
        )
    pre = [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tk.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # 3 = CONTROL
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def name(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None else None

    template = _field(reader, "tokenizer.chat_template")
    eos = name("eos")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=name("bos"),
        eos_token=eos,
        unk_token=name("unknown"),
        pad_token=name("padding") if name("padding") != name("bos") else eos,
        additional_special_tokens=[
            t for t in specials if t not in (name("bos"), eos, name("unknown"))
        ],
        model_max_length=config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir))


def convert_gguf(gguf_path: Path, target: Path, extra: dict[str, Any] | None = None) -> Path:
    """Convert ``gguf_path`` into the HF directory ``target`` atomically; return ``target``."""

    fingerprint = source_fingerprint(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time per target; a second process waits, then finds it done.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target, fingerprint):
            return target
        return _convert_locked(gguf_path, target, fingerprint, extra)


def _convert_locked(
    gguf_path: Path, target: Path, fingerprint: dict[str, Any], extra: dict[str, Any] | None
) -> Path:
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a conversion that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    start = time.perf_counter()
    try:
        reader = GGUFReader(str(gguf_path))
        config = _config_from_gguf(reader)
        weights = _state_dict(reader, config)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _write_tokenizer(reader, config, tmp)
        stamp = {"format": FORMAT_VERSION, **fingerprint, **(extra or {})}
        # The stamp is written last: a folder without it is never trusted.
        with open(tmp / STAMP, "w") as f:
            json.dump(stamp, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1f s", gguf_path, target, time.perf_counter() - start)
    return target

"""Convert a GGUF file into a Hugging Face safetensors directory, once, through transformers.

transformers reads the file (``from_pretrained(folder, gguf_file=name)``): it builds the
config, dequantizes the tensors (Q4_1, Q8_0, F16, ...), maps llama.cpp's tensor names to
its own, undoes the rotary permutation of Llama's query/key rows, and builds the
vocabulary and merges of the tokenizer. This module adds what transformers does not do
(see ``_fix_tokenizer``, ``_special_tokens`` and ``check_supported``), then writes a normal
model directory that ``AutoModelForCausalLM.from_pretrained`` loads in under a second.

The conversion is atomic: everything is written into a temporary sibling folder that
is renamed into place only after every file is complete and a ``longreach.json``
stamp records the source. A load trusts a cache folder only if that stamp exists and
names the same source file (size and a hash of its ends); a conversion killed half-way
leaves only a ``.tmp-*`` folder, which the next conversion removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.errors import LongreachError

log = logging.getLogger(__name__)

STAMP = "longreach.json"
# 2: converted by transformers' GGUF loader plus the fixes below (1: our own dequantizer).
# A format-2 folder saved before config.json carried the 4.x RoPE fields is completed in
# place by ``add_legacy_rope_fields`` (no new conversion).
FORMAT_VERSION = 2

# Architectures whose GGUF conversion is tested here (a tiny file of each is written by the
# tests and must give the logits of the same weights loaded from a config and state dict).
ARCHITECTURES = ("llama", "qwen2")

# How each GGUF pre-tokenizer (``tokenizer.ggml.pre``, llama.cpp's name for the split the
# vocabulary was trained with) cuts text before byte-level BPE. transformers 5.2 gives every
# byte-level Llama file GPT-2's split, and 5.24 has no entry for ``smollm``, so both versions
# would get other token boundaries than the model was trained on for some of these.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """A vocabulary's text split: a regex (or single digits, then GPT-2's regex) and a normalizer."""

    split: str | None  # a regex applied before byte-level BPE; None: GPT-2's own regex
    single_digits: bool = False  # split every digit apart first (SmolLM, StarCoder)
    nfc: bool = False  # NFC-normalize the text first (Qwen2's tokenizer does)

    def build(self) -> tuple[Any, Any]:
        """(normalizer or None, pre_tokenizer) as ``tokenizers`` objects."""
        from tokenizers import Regex, normalizers, pre_tokenizers

        if self.split is None:
            steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        else:
            steps = [
                pre_tokenizers.Split(Regex(self.split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        if self.single_digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return (normalizers.NFC() if self.nfc else None), pre_tokenizers.Sequence(steps)


_SMOLLM = PreTokenizer(split=None, single_digits=True)
_LLAMA3 = PreTokenizer(split=_LLAMA3_SPLIT)
_QWEN2 = PreTokenizer(split=_QWEN2_SPLIT, nfc=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,  # what llama.cpp's converter writes for Llama 3
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


@dataclass(frozen=True)
class GgufFacts:
    """What the fixes need from a GGUF's metadata (read with the ``gguf`` package)."""

    architecture: str
    tokenizer_model: str | None
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    context_length: int | None
    tensor_names: frozenset[str]

    def token(self, index: int | None) -> str | None:
        return self.tokens[index] if index is not None else None

    def of_type(self, kind: int) -> list[str]:
        """The tokens of one llama.cpp type (none when the file lists no types)."""
        return [t for t, k in zip(self.tokens, self.token_types, strict=False) if k == kind]


def read_facts(path: Path) -> GgufFacts:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError, struct.error, ...
        raise LongreachError(f"{path} is not a readable GGUF file ({exc}).") from None

    def field(key: str, default: Any = None) -> Any:
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    arch = field("general.architecture")
    return GgufFacts(
        architecture=arch,
        tokenizer_model=field("tokenizer.ggml.model"),
        pre=field("tokenizer.ggml.pre"),
        tokens=list(field("tokenizer.ggml.tokens", [])),
        token_types=list(field("tokenizer.ggml.token_type", [])),
        bos_id=field("tokenizer.ggml.bos_token_id"),
        eos_id=field("tokenizer.ggml.eos_token_id"),
        unk_id=field("tokenizer.ggml.unknown_token_id"),
        pad_id=field("tokenizer.ggml.padding_token_id"),
        # llama.cpp's defaults for a byte-level vocabulary that does not say
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(field("tokenizer.ggml.add_eos_token", False)),
        chat_template=field("tokenizer.chat_template"),
        context_length=field(f"{arch}.context_length"),
        tensor_names=frozenset(t.name for t in reader.tensors),
    )


def check_supported(facts: GgufFacts, where: str) -> None:
    """One-line refusals for the files this conversion would get wrong, before any work."""
    if facts.architecture not in ARCHITECTURES:
        raise LongreachError(
            f"{where} is a {facts.architecture!r} GGUF; longreach converts "
            f"{', '.join(ARCHITECTURES)} GGUF files (or pass a Hugging Face model directory)."
        )
    if facts.tokenizer_model != "gpt2":
        raise LongreachError(
            f"{where} has a {facts.tokenizer_model!r} tokenizer; longreach converts GGUF files "
            "with byte-level BPE (gpt2) tokenizers only (or pass a Hugging Face model directory)."
        )
    if facts.pre not in PRE_TOKENIZERS:
        raise LongreachError(
            f"this GGUF's tokenizer uses the {facts.pre!r} pre-tokenizer, which longreach cannot "
            f"rebuild (it rebuilds {', '.join(PRE_TOKENIZERS)}); convert the model to a "
            "Hugging Face directory and pass that directory instead."
        )
    if "rope_freqs.weight" in facts.tensor_names:
        # llama.cpp stores Llama 3.1's RoPE scaling as per-frequency factors; transformers'
        # GGUF loader drops that tensor, which would give the model unscaled RoPE.
        raise LongreachError(
            f"{where} scales its RoPE with a rope_freqs tensor (Llama 3.1 style), which the "
            "GGUF conversion would drop; pass the model's Hugging Face directory instead."
        )


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


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where a user's GGUF file is converted: one folder per file content."""
    from longreach.models.cache_dir import models_dir

    digest = source_fingerprint(gguf_path)["sha256_ends"][:12]
    return models_dir() / "gguf" / f"{gguf_path.stem}-{digest}"


def gguf_config_dict(gguf_path: Path) -> dict[str, Any]:
    """The model config transformers reads from a GGUF file, without loading the weights."""
    from transformers import AutoConfig

    with _quiet():
        config = AutoConfig.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    return config.to_dict()


@contextlib.contextmanager
def _quiet():
    """Keep transformers' GGUF progress bars off the user's terminal.

    Its dequantization loop uses a bare ``tqdm`` that ``disable_progress_bar`` does not
    reach, and library code must not print; logging keeps its own stream.
    """
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _special_tokens(facts: GgufFacts) -> dict[str, Any]:
    """bos/eos/unk/pad by the ids the GGUF states.

    transformers 5.2 names the BOS as the EOS of every Llama GGUF (SmolLM2's EOS becomes
    ``<|im_start|>``), so the names are taken from the file's ids here. A padding token that
    is the BOS (or none) is replaced by the EOS: padding with the BOS would start a new text.
    """
    pad_id = facts.pad_id if facts.pad_id not in (None, facts.bos_id) else facts.eos_id
    return {
        "bos_token": facts.token(facts.bos_id),
        "eos_token": facts.token(facts.eos_id),
        "unk_token": facts.token(facts.unk_id),
        "pad_token": facts.token(pad_id),
        "pad_token_id": pad_id,
    }


def _fix_tokenizer(backend: Any, facts: GgufFacts) -> Any:
    """transformers' tokenizer for this file, with what transformers gets wrong put right.

    Kept from transformers: the BPE vocabulary and merges. Replaced here, the same on 5.2
    and 5.24: the normalizer and pre-tokenizer (from ``PRE_TOKENIZERS``), a byte-level
    decoder (5.2 puts sentencepiece steps before it), a plain byte-level BPE model (5.2 turns
    on byte fallback and an unknown token), and the added tokens: exactly the file's control
    tokens as special and its user-defined tokens as plain added tokens (5.2 adds
    CodeLlama's infill tokens, or Qwen's chat tokens, past the model's vocabulary).
    """
    from tokenizers import AddedToken, Tokenizer, decoders

    normalizer, pre_tokenizer = PRE_TOKENIZERS[facts.pre].build()
    data = json.loads(backend.to_str())
    vocab_size = len(facts.tokens)
    data["added_tokens"] = []
    data["normalizer"] = None
    data["post_processor"] = None  # transformers rebuilds it from add_bos_token/add_eos_token
    model = data["model"]
    model.update(
        unk_token=None,
        byte_fallback=False,
        fuse_unk=False,
        continuing_subword_prefix=None,
        end_of_word_suffix=None,
    )
    bad = [t for t, i in model["vocab"].items() if i >= vocab_size or facts.tokens[i] != t]
    if bad or len(model["vocab"]) != vocab_size:
        raise LongreachError(
            f"transformers read a tokenizer vocabulary that differs from the GGUF's "
            f"({len(model['vocab'])} tokens against {vocab_size}); pass the model's Hugging "
            "Face directory instead."
        )
    tk = Tokenizer.from_str(json.dumps(data))
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in facts.of_type(_CONTROL)]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in facts.of_type(_USER_DEFINED)]
    )
    return tk


def _build_tokenizer(gguf_path: Path, facts: GgufFacts, model_max_length: int) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with _quiet():
        read = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    special = _special_tokens(facts)
    named = {special[k] for k in ("bos_token", "eos_token", "unk_token")}
    controls = facts.of_type(_CONTROL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_fix_tokenizer(read.backend_tokenizer, facts),
        bos_token=special["bos_token"],
        eos_token=special["eos_token"],
        unk_token=special["unk_token"],
        pad_token=special["pad_token"],
        additional_special_tokens=[t for t in controls if t not in named],
        # Passing both flags makes transformers build the BOS/EOS post-processor (5.2 and 5.24).
        add_bos_token=facts.add_bos and special["bos_token"] is not None,
        add_eos_token=facts.add_eos and special["eos_token"] is not None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if facts.chat_template:
        fast.chat_template = facts.chat_template
    return fast


def _load_model(gguf_path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from longreach import compat

    try:
        with _quiet():
            return AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                local_files_only=True,
                **compat.gguf_dense_kwargs(),
            )
    except ValueError as exc:
        if "accelerate" in str(exc):
            raise LongreachError(
                "converting a GGUF file needs the accelerate package; install it with "
                "`pip install 'longreach[gguf]'`."
            ) from None
        raise


def _save_model(model: Any, facts: GgufFacts, special: dict[str, Any], out_dir: Path) -> None:
    from safetensors.torch import save_file

    config = model.config
    for name in ("quantization_config", "_model_name_or_path"):  # the GGUF reader's, not the copy's
        if hasattr(config, name):
            delattr(config, name)
    config.architectures = [type(model).__name__]
    config.pad_token_id = special["pad_token_id"]
    config.bos_token_id = facts.bos_id
    config.eos_token_id = facts.eos_id
    # A tied weight is written once, under its first name (the embedding), as
    # save_pretrained does; from_pretrained ties the head to it again.
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    add_legacy_rope_fields(out_dir)
    gen = {"bos_token_id": facts.bos_id, "eos_token_id": facts.eos_id}
    gen["pad_token_id"] = special["pad_token_id"]
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def add_legacy_rope_fields(folder: Path) -> None:
    """Give ``folder/config.json`` the 4.x-era RoPE fields it lacks (atomically; idempotent).

    Without them a tool pinned to transformers 4.x reads the folder with RoPE base 10000
    whatever the model's real base (see ``compat.legacy_rope_fields``).
    """
    from longreach import compat

    path = folder / "config.json"
    saved = json.loads(path.read_text())
    missing = compat.legacy_rope_fields(saved)
    if not missing:
        return
    saved.update(missing)
    tmp = path.with_name(f"config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def convert_gguf(gguf_path: Path, target: Path, extra: dict[str, Any] | None = None) -> Path:
    """Convert ``gguf_path`` into the HF directory ``target`` atomically; return ``target``."""

    fingerprint = source_fingerprint(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time per target; a second process waits, then finds it done.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target, fingerprint):
            add_legacy_rope_fields(target)
            return target
        return _convert_locked(gguf_path, target, fingerprint, extra)


def _convert_locked(
    gguf_path: Path, target: Path, fingerprint: dict[str, Any], extra: dict[str, Any] | None
) -> Path:
    facts = read_facts(gguf_path)
    check_supported(facts, str(gguf_path))
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a conversion that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    start = time.perf_counter()
    try:
        special = _special_tokens(facts)
        model = _load_model(gguf_path)
        _save_model(model, facts, special, tmp)
        context = facts.context_length or model.config.max_position_embeddings
        del model
        _build_tokenizer(gguf_path, facts, int(context)).save_pretrained(str(tmp))
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

"""``load(name_or_path)``: a model and its tokenizer from an alias or a local directory, offline."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from longreach import compat
from longreach.errors import LongreachError
from longreach.models.info import ROPE_FAMILIES, TESTED_FAMILIES, has_rope
from longreach.models.registry import ALIASES, get_alias

log = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return compat.default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise LongreachError(
            f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32 or auto."
        ) from None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local model directory behind an alias or a path, with one-line errors."""
    name = str(name_or_path)
    alias = get_alias(name)
    if alias is not None:
        return alias.resolve()
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_path = (
            os.sep in name
            or name.startswith((".", "~"))
            or (os.altsep is not None and os.altsep in name)
        )
        if looks_like_path:
            raise LongreachError(f"model path {name} does not exist.")
        known = ", ".join(sorted(ALIASES))
        raise LongreachError(
            f"unknown model alias {name!r}; known aliases: {known} (or pass a local model directory)."
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        from longreach.models.gguf_convert import convert_gguf, gguf_cache_dir

        return convert_gguf(path, gguf_cache_dir(path))
    if not path.is_dir():
        raise LongreachError(
            f"{name} is a file, not a model directory; pass the folder that holds config.json "
            "(or a .gguf file)."
        )
    if not (path / "config.json").is_file():
        raise LongreachError(
            f"{name} is not a model directory: it has no config.json (expected a Hugging Face model folder)."
        )
    return path


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types here; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongreachError(f"cannot read the model config in {path}: {first}") from None


def check_supported(config: Any, where: str) -> None:
    """Raise a one-line error for an architecture without rotary position embeddings."""
    if not has_rope(config):
        arch = getattr(config, "model_type", None) or "unknown"
        raise LongreachError(
            f"{where} is a {arch} model, which has no rotary position embeddings; longreach "
            f"supports RoPE models such as {', '.join(ROPE_FAMILIES)}."
        )
    if getattr(config, "model_type", None) not in TESTED_FAMILIES:
        log.warning(
            "%s is a %s model: it has RoPE but is not in longreach's tested families (%s)",
            where,
            getattr(config, "model_type", "?"),
            ", ".join(TESTED_FAMILIES),
        )


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        name_or_path: an alias (``longreach models`` lists them), a local Hugging Face
            model directory, or a ``.gguf`` file (converted once into ``$LONGREACH_HOME``).
        dtype: ``bf16``/``fp16``/``fp32`` or a ``torch.dtype``; default bf16 where the
            device computes it faster than fp32 (CUDA, or a CPU with AMX-BF16, or
            AVX512-BF16 where a matmul probe says so: ``compat.cpu_supports_bf16``), else fp32.
        device: default CUDA when available, else CPU.
        attn_implementation: the transformers attention backend to start from.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the tokenizer padding on the
        left, as batched generation needs.
    """
    compat.check_versions()
    dev = torch.device(device) if device is not None else compat.default_device()
    torch_dtype = parse_dtype(dtype, dev)
    if torch_dtype == torch.float16 and dev.type == "cpu":
        # The CPU flash-attention op crashes on fp16 with a padding mask, and CPUs have no
        # fp16 matmul units that bf16 lacks: refuse rather than crash later.
        raise LongreachError(
            "fp16 is not supported on the CPU (its attention kernel fails on padded fp16 "
            "inputs); use dtype='bf16' or 'fp32', or load onto a GPU."
        )
    with _offline():
        return _load(name_or_path, dev, torch_dtype, attn_implementation)


@contextlib.contextmanager
def _offline():
    """Tell transformers and huggingface_hub to stay offline during a load, then restore.

    The variables are set for the load only: a user's own later hub calls are theirs.
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load(name_or_path, dev, torch_dtype, attn_implementation):
    path = resolve_model_dir(name_or_path)
    config = _load_config(path)
    check_supported(config, str(name_or_path))

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no "Loading weights" bar
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                config=config,
                dtype=torch_dtype,
                local_files_only=True,
                attn_implementation=attn_implementation,
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongreachError(f"cannot load the model in {path}: {first}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # A causal LM continues the last token of each row, so a batch is padded on the left;
    # right padding makes `generate` continue the pad tokens of the shorter rows.
    tokenizer.padding_side = "left"
    if getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.longreach_source = str(name_or_path)  # shown in reports and cell keys
    return model, tokenizer

"""The only module that knows how transformers (and torch) versions differ.

Supported: transformers 5.2 (the oldest) to 5.24 (the newest tested). Differences
handled here:

- the forward keyword for the KV cache: ``past_key_values=`` up to 5.23, ``cache=``
  from 5.24 on (attention modules and attention functions receive the same name);
- ``cache_position``: passed through forward and attention up to 5.3, removed after;
- the RoPE configuration: ``config.rope_parameters`` (5.x) with a fallback to the
  4.x-era ``rope_scaling`` + ``rope_theta`` attributes that some saved configs still carry,
  and the 4.x fields written next to ``rope_parameters`` in the configs we save
  (:func:`legacy_rope_fields`), because transformers 4.x reads only those;
- private torch ops reached through one function each (see below);
- loading a GGUF file: 5.24 keeps quantized weights packed unless told to dequantize.
- sliding-window attention: which layers slide (:func:`sliding_windows`) and how the mask
  interface is told (:func:`sliding_window_of`).

Everything else in longreach calls these helpers instead of testing versions itself.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
TORCH_VERSION = Version(torch.__version__.split("+")[0])
MIN_TRANSFORMERS = Version("5.2.0")


def check_versions() -> None:
    """Raise a one-line error when the installed transformers is older than supported."""
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
        from longreach.errors import LongreachError

        raise LongreachError(
            f"longreach needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}; "
            "upgrade with `pip install -U 'transformers>=5.2,<6'`."
        )


# --------------------------------------------------------------------------- cache kwarg


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = _forward_parameters(type(model))
    if "cache" in params:
        return "cache"
    return "past_key_values"


def takes_cache_position(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` still accepts ``cache_position`` (transformers <= 5.3)."""
    return "cache_position" in _forward_parameters(type(model))


def forward_kwargs(
    model: torch.nn.Module,
    cache: Any = None,
    past_length: int | None = None,
    query_length: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Keyword arguments that pass ``cache`` to ``model.forward`` on this transformers version.

    ``past_length`` and ``query_length`` are needed only on versions that still take
    ``cache_position`` (it is then ``arange(past_length, past_length + query_length)``).
    """
    kwargs: dict[str, Any] = {cache_kwarg(model): cache}
    if takes_cache_position(model) and past_length is not None and query_length is not None:
        kwargs["cache_position"] = torch.arange(
            past_length, past_length + query_length, device=device
        )
    return kwargs


def output_cache(outputs: Any) -> Any:
    """The cache returned by a forward call (``outputs.past_key_values`` or ``outputs.cache``)."""
    for name in ("cache", "past_key_values"):  # 5.24 warns when past_key_values is read
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def attention_cache(kwargs: dict[str, Any]) -> Any:
    """The cache object handed to an attention module or attention function."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


# --------------------------------------------------------------------------- RoPE config


def rope_parameters(config: Any) -> dict[str, Any] | None:
    """The model's RoPE parameters as one dict (``rope_type``, ``rope_theta``, ...), or None without RoPE."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        # Some multi-layer-type models (Gemma 3) nest one dict per attention type.
        if "rope_type" not in params and "rope_theta" not in params:
            first = next(iter(params.values()))
            if isinstance(first, dict):
                return dict(first)
        return dict(params)
    theta = getattr(config, "rope_theta", None)
    scaling = getattr(config, "rope_scaling", None)
    if theta is None and not scaling:
        return None
    out: dict[str, Any] = {"rope_type": "default"}
    if isinstance(scaling, dict):
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    if theta is not None:
        out["rope_theta"] = theta
    return out


def legacy_rope_fields(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The 4.x-era ``rope_theta`` / ``rope_scaling`` fields for a saved 5.x ``config.json``.

    transformers 5 writes only ``rope_parameters``; transformers 4 (and the tools pinned to
    it: the authors' code of most long-context papers, older vLLM) ignores that key and
    silently falls back to ``rope_theta = 10000``, a different model whenever the real base
    differs (SmolLM2's is 100000). Writing both keeps a saved folder readable by either.
    Returns only the fields missing from ``config_dict`` (nothing without RoPE parameters).
    """
    params = config_dict.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return {}
    out: dict[str, Any] = {}
    if "rope_theta" not in config_dict:
        out["rope_theta"] = params["rope_theta"]
    kind = params.get("rope_type", "default")
    if kind != "default" and not config_dict.get("rope_scaling"):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        out["rope_scaling"] = {**scaling, "type": kind}
    return out


def set_rope_parameters(config: Any, params: dict[str, Any]) -> None:
    """Write RoPE parameters back to ``config`` in the form this transformers version reads."""
    config.rope_parameters = dict(params)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# --------------------------------------------------------------------------- GGUF


def gguf_dense_kwargs() -> dict[str, Any]:
    """Keywords for ``from_pretrained(..., gguf_file=...)`` that give a plain dense model.

    transformers 5.24 loads a GGUF through a quantizer that keeps quantized blocks packed in
    ``GgufLinear`` layers (with a hub attention kernel) when it can; ``GgufConfig(dequantize=True)``
    asks for ordinary dense weights. 5.2 always dequantizes and has no ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# --------------------------------------------------------------------------- hardware


# CPU feature flags that mean bf16 matmuls run on real units: AMX-BF16 on x86
# (/proc/cpuinfo "flags"), the BF16 extension on Arm ("Features"). AVX512-BF16 alone
# decides nothing: it was measured 4x faster than fp32 on one CPU and slower on another,
# so there a short matmul probe decides (see cpu_supports_bf16).
_BF16_FLAGS = frozenset({"amx_bf16", "bf16"})
_BF16_PROBE_FLAG = "avx512_bf16"
# bf16 is chosen on an AVX512-BF16 CPU when a 256^3 matmul runs at least this many
# times faster in bf16 than in fp32 (measured 4.0-4.2x where it pays, below 1x where not).
_BF16_PROBE_MIN_RATIO = 1.5


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_matmul_speedup(n: int = 256, repeats: int = 5) -> float:
    """fp32 time over bf16 time of one ``n x n`` matmul on this CPU (best of ``repeats``).

    Runs on the threads torch uses now; about 5-20 ms where bf16 has units. Called only on
    CPUs whose flags leave the answer open (AVX512-BF16 without AMX).
    """
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up: oneDNN picks and caches its kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when bf16 matmuls beat fp32 on this CPU.

    AMX-BF16 on x86 and BF16 on Arm: yes. AVX512-BF16 without AMX: a 256^3 matmul probe
    decides (:func:`bf16_matmul_speedup` at least 1.5x), because that flag alone was
    measured both ways. Anything else: no. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
    is not used: it is True on every AVX-512 CPU, where oneDNN only emulates bf16, and a
    bf16 model there runs 3-4x slower than fp32 (SmolLM2 1k prefill: 8.8-10.5 s against
    2.8-3.2 s). Measured on one core (torch 2.13):

    - AMD EPYC, AVX2 only: fp32 80-137 GFLOP/s, bf16 0.3-1.4;
    - Intel Xeon, AVX-512 without bf16 units: fp32 about 300, bf16 about 60;
    - Intel Xeon (model 207) with AVX512-BF16 but no AMX exposed: fp32 126, bf16 74
      (2048^3 matmul); flash attention 4k causal 181 ms fp32, 378 ms bf16; SmolLM2 2k
      prefill 7.4-8.0 s fp32, 10.8-11.8 s bf16;
    - AMD EPYC (family 26, Zen 5) with AVX512-BF16: fp32 80-82, bf16 316-375 (1024^3 and
      2048^3); the 256^3 probe 4.0-4.2x; flash attention 4k causal 295 ms fp32, 289 ms
      bf16; SmolLM2 2k prefill 9.7-10.1 s fp32, 4.3-4.6 s bf16;
    - Intel Xeon (Sapphire Rapids) with AMX-BF16: fp32 111, bf16 1420 (1024^3 matmul).
    """
    flags = cpu_flags()
    if flags & _BF16_FLAGS:
        return True
    if _BF16_PROBE_FLAG in flags:
        return bf16_matmul_speedup() >= _BF16_PROBE_MIN_RATIO
    return False


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- attention


def cpu_flash_attention() -> Any:
    """torch's CPU flash-attention op that also returns each row's log-sum-exp, or None.

    ``aten::_scaled_dot_product_flash_attention_for_cpu`` is private (torch >= 2.3):
    ``(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None)
    -> (output, logsumexp)`` with query (B, Hq, L, D), key and value (B, Hkv, S, D) where
    Hkv divides Hq (grouped-query attention without repeating K/V), output (B, Hq, L, D)
    in the query's dtype and logsumexp (B, Hq, L) in fp32 (natural log, scale applied).
    ``is_causal`` with L != S aligns the triangle top-left. A float ``attn_mask`` must
    have the query's dtype; a row whose scores are all -inf gets logsumexp 0, not -inf.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op


_FLEX: dict[str, Any] = {}


def flex_attention(device: torch.device) -> Any:
    """``torch.nn.attention.flex_attention`` as ``f(q, k, v, block_mask, scale) -> (o, lse)``.

    Grouped-query attention is native (``enable_gqa``: K/V are never repeated per query
    head); ``lse`` is each row's natural-log log-sum-exp of its scaled scores, fp32, -inf
    for a row that sees no key (its output is 0). On CUDA the function is compiled once
    (``torch.compile``, dynamic shapes) into fused kernels; elsewhere it runs eagerly, which
    materialises each call's scores and is only for checking exactness. None when this
    torch has no flex attention (torch < 2.5). torch >= 2.9 asks for the log-sum-exp with
    ``return_aux=AuxRequest(lse=True)``; older versions with ``return_lse=True``.
    """
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    kind = "cuda" if device.type == "cuda" else "eager"
    fn = _FLEX.get(kind)
    if fn is not None:
        return fn
    raw = module.flex_attention
    if kind == "cuda":
        raw = torch.compile(raw, dynamic=True)
    aux = getattr(module, "AuxRequest", None)

    def call(q, k, v, block_mask, scale):
        if kind == "eager":  # torch warns that eager flex is unfused: known, it is a check
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return fused(q, k, v, block_mask, scale)
        return fused(q, k, v, block_mask, scale)

    def fused(q, k, v, block_mask, scale):
        if aux is not None:
            out, extra = raw(
                q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                return_aux=aux(lse=True),
            )  # fmt: skip
            return out, extra.lse
        return raw(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)

    _FLEX[kind] = call
    return call


def flex_block_mask(
    kv_num_blocks, kv_indices, full_num_blocks, full_indices, block, mask_mod, q_len, kv_len
):
    """A flex ``BlockMask`` from block tables (B, H, q blocks[, kv blocks]) and a ``mask_mod``."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_num_blocks, full_indices,
        BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
    )  # fmt: skip


def mask_query_range(mask_kwargs: dict[str, Any]) -> tuple[int, int]:
    """(q_offset, q_length) from the keywords an ``AttentionMaskInterface`` function receives.

    transformers 5.2-5.3 pass ``cache_position`` (the query positions); later versions
    pass ``q_offset`` and ``q_length`` instead.
    """
    if mask_kwargs.get("q_length") is not None:
        return int(mask_kwargs.get("q_offset") or 0), int(mask_kwargs["q_length"])
    cache_position = mask_kwargs.get("cache_position")
    if cache_position is None:
        raise TypeError("the attention-mask function got neither q_length nor cache_position")
    q_length = int(cache_position.shape[0])
    return (int(cache_position[0]) if q_length else 0), q_length


def _closure(fn: Any) -> dict[str, Any]:
    """The free variables a closure captured, by name (empty for a plain function)."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return {}
    try:
        return {
            name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)
        }
    except ValueError:  # an empty cell
        return {}


def sliding_window_of(mask_function: Any, mask_kwargs: dict[str, Any]) -> int | None:
    """The window w when ``mask_function`` is exactly transformers' sliding-window causal mask.

    That mask lets query i see key j when ``0 <= i - j < w``. transformers 5.2 to 5.24 build
    it as ``and_masks(sliding_window_overlay(w), causal_mask_function)`` and pass
    ``local_size=w`` to the mask interface; both are checked (the closures' code objects and
    captured values), so any further overlay (packed sequences, image tokens, a chunked or
    bidirectional window) gives None and is not mistaken for a plain window.
    """
    window = mask_kwargs.get("local_size")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return None
    from transformers import masking_utils as mu

    expected = mu.sliding_window_causal_mask_function(window)
    if getattr(mask_function, "__code__", None) is not expected.__code__:
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    overlay, causal = parts
    if causal is not mu.causal_mask_function:
        return None
    if getattr(overlay, "__code__", None) is not mu.sliding_window_overlay(window).__code__:
        return None
    return window if _closure(overlay).get("sliding_window") == window else None


def sliding_windows(model: torch.nn.Module) -> dict[int, int | None]:
    """Each attention layer's sliding window in tokens (None: full attention), by layer index.

    Qwen2-style models choose per layer (``config.layer_types``, from ``use_sliding_window``
    and ``max_window_layers``) and store the choice on the module as ``sliding_window``;
    Mistral and Phi-3 apply ``config.sliding_window`` to every layer. Read from the modules
    that call the attention function (those with a ``layer_idx`` and KV groups).
    """
    out: dict[int, int | None] = {}
    for m in model.modules():
        if not (hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")):
            continue
        config = getattr(m, "config", None)
        if hasattr(m, "sliding_window"):
            window = m.sliding_window
        else:
            window = getattr(config, "sliding_window", None)
        out[int(m.layer_idx)] = int(window) if window else None
    return out


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``logits_to_keep`` (compute the LM head on the last positions only)."""
    return "logits_to_keep" in _forward_parameters(type(model))


# ---- methods: transformers' attention registries and caches


def attn_implementation(model: torch.nn.Module) -> str:
    """The name of the attention implementation ``model`` uses now (a private config field)."""
    return model.config._attn_implementation


def register_attention(
    name: str, attention_fn: Any, mask_fn: Any | None, previous: str | None = None
) -> None:
    """Register ``attention_fn`` under ``name`` with ``AttentionInterface`` and a matching
    ``AttentionMaskInterface`` entry: ``mask_fn``, or else the mask function of the
    implementation ``previous`` (sdpa's when it has none), because a name missing from the
    mask interface makes transformers silently drop padding masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if mask_fn is None:
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(previous) or ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def is_fresh_default_cache(cache: Any) -> bool:
    """No cache, or an empty plain ``DynamicCache`` (what ``generate`` creates by default)."""
    from transformers import DynamicCache

    return cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)


# ---- measure


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` tokens of a KV cache.

    ``Cache.crop`` took the length to keep up to 5.2x and takes the number of tokens to
    remove (as a negative number; a positive one raises) in 5.24; a negative count means
    "remove that many" in both, so that is what is passed.
    """
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if remove:
        cache.crop(-remove)

"""Tiny randomly-initialised models built from configs, for fast tests.

``tiny_model(family)`` returns an fp32 model in eval mode with a fixed seed: Llama,
Qwen2, Mistral and Gemma, each with grouped-query attention (4 query heads, 2 KV heads),
sliding windows off; ``"mistral-swa"`` and ``"qwen2-swa"`` (:data:`SLIDING`) turn them on.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

FAMILIES = ("llama", "qwen2", "mistral", "gemma")

# The same families with sliding-window attention on, the window (96) shorter than the
# test inputs: every Mistral layer slides; Qwen2's first layer is full, its second slides
# (use_sliding_window with max_window_layers=1).
SLIDING = {
    "mistral-swa": ("mistral", dict(sliding_window=96)),
    "qwen2-swa": ("qwen2", dict(use_sliding_window=True, sliding_window=96, max_window_layers=1)),
}

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def tiny_config(family: str = "llama", **overrides):
    if family in SLIDING:
        family, sliding = SLIDING[family]
        overrides = {**sliding, **overrides}
    kwargs = dict(_COMMON)
    if family == "llama":
        cls = LlamaConfig
    elif family == "qwen2":
        cls = Qwen2Config
        kwargs["use_sliding_window"] = False
    elif family == "mistral":
        cls = MistralConfig
        kwargs["sliding_window"] = None
    elif family == "gemma":
        cls = GemmaConfig
        kwargs["head_dim"] = 16
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(
    family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides
):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


def sharp_model(family: str = "llama", scale: float = 8.0, **overrides):
    """A tiny model whose attention depends strongly on which keys it sees (q/k weights x scale).

    At initialisation scores are near zero, attention is almost uniform and a change of
    position or of the keys seen moves logits by ~1e-4; scaled up, a wrong rule shows at once.
    """
    model = tiny_model(family, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)
    return model


def tokens(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Random token ids (batch, n) in the tiny vocabulary, for a seed."""
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))

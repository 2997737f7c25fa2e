"""Facts about a model read from its config: trained context length, RoPE support."""

from __future__ import annotations

from typing import Any

# Families whose attention applies rotary embeddings through transformers' shared
# rotary module and attention interface; the ones marked tested run in the test suite.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
ROPE_FAMILIES = TESTED_FAMILIES + ("qwen3", "gemma2", "phi3", "olmo", "olmo2", "granite", "smollm3")


def trained_length_from_dict(config: dict[str, Any]) -> int:
    """The context length the model was trained on.

    A config whose RoPE was already scaled (``rope_parameters`` / ``rope_scaling`` with
    ``original_max_position_embeddings``) was trained on that original length;
    otherwise ``max_position_embeddings``.
    """
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("original_max_position_embeddings"):
            return int(params["original_max_position_embeddings"])
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if config.get(key):
            return int(config[key])
    raise ValueError("the config names no context length (max_position_embeddings)")


def trained_length(model_or_config: Any) -> int:
    """Trained context length of a model or config object."""
    config = getattr(model_or_config, "config", model_or_config)
    return trained_length_from_dict(config.to_dict())


def has_rope(config: Any) -> bool:
    from longreach import compat

    if compat.rope_parameters(config) is None:
        return False
    # Some configs carry a rope_theta for families whose attention ignores it.
    return getattr(config, "position_embedding_type", "rotary") in ("rotary", "rope")

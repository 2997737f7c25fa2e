"""Dynamic NTK: the RoPE base grows with the current length, and only past L."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from longreach.methods.base import Patch, param
from longreach.methods.registry import register
from longreach.methods.rope import RopeMethod, default_inv_freq, ntk_base, set_frequencies
from longreach.prefill import current_planned_length


def dynamic_ntk_frequencies(
    head_dim: int, base: float, factor: float, trained_length: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """For a current length n > L: b' = b·((s·n/L) − (s−1))^(d/(d−2)); plain RoPE when n <= L.

    At n = L the scale (s·n/L) − (s−1) is 1, so the frequencies are continuous in n;
    it then grows linearly with n, by s for every L tokens.
    """
    if seq_len is None or seq_len <= trained_length:
        return default_inv_freq(head_dim, base), 1.0
    scale = factor * seq_len / trained_length - (factor - 1)
    return default_inv_freq(head_dim, ntk_base(base, head_dim, scale)), 1.0


def _position_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    # Rotary modules are called as rotary_emb(x, position_ids), positionally or by keyword.
    if "position_ids" in kwargs:
        return kwargs["position_ids"]
    return args[1] if len(args) > 1 else None


@register
@dataclasses.dataclass
class DynamicNTK(RopeMethod):
    """Dynamic NTK scaling (emozilla, 2023; section 3.3 of Peng et al., 2023, arXiv 2309.00071).

    Before each forward pass the base is recomputed from the current length n (the
    largest position id + 1): plain RoPE while n <= L, and beyond it the NTK base for
    the scale (s·n/L) − (s−1), so short inputs are computed exactly as the unmodified
    model computes them. Equals transformers' ``dynamic`` rope type on a fresh model,
    with one difference on purpose: the frequencies are a function of the current
    length only, so a later shorter input gets them back. (transformers 5.2 never
    resets them after a long input; 5.24 keeps those of the longest input seen while a
    later input is still longer than L.)

    Chunked prefill: the length n is that of the whole input being prefilled, which
    ``longreach.prefill.prefill`` (and ``advance``) announce before the first chunk
    (``planned_length``), so prefill in chunks of any size computes what one forward
    computes. A forward call outside such an announcement uses its own largest
    position: feeding one input in several bare calls (transformers'
    ``prefill_chunk_size``, or a loop of your own without ``planned_length``) rotates
    early chunks' keys with the scale of a shorter length, a different function.

    Cached keys during decoding: each step recomputes the base for the new length,
    but keys already in the KV cache keep the rotation they got when they were
    computed. A query at length n and a key cached at length n' < n were rotated
    with different bases, so their score no longer depends only on their distance;
    the mismatch is largest for the prompt's keys and grows as decoding moves n away
    from the prompt length (slowly: the base changes by about a factor (n/n')^(d/(d-2))).
    transformers' ``dynamic`` behaves the same; re-rotating the whole cache each step
    would cost O(n) per token. A fixed base for a known length is ``ntk``.

    Degenerate setting: an input no longer than ``original_max`` is computed exactly as
    by the unmodified model. factor 1 is not one: the scale is then n/L, still growing.

    Parameters:
        factor: s (default 4): the NTK scale grows by s for every L tokens past L.
        original_max: L, the length up to which RoPE stays unchanged (default: the
            model's trained length).
    """

    shares_prefix: ClassVar[bool] = False  # the base depends on the whole input's length
    name: ClassVar[str] = "dynamic-ntk"
    paper: ClassVar[str] = (
        "emozilla, 2023, Dynamically Scaled RoPE; Peng et al., 2023, YaRN, arXiv 2309.00071, section 3.3"
    )
    summary: ClassVar[str] = "NTK base recomputed from the current length n > L"

    factor: float = param(4.0, "s: NTK scale (s*n/L)-(s-1) at the current length n > L")
    original_max: int | None = param(None, "L: plain RoPE up to this length (default: the model's)")

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        return dynamic_ntk_frequencies(head_dim, base, self.factor, trained_length, seq_len)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        for target in self.targets(model):
            module = target.module
            original = (module.inv_freq, module.attention_scaling)
            # Recorded first, so that undo (last in, first out) removes the hook and then
            # puts the original buffer object back.
            patch.set_attr(module, "inv_freq", original[0])
            patch.set_attr(module, "attention_scaling", original[1])
            patch.forward_pre_hook(module, self._updater(target, original))

    def _updater(self, target: Any, original: tuple[torch.Tensor, float]) -> Any:
        last_length: list[int | None] = [None]

        def update(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            position_ids = _position_ids(args, kwargs)
            if position_ids is None:
                return
            seq_len = int(position_ids.max()) + 1
            planned = current_planned_length()  # a chunked prefill's whole input
            if planned is not None:
                seq_len = max(seq_len, planned)
            if seq_len <= target.trained_length:
                seq_len = None  # one state for every length up to L: the original buffer
            if seq_len == last_length[0]:
                return
            last_length[0] = seq_len
            if seq_len is None:
                module.inv_freq, module.attention_scaling = original
            else:
                inv_freq, attention_factor = self.frequencies(
                    target.head_dim, target.base, target.trained_length, seq_len
                )
                set_frequencies(module, inv_freq, attention_factor)

        return update

"""A transformers ``Cache`` that really frees the tokens a policy evicts.

Each layer holds the resident tokens only: keys and values ``(1, Hkv, R, D)``, each slot's
position per KV head (``positions``, (Hkv, R)) and the policy's running score per slot
(``scores``, (Hkv, R) fp32). :meth:`EvictingLayer.keep` replaces them with new, smaller
tensors holding the chosen slots: memory is freed, never masked.

The cache tells two lengths apart, as the block memory does: ``get_seq_length`` is the
*virtual* length (every token seen: what position ids count), ``get_mask_sizes`` the
*resident* one, so the attention mask and the attention function see ``R + q`` keys whose
last ``q`` are the call's queries. Every resident slot precedes every query, so a causal
rule over slots is the policy's attention: each query sees what the cache kept and the
earlier tokens of its own call.

With a ``rotary`` module the cache keeps positions *inside the cache* (StreamingLLM's
rule, which SirLLM keeps): every update returns the keys rotated by their slot, so no
position exceeds the cache's size; the caller feeds the queries at slot positions. Keys
are stored un-rotated (``keys``: what every rotation starts from, so rotations never
compound); a call's own keys are returned as the model rotated them. A multi-token call
(a prefill chunk) rotates the older keys for that call only, since its eviction moves most
slots. While decoding the layer also keeps the keys rotated by slot (``rotated``, built at
the first decoded token, dropped at the next longer call): a decoded token appends its key
as given, and its eviction re-rotates only the slots from the first one that moved (the
tail after the evicted token), not the whole cache. Without a ``rotary`` module keys stay
as the model rotated them (true positions).

Kept slots are copied with ``index_select`` on rows of ``D`` channels (per KV head through
a flat view), not ``gather`` with an index expanded over the channels: at a 2048-token
budget on SmolLM2 the gathers were a quarter of a decoded token's time.

One sequence at a time (batch 1).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from longreach.attention.kernel import gather_rows, row_index
from longreach.attention.rotary import rotate
from longreach.errors import LongreachError

__all__ = ["EvictingCache", "EvictingLayer"]


class EvictingLayer(DynamicLayer):
    """One layer of an :class:`EvictingCache`."""

    def __init__(self, owner: EvictingCache, layer: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.seen = 0
        self.positions: torch.Tensor | None = None  # (Hkv, R) long
        self.scores: torch.Tensor | None = None  # (Hkv, R) fp32
        self.rotated: torch.Tensor | None = None  # (1, Hkv, R, D): keys by slot (rotary only)

    @property
    def resident(self) -> int:
        keys = self.keys if self.is_initialized else None
        return 0 if keys is None or keys.dim() < 4 else int(keys.shape[-2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise LongreachError(
                f"{self.owner.method} keeps one sequence per cache, got a batch of "
                f"{key_states.shape[0]}; run the sequences one by one."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, heads = key_states.shape[-2], key_states.shape[1]
        device = key_states.device
        rotary = self.owner.rotary
        by_slot = None
        if rotary is not None:  # fed at slots R .. R + n: store them un-rotated
            past = self.resident
            if n == 1 and self.rotated is not None:  # decoding: extend the kept rotated keys
                self.rotated = torch.cat([self.rotated, key_states], dim=-2)
            else:  # the older keys rotated by slot, then the call's keys as the model gave them
                older = torch.arange(past, device=device)
                by_slot = key_states if not past else torch.cat(
                    [rotate(self.keys, older, rotary.inv_freq), key_states], dim=-2
                )  # fmt: skip
                # decoding starts: keep them; a longer call: for this call only, since its
                # eviction moves most slots (no extra copy resident at the prefill peak)
                self.rotated, by_slot = (by_slot, None) if n == 1 else (None, by_slot)
            slots = torch.arange(past, past + n, device=device)
            key_states = rotate(key_states, -slots, rotary.inv_freq)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = torch.arange(self.seen, self.seen + n, device=device).expand(heads, n)
        zeros = torch.zeros(heads, n, device=device)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], 1)
        self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], 1)
        self.seen += n
        if rotary is not None:
            return (self.rotated if by_slot is None else by_slot), self.values
        return self.keys, self.values

    def keep(self, index: torch.Tensor) -> None:
        """Keep the slots ``index`` ((Hkv, R') per KV head, or (R',) for all), in that order."""
        heads = self.keys.shape[1]
        index = index.to(self.keys.device)
        if index.dim() == 1:  # one choice for every head: whole rows of (Hkv, D) slices
            self.keys = self.keys.index_select(2, index)
            self.values = self.values.index_select(2, index)
            self.positions = self.positions.index_select(1, index)
            self.scores = self.scores.index_select(1, index)
            index = index[None]
        else:  # per head: rows of a (Hkv * R, D) view
            flat = row_index(self.keys, index).flatten()  # before the keys change shape
            self.keys = gather_rows(self.keys, index)
            self.values = gather_rows(self.values, index)
            self.positions = self.positions.reshape(-1).index_select(0, flat).view(heads, -1)
            self.scores = self.scores.reshape(-1).index_select(0, flat).view(heads, -1)
        if self.rotated is not None:
            # slots below the first that moved keep their rotation; the rest are re-rotated
            kept = index.shape[-1]
            moved = (index != torch.arange(kept, device=index.device)).any(0).nonzero()
            first = int(moved[0]) if len(moved) else kept
            tail = torch.arange(first, kept, device=index.device)
            self.rotated = torch.cat(
                [
                    self.rotated[:, :, :first],
                    rotate(self.keys[:, :, first:], tail, self.owner.rotary.inv_freq),
                ],
                dim=-2,
            )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers <= 5.3 passes cache_position
            query_length = query_length.shape[0]
        return self.resident + int(query_length), self.seen - self.resident

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, tokens: int) -> None:
        keep = self.seen + tokens if tokens < 0 else tokens
        if keep >= self.seen:
            return
        if self.resident != self.seen:
            raise LongreachError(
                f"{self.owner.method} has evicted tokens, so its cache cannot be cut back to "
                "an earlier length; start a new cache instead."
            )
        super().crop(keep)
        if self.rotated is not None:
            self.rotated = self.rotated[:, :, :keep]
        self.positions, self.scores = self.positions[:, :keep], self.scores[:, :keep]
        self.seen = keep

    def reset(self) -> None:
        raise LongreachError(f"{self.owner.method}: start a new cache instead of resetting one.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise LongreachError(f"{self.owner.method} keeps one sequence; no beam search.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1:
            raise LongreachError(f"{self.owner.method} keeps one sequence; no beam search.")

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.keys, self.values, self.rotated, self.positions, self.scores):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


class EvictingCache(Cache):
    """The KV cache of an eviction policy (``method`` names it in errors): a layer per attention layer.

    ``rotary``: keep positions inside the cache (see the module docstring); None: true
    positions. ``extra`` holds a policy's own state (e.g. token scores shared by layers).
    """

    # A question after a document makes the policy evict document tokens, which a crop
    # cannot bring back: a ``longreach.Context`` copies this cache per question.
    context_reuse = "copy"

    def __init__(self, *, layers: int, method: str, rotary: torch.nn.Module | None = None) -> None:
        self.method = method
        self.rotary = rotary
        self.extra: dict[str, Any] = {}
        super().__init__(layers=[EvictingLayer(self, i) for i in range(layers)])

    def layer(self, idx: int) -> EvictingLayer:
        return self.layers[idx]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[min(layer_idx, len(self.layers) - 1)].seen

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[min(layer_idx, len(self.layers) - 1)].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def resident(self) -> list[int]:
        """Resident tokens per layer."""
        return [layer.resident for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's keys, values, positions and scores."""
        return sum(layer.nbytes for layer in self.layers)

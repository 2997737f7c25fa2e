"""A transformers ``Cache`` whose past is a resident local part plus a block memory.

Each layer keeps (see :class:`MemoryLayer`):

- the **resident** part: keys (rotated, as the model produced them) and values of the
  tokens at positions ``[slot_base, seen)``, what ``update`` returns to the attention module;
- the **memory**: the ``init`` first tokens and complete blocks of ``block`` tokens, their
  keys stored un-rotated (:class:`~longreach.memory.store.BlockStore`), with one
  representative key per block and KV head for retrieval;
- **scores**: for tokens not yet in a block, the attention they received so far (what
  picks a block's representatives).

The cache tells the two lengths apart: ``get_seq_length`` is the *virtual* length (every
token seen: what positions and ``cache_position`` count), ``get_mask_sizes`` the
*resident* one (``kv_length`` slots starting at position ``kv_offset``), which the mask
function turns into the attention function's slot offsets. Which tokens move from the
resident part into memory is decided by the method's layout during a call
(:meth:`MemoryLayer.add_block`); ``update`` drops them from the resident part at the start
of the next call, with new, smaller tensors (memory is freed, not masked).

One sequence at a time (batch 1): each sequence has its own memory.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from longreach.errors import LongreachError
from longreach.memory.store import BlockStore, Budget

__all__ = ["BlockMemoryCache", "MemoryLayer"]


class MemoryLayer(DynamicLayer):
    """One layer of a :class:`BlockMemoryCache` (the fields are described there)."""

    def __init__(self, owner: BlockMemoryCache, layer: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.seen = 0
        self.slot_base = 0  # position of resident slot 0
        self.started = False  # init tokens moved to memory (the first sparse chunk ran)
        self.n_blocks = 0
        self.init_k: torch.Tensor | None = None  # (Hkv, init, D) un-rotated
        self.init_v: torch.Tensor | None = None
        self.reps: torch.Tensor | None = None  # (capacity, Hkv, D) fp32
        self.scores: torch.Tensor | None = None  # (Hkv, n) fp32 for positions [score_base, ..)
        self.store: BlockStore | None = None

    # ---- geometry shared with the mask

    @property
    def memory_end(self) -> int:
        """Positions below this are in memory (init + complete blocks), once started."""
        if not self.started:
            return 0
        return self.owner.init + self.n_blocks * self.owner.block

    @property
    def score_base(self) -> int:
        return self.owner.init + self.n_blocks * self.owner.block

    # ---- transformers layer API

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise LongreachError(
                f"a block memory holds one sequence, got a batch of {key_states.shape[0]}; "
                "run one sequence per call (each gets its own memory)."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cut = self.memory_end - self.slot_base
        if cut > 0:  # tokens the last call moved into memory leave the resident part
            self.keys = self.keys[:, :, cut:]
            self.values = self.values[:, :, cut:]
            self.slot_base += cut
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers <= 5.3 passes cache_position
            query_length = query_length.shape[0]
        base = max(self.slot_base, self.memory_end)
        return self.seen - base + int(query_length), base

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, tokens: int) -> None:
        keep = self.seen + tokens if tokens < 0 else tokens
        if keep >= self.seen:
            return
        if keep < max(self.slot_base, self.memory_end) + self.owner.window:
            raise LongreachError(
                "a block memory can only be cut back inside its local window; start a new "
                "cache instead."
            )
        drop = self.seen - keep
        self.keys = self.keys[:, :, :-drop]
        self.values = self.values[:, :, :-drop]
        self.seen = keep
        if self.scores is not None:
            self.scores = self.scores[:, : max(0, keep - self.score_base)]

    def reset(self) -> None:
        raise LongreachError("a block memory cannot be reset; start a new cache instead.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise LongreachError("a block memory holds one sequence; beam search is not supported.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1:
            raise LongreachError("a block memory holds one sequence; beam search is not supported.")

    # ---- memory, for the method's layout

    def start(self, init_keys: torch.Tensor, init_values: torch.Tensor) -> None:
        """Move the ``init`` first tokens (keys un-rotated, (Hkv, init, D)) into memory."""
        self.init_k, self.init_v = init_keys, init_values
        self.started = True
        heads, _, dim = init_keys.shape
        if self.store is None:
            self.store = BlockStore(
                heads,
                self.owner.block,
                dim,
                init_keys.dtype,
                self.owner.kv_dtype,
                self.owner.budget,
                self.layer,
                self.owner.resident_blocks,
            )

    def add_block(self, keys: torch.Tensor, values: torch.Tensor, rep: torch.Tensor) -> None:
        """Append the next block (keys un-rotated) and its representative (Hkv, D)."""
        self.store.append(keys, values)
        if self.reps is None or self.n_blocks == self.reps.shape[0]:
            cap = max(16, int(self.n_blocks * 1.5) + 1)
            reps = torch.empty(cap, *rep.shape, dtype=torch.float32, device=rep.device)
            if self.reps is not None:
                reps[: self.n_blocks] = self.reps[: self.n_blocks]
            self.reps = reps
        self.reps[self.n_blocks] = rep
        self.n_blocks += 1
        if self.scores is not None:
            self.scores = self.scores[:, self.owner.block :]

    def representatives(self) -> torch.Tensor:
        """(n_blocks, Hkv, D) fp32."""
        if self.reps is None:
            return torch.empty(0)
        return self.reps[: self.n_blocks]

    def add_scores(self, start: int, scores: torch.Tensor) -> None:
        """Add received attention (Hkv, n) to the tokens at positions ``start ..``."""
        offset = start - self.score_base
        if offset < 0:  # tokens already in a block keep the scores they had
            scores = scores[:, -offset:]
            offset = 0
        if scores.shape[1] == 0:
            return
        need = offset + scores.shape[1]
        if self.scores is None:
            self.scores = torch.zeros(scores.shape[0], need, device=scores.device)
        elif self.scores.shape[1] < need:
            pad = torch.zeros(scores.shape[0], need - self.scores.shape[1], device=scores.device)
            self.scores = torch.cat([self.scores, pad], dim=1)
        self.scores[:, offset:need] += scores

    def block_scores(self, heads: int) -> torch.Tensor:
        """(heads, block) scores of the next block to form (zeros where none were added)."""
        block = self.owner.block
        if self.scores is None:
            return torch.zeros(heads, block)
        have = self.scores[:, :block]
        if have.shape[1] < block:
            have = torch.cat([have, have.new_zeros(have.shape[0], block - have.shape[1])], dim=1)
        return have

    @property
    def memory_bytes(self) -> int:
        """Bytes of this layer's memory blocks in RAM plus its resident part."""
        total = self.store.nbytes if self.store is not None else 0
        for t in (self.keys, self.values, self.init_k, self.init_v, self.reps, self.scores):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


class BlockMemoryCache(Cache):
    """The KV cache of a block-memory method: a :class:`MemoryLayer` per attention layer.

    ``init``, ``block`` and ``window`` are the method's geometry (all layers share it);
    ``kv_dtype`` the storage dtype of blocks (None: the model's); ``budget`` the RAM
    bytes for blocks of all layers together (None: unbounded), beyond which blocks go to
    files under ``offload_dir``; ``resident_blocks`` the disk blocks per layer kept in RAM.
    """

    def __init__(
        self,
        *,
        layers: int,
        init: int,
        block: int,
        window: int,
        kv_dtype: str | None = None,
        budget: int | None = None,
        offload_dir: str | None = None,
        resident_blocks: int = 64,
    ) -> None:
        self.init, self.block, self.window = init, block, window
        self.kv_dtype = kv_dtype
        self.budget = Budget(budget, 0, offload_dir)
        self.resident_blocks = resident_blocks
        super().__init__(layers=[MemoryLayer(self, i) for i in range(layers)])

    def layer(self, idx: int) -> MemoryLayer:
        """The memory of layer ``idx``."""
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
    def memory_bytes(self) -> int:
        """RAM bytes of every layer's memory and resident part (disk blocks not counted)."""
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def disk_blocks(self) -> int:
        return sum(layer.store.disk_blocks for layer in self.layers if layer.store is not None)

    @property
    def context_reuse(self) -> str:
        """How a ``longreach.Context`` answers a question from this memory: from a copy (a
        question's tokens would evict document blocks), possible while no block is on disk."""
        if self.disk_blocks:
            raise LongreachError(
                f"this infllm memory keeps {self.disk_blocks} blocks on disk, which a context "
                "cannot copy per question; give infllm a budget that holds the document in RAM."
            )
        return "copy"

    def close(self) -> None:
        """Delete this memory's files on disk now (they are also deleted when it is collected)."""
        self.budget.close()

"""KV memories: caches whose past lives partly outside the attention's resident keys.

- :mod:`~longreach.memory.block_cache` — :class:`BlockMemoryCache`, a transformers ``Cache``
  of a resident local part plus memory blocks with representative keys (InfLLM);
- :mod:`~longreach.memory.store` — :class:`BlockStore`, the blocks of one layer in RAM up to
  a budget and then on disk, in the model's dtype, bf16, fp16 or int8.
"""

from longreach.memory.block_cache import BlockMemoryCache, MemoryLayer
from longreach.memory.store import KV_DTYPES, BlockStore, Budget, sweep_stale

__all__ = ["KV_DTYPES", "BlockMemoryCache", "BlockStore", "Budget", "MemoryLayer", "sweep_stale"]

"""Block storage for a KV memory: RAM up to a budget, then files on disk, in any storage dtype.

A :class:`BlockStore` holds the memory blocks of one attention layer: block ``b`` is the
un-rotated keys and the values of ``block`` consecutive tokens, (KV heads, block, head
dim) each. Blocks are appended in order and read back by index, several at a time, into
one staging tensor (:meth:`BlockStore.gather`).

Tiers:

- **RAM**: one block-major tensor per layer, grown by 1.5x. ``kv_dtype`` may store
  blocks in bf16 or fp16 (half the bytes of fp32) or int8 (a quarter, with one fp32
  scale per token and head: ``x ~ q * scale``, ``scale = max|x| / 127``) while the model
  computes in its own dtype.
- **disk**: once the shared :class:`Budget` is spent, new blocks are appended to a file
  per layer in a run folder and read back with ``pread``; the operating system's page cache
  keeps hot blocks fast without counting them in the process's memory, and an LRU of
  ``resident`` blocks per layer keeps the ones retrieved most recently as tensors. Reads
  use plain file I/O rather than a memory map on purpose: pages of a mapped file count
  in the process's resident memory once touched, so a map would not keep RSS bounded.

Crash safety: a run folder belongs to one process (its pid is in the folder name) and
is deleted when the memory is closed or collected. Nothing ever reads a folder it did
not create in this process, and :func:`sweep_stale` removes the folders of processes
that died (a SIGKILLed run), so a later run never trusts a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from longreach.errors import LongreachError

__all__ = ["KV_DTYPES", "BlockStore", "Budget", "sweep_stale"]

KV_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
}
_PREFIX = "longreach-memory-"


@dataclass
class Budget:
    """RAM bytes the stores of one memory may use together (None: unbounded), and where to spill."""

    limit: int | None = None
    used: int = 0
    offload_dir: str | None = None
    folder: str | None = None  # this run's folder, made on first spill

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of RAM if the budget allows; False means: go to disk."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def run_folder(self) -> str:
        if self.folder is None:
            if self.offload_dir is None:
                raise LongreachError(
                    "the memory's RAM budget is spent and no offload_dir was given; raise "
                    "budget= or pass offload_dir=<folder> to spill blocks to disk."
                )
            os.makedirs(self.offload_dir, exist_ok=True)
            sweep_stale(self.offload_dir)
            self.folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self.offload_dir)
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(offload_dir: str) -> list[str]:
    """Delete run folders in ``offload_dir`` whose process is gone; returns what was removed."""
    removed = []
    try:
        names = os.listdir(offload_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        try:
            pid = int(name[len(_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(os.path.join(offload_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


class BlockStore:
    """The memory blocks of one layer; see the module docstring for the tiers."""

    def __init__(
        self,
        heads: int,
        block: int,
        head_dim: int,
        compute_dtype: torch.dtype,
        kv_dtype: str | None,
        budget: Budget,
        layer: int,
        resident: int = 64,
    ) -> None:
        self.heads, self.block, self.head_dim = heads, block, head_dim
        self.compute_dtype = compute_dtype
        self.int8 = kv_dtype == "int8"
        self.dtype = KV_DTYPES[kv_dtype] if kv_dtype else compute_dtype
        self.budget = budget
        self.layer = layer
        self.resident = resident
        self.ram_blocks = 0  # blocks [0, ram_blocks) are in RAM, the rest on disk
        self.count = 0
        self._k = self._v = None  # (heads, capacity, block, head_dim)
        self._ks = self._vs = None  # int8 scales (heads, capacity, block)
        self._file: int | None = None
        self._lru: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        # K and V, plus one fp32 scale per (head, token) for each with int8
        self.block_bytes = 2 * heads * block * head_dim * self.dtype.itemsize
        if self.int8:
            self.block_bytes += 2 * heads * block * 4

    # ---- bytes

    @property
    def nbytes(self) -> int:
        """Bytes of blocks held in RAM (what the budget counts)."""
        return self.ram_blocks * self.block_bytes

    @property
    def disk_blocks(self) -> int:
        return self.count - self.ram_blocks

    # ---- encode / decode

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.int8:
            return x.to(self.dtype), None
        xf = x.float()
        scale = xf.abs().amax(-1).clamp(min=1e-12) / 127.0
        return torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale

    def _decode(self, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            return q.to(self.compute_dtype)
        return (q.float() * scale[..., None]).to(self.compute_dtype)

    # ---- append

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add one block: keys and values (heads, block, head_dim), keys un-rotated."""
        if self.disk_blocks == 0 and self.budget.take(self.block_bytes):
            self._append_ram(keys, values)
        else:
            self._append_disk(keys, values)
        self.count += 1

    def _append_ram(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = self.ram_blocks
        if self._k is None or n == self._k.shape[1]:
            cap = max(8, int(n * 1.5) + 1)
            shape = (self.heads, cap, self.block, self.head_dim)
            k = torch.empty(shape, dtype=self.dtype, device=keys.device)
            v = torch.empty(shape, dtype=self.dtype, device=keys.device)
            if self._k is not None:
                k[:, :n] = self._k[:, :n]
                v[:, :n] = self._v[:, :n]
            self._k, self._v = k, v
            if self.int8:
                ks = torch.empty(shape[:3], dtype=torch.float32, device=keys.device)
                vs = torch.empty(shape[:3], dtype=torch.float32, device=keys.device)
                if self._ks is not None:
                    ks[:, :n] = self._ks[:, :n]
                    vs[:, :n] = self._vs[:, :n]
                self._ks, self._vs = ks, vs
        qk, sk = self._encode(keys)
        qv, sv = self._encode(values)
        self._k[:, n], self._v[:, n] = qk, qv
        if self.int8:
            self._ks[:, n], self._vs[:, n] = sk, sv
        self.ram_blocks += 1

    def _append_disk(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._file is None:
            path = os.path.join(self.budget.run_folder(), f"layer{self.layer}.blocks")
            self._file = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            weakref.finalize(self, os.close, self._file)
        qk, sk = self._encode(keys)
        qv, sv = self._encode(values)
        parts = [qk, qv] if not self.int8 else [qk, qv, sk, sv]
        data = b"".join(p.contiguous().cpu().view(torch.uint8).numpy().tobytes() for p in parts)
        offset = (self.count - self.ram_blocks) * self.block_bytes
        written = os.pwrite(self._file, data, offset)
        if written != len(data):
            raise LongreachError(
                f"could not write a memory block to {self.budget.folder} (disk full?)."
            )

    def _read_disk(self, b: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        hit = self._lru.get(b)
        if hit is not None:
            self._lru.move_to_end(b)
            return hit
        size = self.block_bytes
        raw = os.pread(self._file, size, (b - self.ram_blocks) * size)
        if len(raw) != size:
            raise LongreachError(f"memory block {b} of layer {self.layer} is truncated on disk.")
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        shape = (self.heads, self.block, self.head_dim)
        n = self.heads * self.block * self.head_dim * self.dtype.itemsize
        k = buf[:n].view(self.dtype).view(shape)
        v = buf[n : 2 * n].view(self.dtype).view(shape)
        if self.int8:
            m = self.heads * self.block * 4
            ks = buf[2 * n : 2 * n + m].view(torch.float32).view(shape[:2])
            vs = buf[2 * n + m : 2 * n + 2 * m].view(torch.float32).view(shape[:2])
            item = (k.to(device), v.to(device), ks.to(device), vs.to(device))
        else:
            item = (k.to(device), v.to(device))
        self._lru[b] = item
        if len(self._lru) > self.resident:
            self._lru.popitem(last=False)
        return item

    # ---- read

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of blocks ``index`` as (heads, n * block, head_dim) in the compute dtype.

        ``index``: (n,) block indices shared by all heads, or (heads, n) one list per head.
        """
        device = self._k.device if self._k is not None else torch.device("cpu")
        per_head = index.dim() == 2
        if self.disk_blocks == 0:
            if per_head:
                heads = torch.arange(self.heads, device=index.device)[:, None]

                def pick(x):
                    return x[heads, index]
            else:

                def pick(x):
                    return x.index_select(1, index)

            k = self._decode(pick(self._k), pick(self._ks) if self.int8 else None)
            v = self._decode(pick(self._v), pick(self._vs) if self.int8 else None)
            return k.flatten(1, 2), v.flatten(1, 2)
        rows = index if per_head else index[None].expand(self.heads, -1)
        ks, vs = [], []
        for h in range(self.heads):
            kh, vh = [], []
            for b in rows[h].tolist():
                if b < self.ram_blocks:
                    kb, vb = self._k[h, b], self._v[h, b]
                    sk = self._ks[h, b] if self.int8 else None
                    sv = self._vs[h, b] if self.int8 else None
                else:
                    item = self._read_disk(b, device)
                    kb, vb = item[0][h], item[1][h]
                    sk = item[2][h] if self.int8 else None
                    sv = item[3][h] if self.int8 else None
                kh.append(self._decode(kb, sk))
                vh.append(self._decode(vb, sv))
            ks.append(torch.cat(kh) if kh else torch.empty(0, self.head_dim))
            vs.append(torch.cat(vh) if vh else torch.empty(0, self.head_dim))
        return torch.stack(ks), torch.stack(vs)

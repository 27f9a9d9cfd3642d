"""Preallocated KV cache slots for one pipeline stage, sized from the memory the device has.

Layout per stage: ``k[layer, slot, kv_head, position, head_dim]`` (and ``v`` alike), zero-initialized
so that unwritten positions never hold NaN (a masked key still meets its value in ``P @ V``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    num_layers: int  # layers of this stage
    num_kv_heads: int  # kv heads held by this rank
    head_dim: int
    max_seq_len: int
    num_slots: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_seq_len", "num_slots"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"KV cache {name}={getattr(self, name)} must be positive")

    @staticmethod
    def bytes_per_slot_for(num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                           dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * max_seq_len * dtype_size(dtype)

    @property
    def bytes_per_slot(self) -> int:
        return self.bytes_per_slot_for(self.num_layers, self.num_kv_heads, self.head_dim, self.max_seq_len,
                                       self.dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * self.num_slots


def slots_for_memory(available_bytes: int, fraction: float, bytes_per_slot: int, *,
                     max_slots: int | None = None) -> int:
    """How many sequence slots fit in ``fraction`` of ``available_bytes``; at least one or an error."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"kv cache memory fraction={fraction} must be in (0, 1]")
    slots = int(available_bytes * fraction) // bytes_per_slot
    if slots < 1:
        need_mib = bytes_per_slot / 2**20
        have_mib = available_bytes * fraction / 2**20
        raise ConfigError(f"KV cache: one sequence slot needs {need_mib:.1f} MiB but only {have_mib:.1f} MiB "
                          f"is available ({fraction:.0%} of free memory); lower max_seq_len or raise the fraction")
    return min(slots, max_slots) if max_slots else slots


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the host's available memory for CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


class KVCache:
    """K and V tensors for every layer of a stage, one slot per running sequence."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu", *, spare_slots: int = 0) -> None:
        """``spare_slots`` beyond ``spec.num_slots`` take the writes of padding rows (engine/graphs.py);
        they are never read as a sequence's slot."""
        self.spec = spec
        self.spare_slot = spec.num_slots if spare_slots else None  # the first spare slot
        shape = (spec.num_layers, spec.num_slots + spare_slots, spec.num_kv_heads, spec.max_seq_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Store new keys/values; k, v: [N, kv_heads, head_dim] for N tokens at (slots[i], positions[i])."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def write_run(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: int, start: int) -> None:
        """Store [kv_heads, T, head_dim] keys/values of one slot at positions start..start+T-1."""
        stop = start + k.shape[1]
        self.k[layer, slot, :, start:stop] = k
        self.v[layer, slot, :, start:stop] = v

    def read(self, layer: int, slots: torch.Tensor | int | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` positions: [B, kv_heads, length, head_dim].

        Reads only the filled part; a single slot, or every slot (``slots=None``), is a view, no copy.
        """
        k, v = self.k[layer][:, :, :length], self.v[layer][:, :, :length]
        if slots is None:
            return k[:self.spec.num_slots], v[:self.spec.num_slots]
        if isinstance(slots, int):
            return k[slots: slots + 1], v[slots: slots + 1]
        return k.index_select(0, slots), v.index_select(0, slots)

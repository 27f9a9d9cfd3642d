"""A short capacity probe, run once at join: how fast this device multiplies and reads memory.

The planner uses two numbers per device: ``matmul_flops`` (prefill and large batches are
compute-bound) and ``memory_bandwidth`` (decode reads every weight once per token, so it is bound by
memory). ``memory_bandwidth`` is measured with the operation decode performs: a one-row linear layer
``F.linear(x[1, k], W[n, k])`` over a large matrix, counting the bytes of W read (plus x and the
output). A plain copy (bytes read + written per second) is measured too and reported as
``copy_bandwidth``: it is an upper bound that a slow gemv (e.g. bfloat16 on a CPU without native
support) does not reach, and decode does not either, hence the gemv number for planning.

The probe ends within about ``budget_s`` (on a CPU it uses most of it; a GPU needs far less, apart
from creating the CUDA context and cuBLAS handle if this process has not yet) and frees what it
allocated (emptying torch's CUDA cache). Repetitions are capped, so the budget is a bound.
:func:`estimate` gives conservative numbers without running anything (``--no-probe``, tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from node.inventory import Device, host_memory

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Conservative defaults for estimate(): below what current hardware reaches, so that an unprobed node
# is not handed more work than it can do. CPU: per torch thread, fp32 (an AVX2 core sustains 30-100
# GFLOP/s; a core's share of a socket's memory bandwidth is 5-10 GB/s), bandwidth capped at a
# dual-channel desktop's 20 GB/s. CUDA: a T4-class card in half precision (65 TFLOP/s peak, 320 GB/s).
CPU_FLOPS_PER_THREAD = 10e9
CPU_BANDWIDTH_PER_THREAD = 3e9
CPU_BANDWIDTH_CAP = 20e9
CUDA_FLOPS = 25e12
CUDA_BANDWIDTH = 250e9

# Nominal working sets: large enough to leave the caches, small enough for the budget.
_CPU_MATMUL_SIZES = (256, 512, 1024, 2048)
_CUDA_MATMUL_SIZES = (2048, 4096, 8192)
_CPU_STREAM_BYTES = 256 << 20
_CUDA_STREAM_BYTES = 1 << 30
_GEMV_COLS = 4096  # a typical hidden size: the row length of the weight matrix decode reads
_MAX_REPS = 50  # enough timed repetitions for a stable mean; the budget is a bound, not a target


@dataclass(frozen=True)
class ProbeResult:
    matmul_flops: float  # FLOP/s of a square matmul in the probe's dtype (2 n^3 per product)
    memory_bandwidth: float  # bytes/s read by a one-row linear layer (decode's operation)
    seconds: float  # wall time the probe took; 0.0 for estimate()
    copy_bandwidth: float = 0.0  # bytes/s read + written by a large tensor copy; 0.0 when not measured


def estimate(device: Device) -> ProbeResult:
    """Conservative capacity numbers without measuring (see the constants above for their basis)."""
    if device.kind == "cuda":
        return ProbeResult(matmul_flops=CUDA_FLOPS, memory_bandwidth=CUDA_BANDWIDTH, seconds=0.0)
    threads = max(1, device.threads)
    return ProbeResult(
        matmul_flops=CPU_FLOPS_PER_THREAD * threads,
        memory_bandwidth=min(CPU_BANDWIDTH_CAP, CPU_BANDWIDTH_PER_THREAD * threads),
        seconds=0.0,
    )


class _Clock:
    """Times ``reps`` calls of a function: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, torch_device: torch.device) -> None:
        import torch

        self._torch = torch
        self._cuda = torch_device.type == "cuda"

    def __call__(self, fn: Callable[[], object], reps: int) -> float:
        if not self._cuda:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            return time.perf_counter() - start
        begin = self._torch.cuda.Event(enable_timing=True)
        end = self._torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


def _per_call(clock: _Clock, fn: Callable[[], object], deadline: float, first: float | None = None) -> float:
    """Seconds per call of ``fn``: a batch of calls that ends by ``deadline`` (a perf_counter time).

    ``first`` is the time of one call already made after a warm-up; without it both are done here.
    """
    if first is None:
        clock(fn, 1)
        first = clock(fn, 1)
    reps = min(_MAX_REPS, int((deadline - time.perf_counter()) / max(first, 1e-9)))
    if reps < 2:
        return first
    return clock(fn, reps) / reps


def _matmul_flops(clock: _Clock, device: torch.device, dtype: torch.dtype, deadline: float, free: int) -> float:
    """FLOP/s of square matmuls, growing n while the next size (8x the work) still fits the slice."""
    import torch

    sizes = _CUDA_MATMUL_SIZES if device.type == "cuda" else _CPU_MATMUL_SIZES
    element = torch.empty((), dtype=dtype).element_size()
    fitting = [n for n in sizes if 3 * n * n * element <= free // 4] or [sizes[0]]
    for i, n in enumerate(fitting):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def matmul(a=a, b=b, out=out) -> None:
            torch.mm(a, b, out=out)

        clock(matmul, 1)  # warm-up: library initialisation, kernel selection
        one = clock(matmul, 1)
        left = deadline - time.perf_counter()
        if i + 1 < len(fitting) and 8 * one * 3 < left:
            continue  # the next size replaces these tensors; all are freed when this function returns
        return 2.0 * n**3 / _per_call(clock, matmul, deadline, first=one)
    raise AssertionError("unreachable: the loop returns at the last size")


def _gemv_bandwidth(clock: _Clock, device: torch.device, dtype: torch.dtype, deadline: float, nbytes: int) -> float:
    """Bytes/s read by a one-row linear layer over a weight of about ``nbytes`` (freed on return)."""
    import torch

    element = torch.empty((), dtype=dtype).element_size()
    rows = max(1, nbytes // (_GEMV_COLS * element))
    weight = torch.ones(rows, _GEMV_COLS, device=device, dtype=dtype)  # [rows, cols]; ones: touch every page
    x = torch.ones(1, _GEMV_COLS, device=device, dtype=dtype)  # [1, cols]: one decode token
    seconds = _per_call(clock, lambda: torch.nn.functional.linear(x, weight), deadline)
    return (weight.numel() + x.numel() + rows) * element / seconds


def _copy_bandwidth(clock: _Clock, device: torch.device, dtype: torch.dtype, deadline: float, nbytes: int) -> float:
    """Bytes/s read + written by copying a tensor of about ``nbytes`` (both buffers freed on return)."""
    import torch

    element = torch.empty((), dtype=dtype).element_size()
    src = torch.ones(max(1, nbytes // element), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    seconds = _per_call(clock, lambda: dst.copy_(src), deadline)
    return 2 * src.numel() * element / seconds


def _free_bytes(device: Device) -> int:
    """Free memory now (the inventory may be stale): the lower of the inventory's and the live number."""
    import torch

    if device.kind == "cuda":
        live, _ = torch.cuda.mem_get_info(device.index)
    else:
        _, live = host_memory()
    return min(live, device.free_memory_bytes) if device.free_memory_bytes else live


def _run(device: Device, dtype: torch.dtype, budget_s: float, started: float) -> ProbeResult:
    import torch

    target = torch.device(device.torch_device)
    clock = _Clock(target)
    free = _free_bytes(device)
    end = started + budget_s * 0.95  # the rest covers freeing and returning
    flops = _matmul_flops(clock, target, dtype, started + budget_s * 0.45, free)
    nominal = _CUDA_STREAM_BYTES if device.kind == "cuda" else _CPU_STREAM_BYTES
    # Scale the working set with the budget (2 s is nominal); two buffers must fit a quarter of free.
    nbytes = int(min(nominal * min(1.0, budget_s / 2.0), free // 8))
    nbytes = max(nbytes, 8 << 20)
    gemv = _gemv_bandwidth(clock, target, dtype, (time.perf_counter() + end) / 2, nbytes)
    copy = _copy_bandwidth(clock, target, dtype, end, nbytes)
    return ProbeResult(
        matmul_flops=flops,
        memory_bandwidth=gemv,
        seconds=time.perf_counter() - started,
        copy_bandwidth=copy,
    )


def probe(device: Device, *, dtype: torch.dtype | None = None, budget_s: float = 2.0) -> ProbeResult:
    """Measures ``device`` within about ``budget_s`` seconds (see the module docstring).

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. A CPU executor's probe runs with
    ``device.threads`` torch threads (the current count when 0) and restores the previous count.
    """
    import torch

    if budget_s <= 0:
        raise ValueError(f"budget_s={budget_s} must be positive")
    if dtype is None:
        dtype = torch.bfloat16 if device.kind == "cuda" else torch.float32
    started = time.perf_counter()
    if device.kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"cannot probe {device.spec}: torch.cuda is not available in this process")
        try:
            with torch.cuda.device(device.index):
                result = _run(device, dtype, budget_s, started)
        finally:
            torch.cuda.empty_cache()
    else:
        previous = torch.get_num_threads()
        torch.set_num_threads(device.threads or previous)
        try:
            result = _run(device, dtype, budget_s, started)
        finally:
            torch.set_num_threads(previous)
    log.debug("probe %s (%s): %s", device.spec, dtype, result)
    return result

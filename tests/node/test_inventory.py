"""Device specs, the node's inventory, host memory, and the capacity probe (CPU here; CUDA marked gpu)."""

from __future__ import annotations

import math
import os

import pytest

from node import inventory as inv
from node.inventory import Device, host_memory, inventory, parse_devices
from node.probe import ProbeResult, estimate, probe


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has ``n`` GPUs: returns a setter."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(inv, "gpu_count", lambda: n)

    return set_count


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("cpu", 0, [("cpu", 0)]),
        ("cpu:2", 0, [("cpu", 0), ("cpu", 1)]),
        (" CPU:1 ", 0, [("cpu", 0)]),
        ("cuda:0,cuda:1", 2, [("cuda", 0), ("cuda", 1)]),
        ("cuda:1,cuda:0", 2, [("cuda", 1), ("cuda", 0)]),
        ("cuda", 3, [("cuda", 0), ("cuda", 1), ("cuda", 2)]),
        ("cuda:0,cpu", 1, [("cuda", 0), ("cpu", 0)]),
        ("cpu:2,cuda:1", 2, [("cpu", 0), ("cpu", 1), ("cuda", 1)]),
        (None, 0, [("cpu", 0)]),
        (None, 2, [("cuda", 0), ("cuda", 1)]),
        ("all", 1, [("cuda", 0)]),
    ],
)
def test_parse_devices_forms(gpus, spec, count, expected):
    gpus(count)
    assert parse_devices(spec) == expected


def test_parse_devices_cpu_does_not_look_for_gpus(monkeypatch):
    def boom() -> int:
        raise AssertionError("gpu_count() was called for a CPU-only spec")

    monkeypatch.setattr(inv, "gpu_count", boom)
    assert parse_devices("cpu:3") == [("cpu", 0), ("cpu", 1), ("cpu", 2)]


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("cuda:7", 1, r"cuda:7 does not exist: this machine has 1 GPU \(cuda:0\)"),
        ("cuda:2", 2, r"cuda:2 does not exist: this machine has 2 GPUs \(cuda:0\.\.cuda:1\)"),
        ("cuda:0", 0, r"cuda:0 does not exist: this machine has no GPU"),
        ("cuda", 0, r"'cuda' .* every GPU but this machine has no GPU"),
        ("cpu:0", 0, r"cpu:0 .* no CPU executor"),
        ("cuda:0,cuda:0", 1, r"names cuda:0 twice"),
        ("cuda,cuda:1", 2, r"names cuda:1 twice"),
        ("cpu,cpu:2", 0, r"names cpu twice"),
        ("gpu:0", 1, r"'gpu:0' .* not understood"),
        ("cuda:-1", 1, r"'cuda:-1' .* not understood"),
        ("cuda:0,", 1, r"'' .* not understood"),
        ("", 0, r"is empty"),
        (" , ", 0, r"is empty"),
    ],
)
def test_parse_devices_errors(gpus, spec, count, message):
    gpus(count)
    with pytest.raises(ValueError, match=message):
        parse_devices(spec)


def test_cuda_visible_devices_parsing(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert inv._cuda_visible_devices() is None
    for value, expected in [
        ("1,0", [1, 0]),
        ("2,x,0", [2]),  # reading stops at the first bad entry, as in CUDA
        ("0,0", []),  # a repeated entry hides every GPU
        ("", []),
        ("GPU-ab,GPU-cd", ["GPU-ab", "GPU-cd"]),
        ("MIG-1", ["MIG-1"]),
    ]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert inv._cuda_visible_devices() == expected, value


def test_no_gpu_here_means_cpu(monkeypatch):
    """On this machine (no driver, CPU torch) gpu_count() is 0 and the default is one CPU executor."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert inv.gpu_count() == 0
    assert parse_devices(None) == [("cpu", 0)]


def test_inventory_cpu_split(monkeypatch):
    monkeypatch.setattr(inv, "usable_cores", lambda: 2)
    total, available = host_memory()
    devices = inventory("cpu:2")
    assert [(d.kind, d.index) for d in devices] == [("cpu", 0), ("cpu", 1)]
    for d in devices:
        assert d.threads == 1
        assert d.name and d.name == inv.cpu_model_name()
        assert d.total_memory_bytes == total // 2
        # available memory can move between the two reads: compare with a 5% tolerance of the share
        share = available * (1 - inv.CPU_MEMORY_MARGIN) / 2
        assert abs(d.free_memory_bytes - share) < 0.05 * share
        assert d.free_memory_bytes <= d.total_memory_bytes
        assert d.torch_device == "cpu"
    assert devices[1].spec == "cpu:1"


def test_inventory_threads_follow_this_machine():
    devices = inventory("cpu")
    assert len(devices) == 1 and devices[0].threads == inv.usable_cores()
    assert 1 <= inv.usable_cores() <= (os.cpu_count() or 1)
    # more executors than cores: each still gets one thread
    many = inventory(f"cpu:{inv.usable_cores() * 2}")
    assert all(d.threads == 1 for d in many)


def test_inventory_fake_gpus(monkeypatch):
    gpu_fn = inv._cuda_devices
    monkeypatch.setattr(inv, "gpu_count", lambda: 2)

    def fake(indices):
        return [
            Device(kind="cuda", index=i, name="Fake GPU", total_memory_bytes=80 << 30, free_memory_bytes=79 << 30)
            for i in indices
        ]

    monkeypatch.setattr(inv, "_cuda_devices", fake)
    devices = inventory("cpu,cuda:1")
    assert [d.spec for d in devices] == ["cpu:0", "cuda:1"]
    assert devices[1].threads == 0 and devices[1].torch_device == "cuda:1"
    assert gpu_fn([]) == []


def test_device_validation():
    with pytest.raises(ValueError, match="kind='tpu'"):
        Device(kind="tpu", index=0, name="x", total_memory_bytes=1, free_memory_bytes=1)
    with pytest.raises(ValueError, match="index=-1"):
        Device(kind="cpu", index=-1, name="x", total_memory_bytes=1, free_memory_bytes=1)
    with pytest.raises(ValueError, match="only CPU executors"):
        Device(kind="cuda", index=0, name="x", total_memory_bytes=1, free_memory_bytes=1, threads=4)


def test_host_memory_plausible():
    total, available = host_memory()
    assert 256 << 20 <= total <= 1 << 50
    assert 0 < available <= total


def test_cpu_model_name_nonempty():
    assert inv.cpu_model_name().strip()


def _cpu_device(threads: int) -> Device:
    total, available = host_memory()
    return Device(
        kind="cpu", index=0, name="cpu", total_memory_bytes=total, free_memory_bytes=available, threads=threads
    )


def _check(result: ProbeResult) -> None:
    for value in (result.matmul_flops, result.memory_bandwidth, result.copy_bandwidth, result.seconds):
        assert math.isfinite(value) and value > 0, result


def test_probe_cpu_within_budget_and_restores_threads():
    import torch

    before = torch.get_num_threads()
    budget = 1.0
    result = probe(_cpu_device(threads=1), budget_s=budget)
    _check(result)
    assert result.seconds <= 3 * budget, result
    assert 1e8 < result.matmul_flops < 1e13, result  # one thread: between a slow core and far beyond any
    assert 1e8 < result.memory_bandwidth < 1e12, result
    assert torch.get_num_threads() == before


def test_probe_cpu_small_budget_and_default_threads():
    import torch

    before = torch.get_num_threads()
    result = probe(_cpu_device(threads=0), budget_s=0.3)
    _check(result)
    assert result.seconds <= 0.9, result
    assert torch.get_num_threads() == before


def test_probe_rejects_bad_budget():
    with pytest.raises(ValueError, match="budget_s=0"):
        probe(_cpu_device(threads=1), budget_s=0)


def test_estimate():
    cpu = estimate(_cpu_device(threads=4))
    assert cpu.matmul_flops == 4 * estimate(_cpu_device(threads=1)).matmul_flops
    assert 0 < cpu.memory_bandwidth and cpu.seconds == 0.0
    gpu = estimate(Device(kind="cuda", index=0, name="g", total_memory_bytes=1, free_memory_bytes=1))
    assert gpu.matmul_flops > cpu.matmul_flops and gpu.memory_bandwidth > cpu.memory_bandwidth


@pytest.mark.gpu
def test_probe_cuda0():
    import torch

    (device,) = inventory("cuda:0")
    assert device.total_memory_bytes >= device.free_memory_bytes > 0 and device.name
    allocated = torch.cuda.memory_allocated(0)
    result = probe(device, budget_s=1.0)
    _check(result)
    assert result.seconds < 3.0, result
    assert result.matmul_flops > 1e12 and result.memory_bandwidth > 1e11, result
    # Only cuBLAS's workspace (tens of MiB, kept by torch for later matmuls) may stay behind.
    assert torch.cuda.memory_allocated(0) <= allocated + (64 << 20), torch.cuda.memory_summary(0)
    assert torch.cuda.memory_reserved(0) <= torch.cuda.memory_allocated(0) + (64 << 20)  # the cache was emptied

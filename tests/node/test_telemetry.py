"""Live device stats (node/telemetry.py) against a fake pynvml: units, absent fields on every NVML failure,
CPU devices, and the long-lived reader's cache and NVML lifetime."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import node.telemetry as telemetry
from node.inventory import Device, cpu_free_bytes
from tensorfleet.v1 import common_pb2

GPU_FIELDS = ("used_memory_bytes", "utilization_percent", "temperature_celsius", "power_watts")


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """The pynvml calls telemetry and inventory make, on ``count`` GPUs; ``fail`` names calls that raise."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int = 2, fail: tuple[str, ...] = ()) -> None:
        self.count, self.fail = count, set(fail)
        self.inits = self.shutdowns = self.memory_reads = 0

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise FakeNVMLError(f"{name}: Not Supported")

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self._check("init")
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._check("count")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetName(self, h: int) -> str:  # noqa: N802
        return "Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:  # noqa: N802
        self._check("memory")
        self.memory_reads += 1
        return SimpleNamespace(total=80 << 30, free=(70 << 30) + h, used=(10 << 30) - h)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:  # noqa: N802
        self._check("utilization")
        return SimpleNamespace(gpu=87 + h, memory=40)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        self._check("temperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 65 + h

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        self._check("power")
        return 123456 + h  # milliwatts


def gpu(index: int) -> Device:
    return Device(kind="cuda", index=index, name="Fake GPU", total_memory_bytes=80 << 30, free_memory_bytes=1)


def cpu(index: int) -> Device:
    return Device(kind="cpu", index=index, name="cpu", total_memory_bytes=8 << 30, free_memory_bytes=1, threads=1)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


@pytest.fixture(autouse=True)
def host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "host_memory", lambda: (16 << 30, 10 << 30))


def test_gpu_fields_come_from_nvml_in_the_right_units(nvml: FakeNVML) -> None:
    one, zero = telemetry.device_stats([gpu(1), gpu(0)])
    assert one == telemetry.DeviceStats(free_memory_bytes=(70 << 30) + 1, used_memory_bytes=(10 << 30) - 1,
                                        utilization_percent=88.0, temperature_celsius=66.0, power_watts=123.457)
    assert zero.power_watts == pytest.approx(123.456)
    assert nvml.inits == nvml.shutdowns == 1


def test_cpu_devices_get_their_share_of_free_host_memory_and_no_gpu_fields(nvml: FakeNVML) -> None:
    stats = telemetry.device_stats([cpu(0), cpu(1)])
    assert stats == [telemetry.DeviceStats(free_memory_bytes=cpu_free_bytes(10 << 30, 2))] * 2
    assert nvml.inits == 0  # no GPU: NVML is not touched


@pytest.mark.parametrize("fail", ["init", "count", "memory", "utilization", "temperature", "power"])
def test_an_nvml_failure_leaves_fields_out_and_never_raises(monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    fake = FakeNVML(fail=(fail,))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (stats,) = telemetry.device_stats([gpu(0)])
    missing = {name for name in (*GPU_FIELDS, "free_memory_bytes") if getattr(stats, name) is None}
    expected = {"init": {*GPU_FIELDS, "free_memory_bytes"}, "count": {*GPU_FIELDS, "free_memory_bytes"},
                "memory": {"used_memory_bytes", "free_memory_bytes"}, "utilization": {"utilization_percent"},
                "temperature": {"temperature_celsius"}, "power": {"power_watts"}}[fail]
    assert missing == expected
    assert fake.shutdowns == fake.inits  # every init is undone


def test_no_pynvml_or_an_unmapped_gpu_gives_no_gpu_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert telemetry.device_stats([gpu(0), cpu(0)]) == [
        telemetry.DeviceStats(), telemetry.DeviceStats(free_memory_bytes=cpu_free_bytes(10 << 30, 1))]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(count=1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")  # MIG: only torch can map it
    assert telemetry.device_stats([gpu(0)]) == [telemetry.DeviceStats()]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert telemetry.device_stats([gpu(3)]) == [telemetry.DeviceStats()]  # NVML sees one GPU only


def test_report_fills_the_live_fields_of_the_join_infos_and_leaves_the_rest(nvml: FakeNVML) -> None:
    nvml.fail = {"power"}
    infos = [common_pb2.DeviceInfo(kind=common_pb2.DEVICE_KIND_CUDA, index=0, ordinal=0, name="Fake GPU",
                                   total_memory_bytes=80 << 30, free_memory_bytes=1, matmul_flops=1e12),
             common_pb2.DeviceInfo(kind=common_pb2.DEVICE_KIND_CPU, index=1, name="cpu", free_memory_bytes=1)]
    t = telemetry.Telemetry([gpu(0), cpu(0)])
    g, c = t.report(infos)
    assert (g.name, g.matmul_flops, g.free_memory_bytes, g.utilization_percent) == ("Fake GPU", 1e12, 70 << 30, 87.0)
    assert g.HasField("temperature_celsius") and not g.HasField("power_watts")
    assert c.free_memory_bytes == cpu_free_bytes(10 << 30, 1)
    assert not any(c.HasField(name) for name in GPU_FIELDS)
    assert infos[0].free_memory_bytes == 1  # the join infos are not edited
    t.close()


def test_telemetry_keeps_nvml_open_and_rereads_at_most_once_a_refresh(nvml: FakeNVML) -> None:
    clock = SimpleNamespace(now=10.0)
    t = telemetry.Telemetry([gpu(0)], refresh_s=1.0, clock=lambda: clock.now)
    first = t.stats()
    clock.now += 0.5
    assert t.stats() is first and nvml.memory_reads == 1
    clock.now += 0.6
    t.stats()
    assert nvml.memory_reads == 2 and nvml.inits == 1 and nvml.shutdowns == 0
    t.close()
    assert nvml.shutdowns == 1

"""Live device stats for heartbeats: GPU memory, utilization, temperature and power through NVML, and the
free host memory of CPU devices.

A reading never raises: where NVML is missing (no package, no driver), cannot map a device (MIG), or
fails one query (a GPU that does not report power, a lost GPU), those fields are left out, so "not
available" stays distinct from a reading of 0 (DeviceInfo's optional fields). The daemon never falls back
to torch.cuda here: that would create a CUDA context in it, hundreds of MiB per GPU for its whole life.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.inventory import Device, cpu_free_bytes, host_memory, nvml_handles, nvml_open
from tensorfleet.v1 import common_pb2

log = logging.getLogger(__name__)

# Heartbeats may come every 100 ms; a reading is reused this long. A reading (4 NVML queries a GPU) took
# 0.05 ms on an H200 once warm, 6 ms the first time; power queries are slower on some boards.
REFRESH_S = 1.0


@dataclass(frozen=True, kw_only=True)
class DeviceStats:
    """One device's live state; None: not available."""

    free_memory_bytes: int | None = None
    used_memory_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


def _query(nvml, what: Callable[[], object], label: str, failures: set[str]) -> object | None:  # noqa: ANN001
    """One NVML query, or None when it fails; a failure is logged once per label (it repeats every second)."""
    try:
        return what()
    except nvml.NVMLError as e:
        if label not in failures:
            failures.add(label)
            log.info("NVML cannot read %s (%s): left out of heartbeats", label, e)
        return None


def gpu_stats(nvml, handle, label: str = "gpu", failures: set[str] | None = None) -> DeviceStats:  # noqa: ANN001
    """A GPU's live state from NVML; each query on its own, so one unsupported query costs only its field."""
    failures = set() if failures is None else failures
    memory = _query(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle), f"{label} memory", failures)
    util = _query(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle), f"{label} utilization", failures)
    temp = _query(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                  f"{label} temperature", failures)
    milliwatts = _query(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle), f"{label} power", failures)
    return DeviceStats(
        free_memory_bytes=int(memory.free) if memory is not None else None,
        used_memory_bytes=int(memory.used) if memory is not None else None,
        utilization_percent=float(util.gpu) if util is not None else None,
        temperature_celsius=float(temp) if temp is not None else None,
        power_watts=milliwatts / 1000.0 if milliwatts is not None else None,
    )


def cpu_stats(cpu_count: int) -> DeviceStats:
    """A CPU device's free memory: its share of the host's available memory, as inventory() computes at join."""
    try:
        _, available = host_memory()
    except (OSError, KeyError, ValueError) as e:  # no /proc/meminfo (not Linux), or an odd one
        log.info("cannot read host memory (%s): left out of heartbeats", e)
        return DeviceStats()
    return DeviceStats(free_memory_bytes=cpu_free_bytes(available, cpu_count))


def read_stats(devices: Sequence[Device], nvml=None, handles: list | None = None,  # noqa: ANN001
               failures: set[str] | None = None) -> list[DeviceStats]:
    """Stats of ``devices`` in order; GPUs through ``handles`` (CUDA ordinal order, see nvml_handles),
    left empty where ``nvml`` or ``handles`` is None or lacks the ordinal."""
    failures = set() if failures is None else failures
    cpu_count = sum(1 for d in devices if d.kind == "cpu")
    cpu = cpu_stats(cpu_count) if cpu_count else None
    out = []
    for dev in devices:
        if dev.kind == "cpu":
            out.append(cpu)
        elif nvml is None or handles is None or dev.index >= len(handles):
            out.append(DeviceStats())
        else:
            out.append(gpu_stats(nvml, handles[dev.index], dev.spec, failures))
    return out


def _open_handles():  # noqa: ANN202 - (pynvml module or None, handles or None)
    nvml = nvml_open()
    if nvml is None:
        return None, None
    try:
        return nvml, nvml_handles(nvml)
    except nvml.NVMLError as e:
        log.info("NVML cannot list the GPUs (%s): no GPU stats in heartbeats", e)
        return nvml, None


def device_stats(devices: Sequence[Device]) -> list[DeviceStats]:
    """One reading of ``devices`` (opens NVML and closes it again: for a long-lived caller, use Telemetry)."""
    telemetry = Telemetry(devices, refresh_s=0.0)
    try:
        return telemetry.stats()
    finally:
        telemetry.close()


def with_stats(info: common_pb2.DeviceInfo, stats: DeviceStats) -> common_pb2.DeviceInfo:
    """A copy of ``info`` (as sent at join) with the live fields of ``stats`` that are available."""
    out = common_pb2.DeviceInfo()
    out.CopyFrom(info)
    for name in ("free_memory_bytes", "used_memory_bytes", "utilization_percent", "temperature_celsius",
                 "power_watts"):
        value = getattr(stats, name)
        if value is not None:
            setattr(out, name, value)
    return out


class Telemetry:
    """Live stats of a node's devices, for its heartbeats. NVML is initialised here, once, and stays so until
    close(): an init took 9 ms on an H200, and can take seconds where the driver is not kept loaded
    (no persistence mode), which must not delay heartbeats. A reading is reused for ``refresh_s``."""

    def __init__(self, devices: Sequence[Device], *, refresh_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.devices, self.refresh_s, self.clock = list(devices), refresh_s, clock
        self._lock = threading.Lock()
        self._nvml, self._handles = _open_handles() if any(d.kind == "cuda" for d in self.devices) else (None, None)
        self._failures: set[str] = set()  # queries already logged as failing
        self._last: list[DeviceStats] | None = None
        self._read_at = 0.0

    def stats(self) -> list[DeviceStats]:
        with self._lock:
            now = self.clock()
            if self._last is None or now - self._read_at >= self.refresh_s:
                self._last = read_stats(self.devices, self._nvml, self._handles, self._failures)
                self._read_at = now
            return self._last

    def report(self, infos: Sequence[common_pb2.DeviceInfo]) -> list[common_pb2.DeviceInfo]:
        """The join-time ``infos`` (one per device, same order) with the live fields filled."""
        return [with_stats(info, s) for info, s in zip(infos, self.stats(), strict=True)]

    def close(self) -> None:
        with self._lock:
            nvml, self._nvml, self._handles = self._nvml, None, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as e:
                log.debug("nvmlShutdown failed: %s", e)

"""What this node can offer: its devices (GPUs through NVML or torch.cuda, CPU executors) and host memory.

Everything is read at call time (never at import time), and pynvml and torch are imported lazily, so
importing this module is cheap and a machine without a GPU driver works.

Device specs (``node join --devices``), parsed by :func:`parse_devices`:

- ``None`` or ``"all"``: every GPU when there is any, else one CPU executor.
- ``"cuda"``: every GPU; ``"cuda:0,cuda:1"``: those ordinals (torch's, i.e. after CUDA_VISIBLE_DEVICES).
- ``"cpu"``: one CPU executor; ``"cpu:N"`` (N >= 1): N CPU executors, numbered 0..N-1.
- Forms mix: ``"cuda:0,cpu"``.

GPU ordinals: NVML numbers GPUs by PCI bus id, CUDA (and torch) fastest first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID. The two agree on machines with identical GPUs; on a machine with mixed
GPU models set CUDA_DEVICE_ORDER=PCI_BUS_ID (a warning is logged when it is not set there).
CUDA_VISIBLE_DEVICES is honoured the way torch reads it (ordinals or GPU- UUID prefixes); MIG
instances are left to torch.cuda.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CPU_MEMORY_MARGIN = 0.10
"""Share of available host memory kept back from CPU executors (the OS, the daemon, page cache)."""

_KINDS = ("cuda", "cpu")
_TOKEN = re.compile(r"(cuda|cpu)(?::(\d+))?")


@dataclass(frozen=True, kw_only=True)
class Device:
    """One executor's device. For ``cpu`` the index numbers the node's CPU executors (not cores)."""

    kind: str  # "cuda" | "cpu"
    index: int  # cuda ordinal, or the CPU executor's index
    name: str  # GPU name, or the CPU model from /proc/cpuinfo
    total_memory_bytes: int
    free_memory_bytes: int
    threads: int = 0  # CPU executors: torch threads this executor may use; 0 for cuda
    uuid: str = ""  # a GPU's own id (NVML's "GPU-..."): two nodes on one machine may share a GPU; "": unknown

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Device kind={self.kind!r} is not one of {_KINDS}")
        if self.index < 0:
            raise ValueError(f"Device index={self.index} is negative")
        if self.total_memory_bytes < 0 or self.free_memory_bytes < 0:
            raise ValueError(
                f"Device memory must be >= 0 (total={self.total_memory_bytes}, free={self.free_memory_bytes})"
            )
        if self.threads < 0:
            raise ValueError(f"Device threads={self.threads} is negative")
        if self.kind == "cuda" and self.threads != 0:
            raise ValueError(f"Device threads={self.threads} is set for {self.spec}; only CPU executors take threads")

    @property
    def spec(self) -> str:
        """``cuda:1`` or ``cpu:0`` (the CPU executor's index): a label for logs and messages."""
        return f"{self.kind}:{self.index}"

    @property
    def torch_device(self) -> str:
        """The string for ``torch.device``: ``cuda:1``, or ``cpu`` for every CPU executor."""
        return self.spec if self.kind == "cuda" else "cpu"


# --- device specs ------------------------------------------------------------------------------------


def _gpus_phrase(count: int) -> str:
    if count == 0:
        return "this machine has no GPU"
    valid = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
    return f"this machine has {count} GPU{'s' if count != 1 else ''} ({valid})"


def parse_devices(spec: str | None) -> list[tuple[str, int]]:
    """Turns a device spec into ``[(kind, index), ...]`` in the order given (see the module docstring).

    Raises ValueError naming the bad part: unknown forms, GPUs that do not exist, ``cpu:0``, a device
    named twice, an empty spec. The GPU count is looked up only when the spec needs it.
    """
    if spec is None or spec.strip().lower() == "all":
        count = gpu_count()
        return [("cuda", i) for i in range(count)] if count else [("cpu", 0)]
    tokens = [t.strip().lower() for t in spec.split(",")]
    if not any(tokens):
        raise ValueError(f"device spec {spec!r} is empty; use e.g. cuda:0,cuda:1 or cpu:2 (or leave it out)")
    count: int | None = None
    out: list[tuple[str, int]] = []
    for token in tokens:
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(
                f"{token!r} in device spec {spec!r} is not understood; use cuda, cuda:N, cpu or cpu:N, "
                "comma-separated (e.g. cuda:0,cuda:1 or cpu:2)"
            )
        kind, number = match.group(1), match.group(2)
        if kind == "cpu":
            if any(k == "cpu" for k, _ in out):
                raise ValueError(f"device spec {spec!r} names cpu twice; use one cpu:N for N CPU executors")
            executors = 1 if number is None else int(number)
            if executors < 1:
                raise ValueError(f"{token} in {spec!r} asks for no CPU executor; use cpu, or cpu:N with N >= 1")
            new = [("cpu", i) for i in range(executors)]
        else:
            count = gpu_count() if count is None else count
            if number is None:
                if count == 0:
                    raise ValueError(f"'cuda' in {spec!r} asks for every GPU but {_gpus_phrase(0)}")
                new = [("cuda", i) for i in range(count)]
            else:
                if int(number) >= count:
                    raise ValueError(f"cuda:{int(number)} does not exist: {_gpus_phrase(count)}")
                new = [("cuda", int(number))]
        for device in new:
            if device in out:
                raise ValueError(f"device spec {spec!r} names {device[0]}:{device[1]} twice")
            out.append(device)
    return out


def inventory(spec: str | None) -> list[Device]:
    """The node's devices for ``spec`` (see :func:`parse_devices`), with memory and names read now.

    CPU executors share the host: each gets ``available * (1 - CPU_MEMORY_MARGIN) / n`` bytes free,
    ``total / n`` bytes total, and ``cores // n`` torch threads (at least 1), where n is the number of
    CPU executors on this node and cores are those this process may use (affinity and cgroup quota).
    """
    wanted = parse_devices(spec)
    gpu_indices = [index for kind, index in wanted if kind == "cuda"]
    gpus = dict(zip(gpu_indices, _cuda_devices(gpu_indices), strict=True))
    cpu_count = sum(1 for kind, _ in wanted if kind == "cpu")
    cpus: list[Device] = []
    if cpu_count:
        total, available = host_memory()
        threads = max(1, usable_cores() // cpu_count)
        free = cpu_free_bytes(available, cpu_count)
        name = cpu_model_name()
        cpus = [
            Device(
                kind="cpu",
                index=i,
                name=name,
                total_memory_bytes=total // cpu_count,
                free_memory_bytes=free,
                threads=threads,
            )
            for i in range(cpu_count)
        ]
    return [gpus[index] if kind == "cuda" else cpus[index] for kind, index in wanted]


# --- GPUs --------------------------------------------------------------------------------------------


def nvml_open():  # noqa: ANN201 - the pynvml module or None
    """The pynvml module, initialised, or None where NVML is missing (no package, no driver). The caller
    owes one ``nvmlShutdown()`` (NVML counts its inits); node/telemetry.py keeps one open for the daemon's life."""
    try:
        import pynvml
    except ImportError as e:
        log.debug("pynvml is not importable (%s); using torch.cuda", e)
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.debug("NVML is not available (%s); using torch.cuda", e)
        return None
    return pynvml


@contextmanager
def _nvml() -> Iterator[object | None]:
    """Yields the initialised pynvml module, or None where NVML is missing (no package, no driver)."""
    nvml = nvml_open()
    if nvml is None:
        yield None
        return
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def _strtoul(text: str) -> int:
    """The leading decimal number of ``text``, or -1 (how CUDA reads an entry of CUDA_VISIBLE_DEVICES)."""
    match = re.match(r"\d+", text)
    return int(match.group()) if match else -1


def _cuda_visible_devices() -> list[int] | list[str] | None:
    """CUDA_VISIBLE_DEVICES read as torch reads it: None when unset, else ordinals or UUID prefixes.

    Reading stops at the first bad entry; an entry given twice makes the whole list empty.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if value.startswith(("GPU-", "MIG-")):
        prefix = value[:4]
        uuids: list[str] = []
        for entry in entries:
            if entry in uuids:
                return []
            if not entry.startswith(prefix):
                break
            uuids.append(entry)
        return uuids
    ordinals: list[int] = []
    for entry in entries:
        ordinal = _strtoul(entry)
        if ordinal in ordinals:
            return []
        if ordinal < 0:
            break
        ordinals.append(ordinal)
    return ordinals


def _as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvml_handles(nvml) -> list | None:
    """NVML handles in CUDA ordinal order, or None where only torch can tell (MIG instances)."""
    physical = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    visible = _cuda_visible_devices()
    if visible is None:
        handles = physical
    elif visible and isinstance(visible[0], str):
        if visible[0].startswith("MIG-"):
            return None
        uuids = [_as_str(nvml.nvmlDeviceGetUUID(h)) for h in physical]
        handles = []
        for prefix in visible:
            matches = [h for h, uuid in zip(physical, uuids, strict=True) if uuid.startswith(prefix)]
            if len(matches) != 1:
                break  # unknown or ambiguous: CUDA stops here too
            handles.append(matches[0])
    else:
        handles = []
        for ordinal in visible:
            if ordinal >= len(physical):
                break
            handles.append(physical[ordinal])
    names = {_as_str(nvml.nvmlDeviceGetName(h)) for h in handles}
    if len(names) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        log.warning(
            "this machine has different GPU models (%s) and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA may "
            "number them differently from NVML; set CUDA_DEVICE_ORDER=PCI_BUS_ID for the node",
            ", ".join(sorted(names)),
        )
    return handles


def _torch_cuda():
    """torch.cuda when torch is importable and sees a GPU, else None."""
    try:
        import torch
    except ImportError as e:
        log.debug("torch is not importable (%s): no GPU", e)
        return None
    return torch.cuda if torch.cuda.is_available() else None


def gpu_count() -> int:
    """How many GPUs torch would see (after CUDA_VISIBLE_DEVICES); 0 without a driver or CUDA torch.

    NVML first: it creates no CUDA context in this process. Tests monkeypatch this function.
    """
    with _nvml() as nvml:
        if nvml is not None:
            handles = nvml_handles(nvml)
            if handles is not None:
                return len(handles)
    cuda = _torch_cuda()
    return cuda.device_count() if cuda is not None else 0


def _cuda_devices(indices: list[int]) -> list[Device]:
    """Devices for the given CUDA ordinals: NVML where it answers, else torch.cuda (which makes a context)."""
    if not indices:
        return []
    with _nvml() as nvml:
        handles = nvml_handles(nvml) if nvml is not None else None
        if handles is not None:
            out = []
            for index in indices:
                memory = nvml.nvmlDeviceGetMemoryInfo(handles[index])
                name = _as_str(nvml.nvmlDeviceGetName(handles[index]))
                out.append(
                    Device(
                        kind="cuda",
                        index=index,
                        name=name,
                        total_memory_bytes=memory.total,
                        free_memory_bytes=memory.free,
                        uuid=_as_str(nvml.nvmlDeviceGetUUID(handles[index])),
                    )
                )
            return out
    cuda = _torch_cuda()
    if cuda is None:
        raise RuntimeError(f"GPUs {indices} were asked for but neither NVML nor torch.cuda can see a GPU")
    out = []
    for index in indices:
        free, total = cuda.mem_get_info(index)
        out.append(
            Device(
                kind="cuda",
                index=index,
                name=cuda.get_device_name(index),
                total_memory_bytes=total,
                free_memory_bytes=free,
                uuid=_torch_uuid(cuda, index),
            )
        )
    return out


def _torch_uuid(cuda, index: int) -> str:  # noqa: ANN001 - torch.cuda
    """NVML's form of the GPU's UUID ("GPU-" and the hex digits) as torch reports it, or "" if it does not."""
    uuid = getattr(cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else ""


# --- host: CPU and memory ----------------------------------------------------------------------------


def cpu_model_name() -> str:
    """The CPU model ("model name" in /proc/cpuinfo; other fields or the architecture where it lacks one)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if key in fields:
            return fields[key]
    return os.uname().machine


def _cgroup_dirs(controller: str) -> list[Path]:
    """This process's cgroup folders for ``controller`` (v1) or the unified tree (v2), innermost first."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    dirs: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            base = root  # v2
        elif controller in controllers.split(","):
            base = root / controller  # v1
        else:
            continue
        here = base / path.lstrip("/")
        if not here.is_dir():
            here = base  # a container without a cgroup namespace: the mount is already its cgroup
        while True:
            dirs.append(here)
            if here == base:
                break
            here = here.parent
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) gives None


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, reclaimable-aware available) of the tightest cgroup memory limit, or None without one."""
    best: tuple[int, int] | None = None
    for folder in _cgroup_dirs("memory"):
        limit = _read_int(folder / "memory.max") or _read_int(folder / "memory.limit_in_bytes")
        if limit is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        usage = _read_int(folder / "memory.current") or _read_int(folder / "memory.usage_in_bytes") or 0
        inactive = 0
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    inactive = max(inactive, int(value))
        except (OSError, ValueError):
            pass  # page cache is then counted as used: a lower, safe estimate
        available = max(0, limit - usage + inactive)
        if best is None or available < best[1]:
            best = (min(limit, best[0]) if best else limit, available)
    return best


def host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes: /proc/meminfo, tightened by a cgroup memory limit if any."""
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    total = fields["MemTotal"]
    available = fields.get("MemAvailable", fields.get("MemFree", 0) + fields.get("Cached", 0))
    cgroup = _cgroup_memory()
    if cgroup is not None:
        total, available = min(total, cgroup[0]), min(available, cgroup[1])
    return total, available


def cpu_free_bytes(available: int, cpu_count: int) -> int:
    """What one of ``cpu_count`` CPU executors may use of ``available`` host memory (after the margin)."""
    return int(available * (1.0 - CPU_MEMORY_MARGIN)) // cpu_count


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for folder in _cgroup_dirs("cpu"):
        quota = period = None
        try:
            parts = (folder / "cpu.max").read_text().split()
            if parts[0] != "max":
                quota, period = int(parts[0]), int(parts[1])
        except (OSError, IndexError, ValueError):
            quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
        if quota and period:
            cores = min(cores, max(1, math.ceil(quota / period)))
    return max(1, cores)

"""Start a coordinator and nodes as real processes on this machine (loopback), through the public CLIs.

Used by `make run`, the cluster tests, the fault tests and the benchmarks. Each process's output goes to a
log file in ``workdir``. Every process starts in its own session, so a signal sent with ``signal_node``
(SIGSTOP, SIGKILL) reaches a node and the executor processes it spawned; ``stop()`` terminates every
process group, stopped ones included (also on errors while starting). For fault tests a node can run in
a network namespace (``NodeSpec.netns``, listening on ``NodeSpec.host``) with the coordinator listening
on an address the namespaces reach (``LocalCluster(host=...)``): see tests/faults/netns.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.credentials import ENV_API_KEY, ENV_TLS_CA


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    devices: str = "cpu"
    name: str = ""
    model_dir: str | None = None  # None: fetch weights from the coordinator
    cache_dir: str | None = None
    taskset: str | None = None  # pin the node to CPUs, e.g. "0" or "1"
    netns: str | None = None  # run the node under `ip netns exec <netns>`
    host: str | None = None  # the address the node listens on and advertises (node.cli join --host)
    env: dict[str, str] = field(default_factory=dict)
    # A node keeps an executor process ready (torch imported) for the next failover; tests without
    # failovers turn it off to spare the CPU it takes to start.
    standby: bool = True
    shared_memory: bool = True  # False: node.cli join --no-shared-memory


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, workdir: str | Path, *, model: str | None = None, nodes: list[NodeSpec],
                 coordinator_args: list[str] | None = None, port: int | None = None,
                 host: str = "127.0.0.1", tls_dir: str | Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model, self.node_specs = model, nodes
        self.coordinator_args = coordinator_args or []
        self.host = host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        # The coordinator's HTTP API (OpenAI endpoints, /metrics, /health), unless the caller turned it off.
        self.http_port = None if "--no-http" in self.coordinator_args else free_port(host)
        scheme = "https" if tls_dir else "http"
        self.http_url = f"{scheme}://{host}:{self.http_port}" if self.http_port else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.expected_exits: set[str] = set()  # processes a test killed or drained on purpose
        # The cluster's secrets, made here so that nodes started at once find the join token; every
        # process of the cluster uses this state directory, and clients of this process get the API key
        # through $TENSORFLEET_API_KEY while the cluster runs (see start/stop).
        from node.security import load_or_create

        self.home = self.workdir / "home"
        self.secrets = load_or_create(self.home)
        self.api_key = self.secrets.api_keys[0]
        self.tls_dir = str(tls_dir) if tls_dir else None  # TLS on every channel (node/certs.py)
        # What clients of this process find in the environment while the cluster runs.
        self.client_env = {ENV_API_KEY: self.api_key, ENV_TLS_CA: str(Path(tls_dir) / "ca.pem") if tls_dir else ""}
        self._saved_env: dict[str, str | None] = {}

    def _spawn(self, name: str, args: list[str], *, taskset: str | None = None,
               env: dict[str, str] | None = None, netns: str | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-u", *args]
        if taskset:
            cmd = ["taskset", "-c", taskset, *cmd]
        if netns:  # `ip netns exec` and taskset both exec the next program: the pid stays the Python process's
            cmd = ["ip", "netns", "exec", netns, *cmd]
        log = open(self.workdir / f"{name}.log", "a")  # noqa: SIM115 - closed with the process; a restart appends
        repo = Path(__file__).resolve().parents[1]
        # A checkout that is not pip-installed still runs: the packages and the generated stubs by path.
        path = os.pathsep.join(p for p in (str(repo), str(repo / "proto"), os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=repo, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": path, "TENSORFLEET_HOME": str(self.home),
                                     **(env or {})})
        self.procs[name] = proc
        return proc

    def start(self, *, timeout_s: float = 300.0) -> LocalCluster:
        self._saved_env = {k: os.environ.get(k) for k in self.client_env}
        os.environ.update(self.client_env)
        try:
            self.start_coordinator()
            for i, spec in enumerate(self.node_specs):
                self.start_node(spec, f"node{i}")
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_coordinator(self, *, min_nodes: int | None = None) -> subprocess.Popen:
        """(Re)start the coordinator on the cluster's address (a restart appends to its log); it places the
        model once ``min_nodes`` (default: all the cluster's nodes) have joined."""
        args = ["-m", "coordinator.cli", "start", "--host", self.host, "--port", str(self.port),
                "--min-nodes", str(min_nodes or len(self.node_specs)), *self.coordinator_args]
        if self.http_port:
            args += ["--http-port", str(self.http_port)]
        if self.tls_dir:
            args += ["--tls", self.tls_dir]
        if self.model:
            args += ["--model", self.model]
        old = self.procs.get("coordinator")
        if old is not None:
            if old.poll() is None:
                raise RuntimeError("the coordinator is still running")
            runs = sum(1 for name in self.procs if name.startswith("coordinator"))
            self.procs[f"coordinator-run{runs}"] = old  # still stopped with the rest
            self.expected_exits.add(f"coordinator-run{runs}")
        self.expected_exits.discard("coordinator")
        return self._spawn("coordinator", args)

    def start_node(self, spec: NodeSpec, name: str) -> subprocess.Popen:
        args = ["-m", "node.cli", "join", self.address, "--devices", spec.devices, "--no-probe",
                "--name", spec.name or name]
        if spec.model_dir:
            args += ["--model-dir", spec.model_dir]
        if spec.cache_dir:
            args += ["--cache-dir", spec.cache_dir]
        if spec.host:
            args += ["--host", spec.host]
        if self.tls_dir:
            args += ["--tls", self.tls_dir]
        if not spec.standby:
            args.append("--no-standby")
        if not spec.shared_memory:
            args.append("--no-shared-memory")
        return self._spawn(name, args, taskset=spec.taskset, env=spec.env, netns=spec.netns)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the coordinator reports a complete placement (or a process dies, or time runs out)."""
        from client.api import ClientError, TensorfleetClient

        deadline = time.monotonic() + timeout_s
        with TensorfleetClient(self.address, timeout=5, api_key=self.api_key,
                               tls_ca=self.client_env[ENV_TLS_CA] or None) as client:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None and name not in self.expected_exits:
                        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
                try:
                    if client.status().stages:
                        return
                except ClientError:
                    pass
                failed = [line for line in self.log("coordinator").splitlines() if "failed to load" in line]
                if failed:
                    raise RuntimeError(f"a stage failed to load: {failed[-1]}")
                time.sleep(0.5)
        raise TimeoutError(f"no placement within {timeout_s:.0f}s:\n{self.log('coordinator')[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """The coordinator's /metrics, parsed: every sample as "name{label=value,...}" (labels sorted) -> value."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.http_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def stage_key(self, status) -> str:  # noqa: ANN001 - a StatusResponse
        """The data key of the placement ``status`` shows, as the coordinator computes it (tests that
        talk to stages directly)."""
        from node.security import data_key

        return data_key(self.secrets.join_token, status.coordinator_run, status.epoch.value)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, name: str) -> int:
        """The process id of ``name`` ("coordinator", "node0", ...); also the id of its process group."""
        return self.procs[name].pid

    def signal_node(self, name: str, sig: int) -> None:
        """Send ``sig`` to the process group of ``name``: the node and the executors it spawned."""
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.expected_exits.add(name)
        os.killpg(self.pid(name), sig)

    def stop(self) -> None:
        """Terminate every process and its group: the daemons first (they stop their executors), then
        whatever of each group is left; a stopped (SIGSTOP) group is continued so that it can exit."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                _signal_group(proc.pid, signal.SIGCONT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        leftover = [proc.pid for proc in self.procs.values() if _group_alive(proc.pid)]
        for pgid in leftover:
            _signal_group(pgid, signal.SIGTERM)
            _signal_group(pgid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while any(_group_alive(pgid) for pgid in leftover) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pgid in leftover:
            _signal_group(pgid, signal.SIGKILL)
        for key, value in self._saved_env.items():
            if os.environ.get(key) != self.client_env[key]:
                continue  # changed meanwhile: not ours to restore
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which another parent reaps, do not count)."""
    if not os.path.isdir("/proc/self"):  # not Linux: a zombie counts as running
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            return True
    return False

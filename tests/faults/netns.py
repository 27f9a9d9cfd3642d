"""Network namespaces for fault tests: each node daemon gets its own address and its own cable.

Topology of ``Fabric(n, prefix="tf", subnet="10.77.0")``::

    root namespace                         namespace tfn0            namespace tfn1 ...
    bridge tfbr 10.77.0.1/24               eth0 10.77.0.10/24        eth0 10.77.0.11/24
      +-- tfh0 (veth, host side) <=======> eth0 (peer)
      +-- tfh1 (veth, host side) <========================> eth0 (peer)

The coordinator runs in the root namespace and listens on the bridge address (``host_address``); node i
runs under ``exec_prefix(i)`` (``ip netns exec tfn<i>``) and listens on ``address(i)``. Inside each
namespace ``lo`` is up (tensor-parallel peers of one node talk over loopback) and the default route goes
via the bridge. ``cut(i)`` takes the host side of node i's veth down, which drops its carrier: no packet
reaches or leaves the node, like a pulled cable (open TCP connections hang instead of being reset).
``limit(i, rate)`` puts a ``tbf`` qdisc on the egress of both ends of the veth (netem is not available).

Bridge netfilter: when ``br_netfilter`` is loaded with ``net.bridge.bridge-nf-call-iptables=1`` (the
default here), bridged packets traverse the iptables FORWARD chain. These machines load no iptables
tables, so nothing is filtered; on a host whose FORWARD policy is DROP (e.g. with Docker) set that
sysctl to 0 or accept traffic on the bridge, else nodes cannot reach each other (the root namespace
still reaches them). We do not change global sysctls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

RUN_TIMEOUT_S = 10.0


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc`` command; raise with the command and its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_unavailable() -> str | None:
    """None when network namespaces, veths and tc can be used here, else why not (for pytest.skip)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"tfprobe{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        run("ip", "netns", "del", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    return None


def _bytes_per_second(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)", rate.strip().lower())
    if m is None:
        raise ValueError(f"rate {rate!r} is not like '100mbit', '500kbit' or '10mbps'")
    value = float(m[1]) * 1000 ** " kmgt".index(m[2] or " ")
    return value / 8 if m[3] == "bit" else value


class Fabric:
    """``count`` namespaces joined by veth pairs to one bridge; a context manager that cleans up after itself."""

    def __init__(self, count: int, *, prefix: str = "tf", subnet: str = "10.77.0") -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"count={count} must be in 1..200 (addresses {subnet}.10 and up)")
        if len(f"{prefix}h{count - 1}") > 15 or len(f"{prefix}br") > 15:
            raise ValueError(f"prefix={prefix!r} is too long: interface names must be at most 15 characters")
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9]*", prefix):
            raise ValueError(f"prefix={prefix!r} must be letters and digits")
        self.count, self.prefix, self.subnet = count, prefix, subnet
        self.bridge = f"{prefix}br"
        self._limited: set[int] = set()

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.1"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + self._check(i)}"

    def netns(self, i: int) -> str:
        return f"{self.prefix}n{self._check(i)}"

    def host_link(self, i: int) -> str:
        return f"{self.prefix}h{self._check(i)}"

    def node_specs(self, **spec) -> list:  # noqa: ANN003 - NodeSpec fields
        """A coordinator.local_cluster.NodeSpec per namespace (its netns and address), ``spec`` for the rest."""
        from coordinator.local_cluster import NodeSpec

        return [NodeSpec(netns=self.netns(i), host=self.address(i), **spec) for i in range(self.count)]

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.netns(i)]

    def _check(self, i: int) -> int:
        if not 0 <= i < self.count:
            raise IndexError(f"node {i} does not exist (count={self.count})")
        return i

    # ---------------------------------------------------------------------------------- faults
    def cut(self, i: int) -> None:
        """Cut node i off from everyone: its veth loses carrier."""
        run("ip", "link", "set", self.host_link(i), "down")

    def restore(self, i: int) -> None:
        run("ip", "link", "set", self.host_link(i), "up")

    def limit(self, i: int, rate: str) -> None:
        """Limit node i's bandwidth to ``rate`` (tc syntax, e.g. "100mbit") in each direction."""
        burst = max(32 * 1024, int(_bytes_per_second(rate) / 100))  # 10 ms at full rate, at least 32 KiB
        tbf = ["root", "tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        run("ip", "netns", "exec", self.netns(i), "tc", "qdisc", "replace", "dev", "eth0", *tbf)
        run("tc", "qdisc", "replace", "dev", self.host_link(i), *tbf)
        self._limited.add(i)

    def unlimit(self, i: int) -> None:
        if i in self._limited:
            run("ip", "netns", "exec", self.netns(i), "tc", "qdisc", "del", "dev", "eth0", "root")
            run("tc", "qdisc", "del", "dev", self.host_link(i), "root")
            self._limited.discard(i)

    # ---------------------------------------------------------------------------------- lifecycle
    def open(self) -> Fabric:
        self._remove_leftovers()
        try:
            run("ip", "link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
            run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            for i in range(self.count):
                ns, host = self.netns(i), self.host_link(i)
                run("ip", "netns", "add", ns)
                run("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
                run("ip", "link", "set", host, "master", self.bridge, "up")
                run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                run("ip", "-n", ns, "link", "set", "eth0", "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
                run("ip", "-n", ns, "route", "add", "default", "via", self.host_address)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the veths, the bridge and the namespaces (also those of a crashed run with this prefix)."""
        self._limited.clear()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # Links first: a namespace that still holds a process outlives `ip netns del`, and its veth with it.
        links = re.findall(r"^\d+: ([^:@\s]+)", run("ip", "-o", "link", "show").stdout, flags=re.M)
        ours = re.compile(rf"{self.prefix}(h\d+|br)")
        for link in sorted((name for name in links if ours.fullmatch(name)), reverse=True):  # tfh* before tfbr
            run("ip", "link", "del", link, check=False)
        names = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()]
        for ns in names:
            if re.fullmatch(rf"{self.prefix}n\d+", ns):
                run("ip", "netns", "del", ns)

    def __enter__(self) -> Fabric:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

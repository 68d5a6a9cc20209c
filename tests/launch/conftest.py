"""Fixtures for launch tests: two "hosts" in two network namespaces, and a 2-node Slurm cluster on them.

Everything runs on this one machine. The namespaces are joined by a veth pair whose addresses exist
only inside them, so rendezvous traffic crosses a real TCP link and never leaves the two namespaces.
The root namespace never contacts those addresses: it has no route to them, so such packets would go
out through the default gateway. Every daemon, job process and namespace started here is stopped by
pid and removed in the fixture's teardown, whether the test passed or not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET = "10.250.0"
IFNAME = "eth1"
NETNS_PREFIX = "cassns"
APT_PACKAGES = ("slurm-wlm", "munge", "iproute2")


@dataclass
class NetnsPair:
    """Two network namespaces joined by a veth pair: host i has address `addrs[i]` on `ifname`."""

    names: tuple[str, str]
    addrs: tuple[str, str]
    ifname: str = IFNAME

    def prefix(self, host: int) -> list[str]:
        """Returns the command prefix that runs a program inside host `host`'s network namespace."""
        # nsenter, not `ip netns exec`: the latter remounts /sys, and slurmd then fails on cgroups.
        return ["nsenter", f"--net=/run/netns/{self.names[host]}"]

    def popen(self, host: int, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts `cmd` inside host `host`; returns the Popen."""
        return subprocess.Popen([*self.prefix(host), *cmd], **kwargs)

    def run(self, host: int, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Runs `cmd` inside host `host` to completion (text output captured); returns the result."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run([*self.prefix(host), *cmd], **kwargs)

    def pids_inside(self) -> list[int]:
        """Returns the pids of all processes whose network namespace is one of the pair's."""
        inodes = set()
        for name in self.names:
            try:
                inodes.add(os.stat(f"/run/netns/{name}").st_ino)
            except FileNotFoundError:
                pass
        return [pid for pid in _all_pids() if _netns_inode(pid) in inodes]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM each pid, then SIGKILL whatever still lives after `grace_s` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _sh(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _remove_stale_namespaces() -> None:
    """Removes pairs left by an earlier test process that was killed before its teardown ran."""
    listing = _sh(["ip", "netns", "list"]).stdout.split()
    for name in listing:
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == NETNS_PREFIX and parts[1].isdigit() and not _alive(int(parts[1])):
            inode = os.stat(f"/run/netns/{name}").st_ino
            stop_pids([p for p in _all_pids() if _netns_inode(p) == inode], grace_s=3)
            _sh(["ip", "netns", "del", name])


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("launch cluster tests need root (network namespaces, Slurm daemons)")
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        _apt_install()
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("`ip` (iproute2) or `nsenter` (util-linux) is missing and could not be installed")


def _apt_install() -> None:
    """Installs the Debian packages the cluster needs; skips the test if apt-get cannot."""
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed and there is no apt-get to install {' '.join(APT_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed, so Slurm cannot be installed: {res.stderr[-500:]}")


@pytest.fixture(scope="session")
def netns_pair() -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair (10.250.0.1 <-> 10.250.0.2 on eth1).

    Skips where namespaces cannot be made (not root, no netns support). Teardown kills every process
    still inside either namespace by pid, then deletes both namespaces.
    """
    _require_root_and_tools()
    _remove_stale_namespaces()
    tag = f"{NETNS_PREFIX}-{os.getpid()}"
    pair = NetnsPair(names=(f"{tag}-1", f"{tag}-2"), addrs=(f"{SUBNET}.1", f"{SUBNET}.2"))
    # Root-side veth names are temporary (15-char limit); each end is renamed to eth1 inside its namespace.
    veth = (f"vc{os.getpid()}a", f"vc{os.getpid()}b")
    created: list[str] = []
    try:
        for name in pair.names:
            res = _sh(["ip", "netns", "add", name])
            if res.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {res.stderr.strip()}")
            created.append(name)
        steps = [["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]]]
        for i, name in enumerate(pair.names):
            steps += [
                ["ip", "link", "set", veth[i], "netns", name],
                ["ip", "-n", name, "link", "set", veth[i], "name", IFNAME],
                ["ip", "-n", name, "addr", "add", f"{pair.addrs[i]}/24", "dev", IFNAME],
                ["ip", "-n", name, "link", "set", "lo", "up"],
                ["ip", "-n", name, "link", "set", IFNAME, "up"],
            ]
        for cmd in steps:
            res = _sh(cmd)
            if res.returncode != 0:
                pytest.skip(f"cannot build the veth link (`{' '.join(cmd)}`): {res.stderr.strip()}")
        yield pair
    finally:
        stop_pids(pair.pids_inside(), grace_s=5)
        for name in created:
            _sh(["ip", "netns", "del", name])


@dataclass
class SlurmCluster:
    """A running 2-node Slurm cluster: controller and node n1 in namespace 0, node n2 in namespace 1."""

    net: NetnsPair
    root: Path
    conf: Path
    env: dict[str, str]
    daemon_pidfiles: list[Path] = field(default_factory=list)

    def cmd(self, args: Sequence[str], env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Runs a Slurm client command (sbatch, scontrol ...) inside host 0; returns the result.

        Raises AssertionError with the command's output when `check` and it exits non-zero.
        """
        res = self.net.run(0, args, env={**self.env, **(env or {})}, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def job_state(self, job_id: str) -> dict[str, str]:
        """Returns `scontrol show job` fields (JobState, Restarts, Reason ...) for `job_id`."""
        out = self.cmd(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def logs(self) -> str:
        """Returns the tail of every daemon log, for failure messages."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.root.glob("*.log")))


def _write_slurm_conf(root: Path, net: NetnsPair) -> Path:
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=cass-test
SlurmctldHost={host}({net.addrs[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={root}/ctld-state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=n1 NodeHostname={host} NodeAddr={net.addrs[0]} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr={net.addrs[1]} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    return conf


def _start_daemon(cluster: SlurmCluster, host: int, cmd: list[str], pidfile: Path) -> None:
    cluster.daemon_pidfiles.append(pidfile)
    res = cluster.net.run(host, cmd, env=cluster.env, timeout=30)
    deadline = time.monotonic() + 15
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if res.returncode != 0 or not pidfile.exists():
        raise RuntimeError(f"{' '.join(cmd)} did not start ({res.returncode}): {res.stderr}\n{cluster.logs()}")


def _stop_cluster(cluster: SlurmCluster) -> None:
    # Jobs first, so their processes exit cleanly; then daemons by pid file; then any leftover job process.
    if any(p.exists() for p in cluster.daemon_pidfiles):
        cluster.cmd(["scancel", "--full", "--user=root"], check=False, timeout=20)
    pids = []
    for pidfile in reversed(cluster.daemon_pidfiles):
        try:
            pids.append(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            pass
    stop_pids(pids, grace_s=10)
    stop_pids(cluster.net.pids_inside(), grace_s=5)


@pytest.fixture(scope="session")
def slurm_cluster(netns_pair: NetnsPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real Slurm (slurm-wlm + munge) with nodes n1, n2 in the two namespaces, both idle.

    Installs the Debian packages if missing. The config, sockets, state and logs live in a temp dir
    (SLURM_CONF points there), so /etc is left alone. Teardown cancels jobs, stops munged, slurmctld
    and both slurmd by pid, and kills any job process left in the namespaces.
    """
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        _apt_install()
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)
    conf = _write_slurm_conf(root, netns_pair)
    (root / "ctld-state").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(net=netns_pair, root=root, conf=conf, env=env)
    try:
        _start_daemon(cluster, 0, ["munged", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                                   f"--seed-file={root}/munged.seed"], root / "munged.pid")
        _start_daemon(cluster, 0, ["slurmctld", "-f", str(conf), "-i"], root / "slurmctld.pid")
        for host, node in enumerate(("n1", "n2")):
            _start_daemon(cluster, host, ["slurmd", "-f", str(conf), "-N", node], root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = cluster.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            if states.count("idle") == 2:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"Slurm nodes never became idle: {states}\n{cluster.logs()}")
        yield cluster
    finally:
        _stop_cluster(cluster)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shard set (300 images, 32 px) for short demo-preset runs."""
    from cass_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("shards") / "demo"
    build_synthetic(out, num_images=300, image_size=32, shard_size=100, num_workers=1)
    return out

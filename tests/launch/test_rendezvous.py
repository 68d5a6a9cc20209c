"""Two "hosts" (network namespaces joined by a veth pair) rendezvous with `accelerate launch` over gloo.

This is the multi-node path of launch/slurm/pretrain.sbatch without Slurm: one launcher per host,
machine rank given per host, the main address is host 0's link address, and traffic crosses the link.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each process reports its rank, world size, backend and the peer address its gloo socket talks to.
PROBE = '''
import json, os, sys
import torch, torch.distributed as dist
from accelerate import Accelerator

acc = Accelerator()
total = acc.reduce(torch.tensor([float(acc.process_index + 1)]), reduction="sum")
gathered = acc.gather(torch.tensor([acc.process_index]))
out = {"rank": acc.process_index, "world": acc.num_processes, "type": str(acc.distributed_type),
       "backend": dist.get_backend(), "sum": total.item(), "gathered": gathered.tolist(),
       "master": os.environ["MASTER_ADDR"]}
with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
    json.dump(out, f)
# Leave together: a rank exiting while gloo still talks to the other can abort it (SIGABRT).
acc.wait_for_everyone()
dist.destroy_process_group()
'''


def _launch_cmd(machine_rank: int, main_addr: str, port: int, script: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO_ROOT / "launch/configs/cpu.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", main_addr, "--main_process_port", str(port),
            str(script), str(out_dir)]


def test_two_hosts_rendezvous_over_veth(netns_pair, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": netns_pair.ifname, "PYTHONPATH": str(REPO_ROOT)}
    main_addr, port = netns_pair.addrs[0], 29411
    procs = [netns_pair.popen(rank, _launch_cmd(rank, main_addr, port, script, tmp_path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("rendezvous across the two namespaces did not finish in 180 s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    import json
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["rank"] == r
        assert res["world"] == 2
        assert res["type"] == "DistributedType.MULTI_CPU"
        assert res["backend"] == "gloo"
        assert res["sum"] == 3.0  # 1 + 2: both ranks' tensors crossed the link
        assert res["gathered"] == [0, 1]
        assert res["master"] == main_addr


def test_namespaces_are_isolated_from_each_other_only_by_the_link(netns_pair) -> None:
    """Each host reaches the other over the veth; the addresses do not exist in the root namespace."""
    res = netns_pair.run(1, ["ip", "-o", "-4", "addr", "show", "dev", netns_pair.ifname])
    assert netns_pair.addrs[1] in res.stdout
    root_addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    assert all(addr not in root_addrs for addr in netns_pair.addrs)
    ping = netns_pair.run(1, [sys.executable, "-c",
                              "import socket,sys; s=socket.create_connection((sys.argv[1], 9), timeout=5)",
                              netns_pair.addrs[0]])
    # Nothing listens on port 9 at host 0: a refused connection proves the peer answered over the link.
    assert "ConnectionRefusedError" in ping.stderr

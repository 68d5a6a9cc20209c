"""launch/slurm/pretrain.sbatch on a real 2-node Slurm (one node per network namespace), CPU + gloo.

The first tests drive the script with a stub trainer (a few lines of torch.distributed) to pin down
the launch mechanics quickly: rank expansion per node, rendezvous over the link, USR1 reaching every
rank, the self-requeue, one log per restart, a stable W&B id. The last ones run the real demo preset.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH = REPO_ROOT / "launch/slurm/pretrain.sbatch"

# Stands in for launch/pretrain.py: same flags, same contract (USR1 -> state saved on all ranks at the
# same step -> clean exit; --resume auto continues). Each rank logs every step it runs.
STUB_TRAINER = '''
import argparse, json, os, signal, sys, time
from pathlib import Path
import torch
from accelerate import Accelerator

p = argparse.ArgumentParser()
p.add_argument("--output-dir", required=True)
p.add_argument("--resume", default=None)
p.add_argument("--max-steps", type=int, required=True)
p.add_argument("--step-seconds", type=float, default=0.2)
a = p.parse_args()
acc = Accelerator()
out = Path(a.output_dir)
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
state = out / "stub_state.json"
step = json.loads(state.read_text())["step"] if a.resume == "auto" and state.exists() else 0
log = open(out / f"steps-rank{acc.process_index}.txt", "a")
print(f"resumed_from={step} rank={acc.process_index} node={os.environ['SLURM_NODEID']} "
      f"world={acc.num_processes} master={os.environ['MASTER_ADDR']} wandb={os.environ.get('WANDB_RUN_ID')}",
      file=log, flush=True)
while step < a.max_steps:
    time.sleep(a.step_seconds)
    step += 1
    print(step, file=log, flush=True)
    halt = acc.reduce(torch.tensor([float(bool(stop))]), reduction="max").item() > 0
    if halt or step == a.max_steps:
        print(f"saved={step} signal={bool(stop)}", file=log, flush=True)
        if acc.is_main_process:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.replace(state)
        acc.wait_for_everyone()
        break
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # leave together: a rank exiting mid-gloo can abort its peer
'''


def _job_env(slurm_cluster, **extra: str) -> dict[str, str]:
    return {"CASS_REPO_DIR": str(REPO_ROOT), "CASS_PYTHON": sys.executable, "CASS_DEVICE": "cpu",
            "CASS_PROCS_PER_NODE": "1", "CASS_ACCELERATE_CONFIG": str(REPO_ROOT / "launch/configs/cpu.yaml"),
            "GLOO_SOCKET_IFNAME": slurm_cluster.net.ifname, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline", **extra}


def submit(slurm_cluster, workdir: Path, args: list[str], env: dict[str, str], *, script: Path = SBATCH,
           nodes: int = 2) -> str:
    """Submits `script` on `nodes` nodes x 1 task, without GPUs; returns the job id."""
    res = slurm_cluster.cmd(["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
                             f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out", str(script), *args],
                            env=env)
    return res.stdout.strip().split(";")[0]


def wait_state(slurm_cluster, job_id: str, states: set[str], timeout: float, workdir: Path) -> dict[str, str]:
    """Polls until the job's state is in `states`; returns its fields. Fails with the job's logs otherwise."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = slurm_cluster.job_state(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    logs = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(workdir.rglob("*.log")))
    pytest.fail(f"job {job_id} not in {states} after {timeout}s: {info}\n{logs}\n{slurm_cluster.logs()}")


def wait_file(path: Path, predicate, timeout: float, workdir: Path | None = None) -> None:
    """Polls until `predicate(text of path)` holds; fails after `timeout` seconds, with the job's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and predicate(path.read_text()):
            return
        time.sleep(0.3)
    logs = "" if workdir is None else "\n".join(
        f"== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(workdir.rglob("*.log")) + sorted(workdir.glob("slurm-*.out")))
    pytest.fail(f"{path} never reached the expected state in {timeout}s\n{logs}")


def requeue_now(slurm_cluster, job_id: str, workdir: Path) -> dict[str, str]:
    """Sends the batch shell USR1 as Slurm's --signal would, waits for the self-requeue, starts it now.

    Returns the job's fields once it completed after the restart.
    """
    slurm_cluster.cmd(["scancel", "--signal=USR1", "--batch", job_id])
    # The requeued job waits ~2 min (Reason=BeginTime) unless told to start now.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = slurm_cluster.job_state(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            # Slurm revokes the old run's credential with 1 s resolution: a restart within the same
            # second is refused ("Job credential revoked") and the job fails. Real clusters wait minutes.
            time.sleep(2)
            slurm_cluster.cmd(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])
            break
        assert info.get("JobState") not in {"COMPLETED", "FAILED", "CANCELLED"}, info
        time.sleep(0.3)
    else:
        pytest.fail(f"job {job_id} did not requeue itself after USR1: {slurm_cluster.job_state(job_id)}")
    return wait_state(slurm_cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 240, workdir)


def test_srun_spans_both_namespaces(slurm_cluster) -> None:
    res = slurm_cluster.cmd(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c",
                             "echo $SLURM_NODEID $SLURMD_NODENAME $(readlink /proc/self/ns/net)"])
    lines = sorted(res.stdout.strip().splitlines())
    assert [ln.split()[:2] for ln in lines] == [["0", "n1"], ["1", "n2"]]
    assert lines[0].split()[2] != lines[1].split()[2]  # two different network namespaces


def test_usr1_checkpoints_every_rank_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(STUB_TRAINER)
    run_dir = tmp_path / "run"
    env = _job_env(slurm_cluster, CASS_ENTRY=str(stub), CASS_OUTPUT_DIR=str(run_dir))
    target = 60
    job = submit(slurm_cluster, tmp_path, ["--max-steps", str(target), "--step-seconds", "0.2"], env)
    # Generous: under load, two launchers start torch and meet over gloo before the first step.
    wait_file(run_dir / "steps-rank1.txt", lambda t: len(t.splitlines()) >= 4, 240, tmp_path)
    info = requeue_now(slurm_cluster, job, tmp_path)
    assert info["JobState"] == "COMPLETED", info

    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == [f"cass-pretrain-{job}-restart0.log", f"cass-pretrain-{job}-restart1.log"]
    assert "requeueing job" in (run_dir / "logs" / logs[0]).read_text()
    assert json.loads((run_dir / "stub_state.json").read_text()) == {"step": target}
    for rank in (0, 1):
        lines = (run_dir / f"steps-rank{rank}.txt").read_text().splitlines()
        headers = [dict(kv.split("=") for kv in ln.split()) for ln in lines if ln.startswith("resumed_from")]
        saves = [dict(kv.split("=") for kv in ln.split()) for ln in lines if ln.startswith("saved")]
        steps = [int(ln) for ln in lines if ln.isdigit()]
        # First run: node = rank, 2 ranks, main = node 0's link address, W&B id from the job id.
        assert [h["node"] for h in headers] == [str(rank)] * 2
        assert {h["world"] for h in headers} == {"2"}
        assert {h["master"] for h in headers} == {slurm_cluster.net.addrs[0]}
        assert {h["wandb"] for h in headers} == {f"cass-{job}"}
        # The signal reached this rank, it stopped where the state was saved, and the restart went on
        # from exactly there: every step ran once.
        interrupted = int(saves[0]["saved"])
        assert saves[0]["signal"] == "True" and 0 < interrupted < target
        assert headers[1]["resumed_from"] == str(interrupted)
        assert steps == list(range(1, target + 1))


def test_missing_gpus_is_a_clear_error(slurm_cluster, tmp_path: Path) -> None:
    env = _job_env(slurm_cluster, CASS_OUTPUT_DIR=str(tmp_path / "run"))
    env.pop("CASS_PROCS_PER_NODE")
    job = submit(slurm_cluster, tmp_path, [], env)
    info = wait_state(slurm_cluster, job, {"COMPLETED", "FAILED"}, 60, tmp_path)
    assert info["JobState"] == "FAILED"
    log = (tmp_path / "run" / "logs" / f"cass-pretrain-{job}-restart0.log").read_text()
    assert "no GPUs on this node" in log and "CASS_PROCS_PER_NODE" in log


# ---------------------------------------------------------------- the real pretraining, demo preset
TARGET_STEPS = 12
DEMO_ARGS = ["--preset", "demo", "--max-steps", str(TARGET_STEPS), "--save-every", "4", "--batch-size", "8",
             "--image-size", "32", "--knn-every", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def straight_run(slurm_cluster, demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset on 2 nodes x 1 process, never interrupted; returns its run dir."""
    workdir = tmp_path_factory.mktemp("straight")
    run_dir = workdir / "run"
    env = _job_env(slurm_cluster, CASS_OUTPUT_DIR=str(run_dir))
    job = submit(slurm_cluster, workdir, [*DEMO_ARGS, "--data", str(demo_shards), "--report-to", "none"], env)
    info = wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 240, workdir)
    assert info["JobState"] == "COMPLETED", _tail(run_dir)
    return run_dir


def _tail(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(run_dir.glob("logs/*.log")))


def _final_step(run_dir: Path) -> int:
    from cass_dist.engine.checkpoint import find_latest, read_train_state

    latest = find_latest(run_dir / "checkpoints")
    assert latest is not None, f"no checkpoint in {run_dir}"
    return read_train_state(latest).global_step


def _exports(run_dir: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {name: load_file(run_dir / "export" / f"{name}.safetensors") for name in ("cnn", "vit")}


def test_pretrain_job_ends_with_checkpoint_and_exports(straight_run: Path) -> None:
    from cass_dist.models.export import load_backbone

    assert _final_step(straight_run) == TARGET_STEPS
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["steps"] == TARGET_STEPS and summary["stopped_by"] == ""
    logged = [json.loads(ln)["step"] for ln in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert logged and logged[-1] == TARGET_STEPS
    # Both nodes' launchers took part: the log has rank-labelled output from task 0 and task 1.
    log = _tail(straight_run)
    assert "0: " in log and "1: " in log
    for name in ("cnn", "vit"):
        model = load_backbone(straight_run, name)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_requeued_demo_run_equals_straight_run(slurm_cluster, demo_shards: Path, straight_run: Path,
                                               tmp_path: Path) -> None:
    import torch

    run_dir = tmp_path / "run"
    env = _job_env(slurm_cluster, CASS_OUTPUT_DIR=str(run_dir))
    # W&B offline here (no weights change): the requeued job must continue the same W&B run.
    job = submit(slurm_cluster, tmp_path, [*DEMO_ARGS, "--data", str(demo_shards), "--report-to", "wandb"], env)
    # Interrupt mid-run: once two metrics records (steps 2 and 4) were logged.
    wait_file(run_dir / "metrics.jsonl", lambda t: len(t.splitlines()) >= 2, 240, tmp_path)
    info = requeue_now(slurm_cluster, job, tmp_path)
    assert info["JobState"] == "COMPLETED", _tail(run_dir)

    first = (run_dir / "logs" / f"cass-pretrain-{job}-restart0.log").read_text()
    assert "USR1" in first and "requeueing job" in first
    assert (run_dir / "logs" / f"cass-pretrain-{job}-restart1.log").is_file()
    assert _final_step(run_dir) == TARGET_STEPS
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{wandb_id}") for name in wandb_runs), wandb_runs
    straight, resumed = _exports(straight_run), _exports(run_dir)
    for name in ("cnn", "vit"):
        assert straight[name].keys() == resumed[name].keys()
        for key, value in straight[name].items():
            torch.testing.assert_close(resumed[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")


def test_finetune_job_on_one_node_from_the_pretrained_exports(slurm_cluster, demo_shards: Path,
                                                             straight_run: Path, tmp_path: Path) -> None:
    """finetune.sbatch hands over to pretrain.sbatch's machinery; also the 1 node x 1 process (T4) shape."""
    run_dir = tmp_path / "run"
    env = _job_env(slurm_cluster, CASS_OUTPUT_DIR=str(run_dir))
    job = submit(slurm_cluster, tmp_path, ["--data", str(demo_shards), "--init", str(straight_run),
                                           "--max-steps", "2", "--report-to", "none"],
                 env, script=REPO_ROOT / "launch/slurm/finetune.sbatch", nodes=1)
    info = wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 180, tmp_path)
    assert info["JobState"] == "COMPLETED", _tail(run_dir)
    assert (run_dir / "logs" / f"cass-finetune-{job}-restart0.log").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["init"] == str(straight_run) and metrics["steps"] == 2 and metrics["split"] == "test"
    assert _final_step(run_dir) == 2

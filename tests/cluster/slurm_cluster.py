"""Drive a live SLURM cluster on this machine (scripts/slurm_cluster.sh) from tests: start, sbatch, wait, stop."""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


class Cluster:
    """One cluster at a time, of 1 node (this host) or 2 nodes (network namespaces); state under `state`."""

    def __init__(self, state: Path):
        self.state, self.nodes = state, 0
        self.env = {
            **os.environ,
            "ARC_SLURM_STATE": str(state),
            "SLURM_CONF": str(state / "slurm.conf"),
            # Jobs inherit the environment (sbatch --export=ALL): put this interpreter's torchrun on their PATH.
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }

    def _script(self, *args: str) -> None:
        done = subprocess.run([str(CLUSTER_SCRIPT), *args], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(self.state.glob("log/*.log")))
            raise RuntimeError(f"slurm_cluster.sh {' '.join(args)} failed:\n{done.stderr}\n{logs}")

    def ensure(self, nodes: int) -> None:
        if self.nodes == nodes:
            return
        self.stop()
        self.nodes = nodes  # set first: a half-started cluster is still stopped by stop()
        self._script("start", "--nodes", str(nodes))

    def stop(self) -> None:
        self._script("stop")
        self.nodes = 0

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def sbatch(self, script: str, *options: str, env: dict[str, str]) -> str:
        """Submit slurm/<script> from the checkout (as users do) with `env` added; returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *options, str(REPO / "slurm" / script)],
            env={**self.env, **env},
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """JobState, Restarts, ExitCode, ... of a job, or of each task of an array job (finished jobs stay
        visible: MinJobAge=600)."""
        lines = self.run("scontrol", "show", "job", "-o", job_id).splitlines()
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        return self.jobs(job_id)[0]

    def wait(self, job_id: str, done: Callable[[dict[str, str]], bool], log: Path, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if done(info):
                return info
            time.sleep(0.5)
        self.run("scancel", job_id)
        tail = log.read_text()[-4000:] if log.exists() else "(no log)"
        raise AssertionError(f"job {job_id} timed out after {timeout} s in state {info}; log:\n{tail}")

    def wait_finished(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        return self.wait(job_id, lambda j: j["JobState"] in finished, log, timeout)


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (`train/loss`) from RUN_DIR/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def wait_for_step(run_dir: Path, step: int, cluster: Cluster, job_id: str, log: Path, timeout: float = 240) -> None:
    """Until metrics.jsonl has a loss at `step` or later (the job must keep running meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(read_losses(run_dir), default=0) >= step:
            return
        state = cluster.job(job_id)["JobState"]
        assert state in {"PENDING", "RUNNING", "CONFIGURING"}, f"job {job_id} {state} early:\n{log.read_text()}"
        time.sleep(0.3)
    raise AssertionError(f"no step {step} in {run_dir}/metrics.jsonl after {timeout} s:\n{log.read_text()[-4000:]}")

"""slurm/*.sh on a live SLURM cluster on this machine: train, preempt (USR1) -> checkpoint -> requeue -> resume,
bounded requeues, one-line config errors, export, and 2 nodes (network namespaces) matching 1 node step by step.

Needs root (daemons, namespaces); scripts/slurm_cluster.sh installs slurm-wlm + munge when missing.
    pytest -m slurm tests/cluster/test_slurm.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO, Cluster, read_losses, wait_for_step

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0, reason="a local SLURM cluster needs root (daemons, network namespaces)"),
]

STEPS = 20  # the tiny config's optimizer steps in every run here
RUNNING = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=2", "--time=15:00")  # the templates default to 8 x H100 nodes


@pytest.fixture(scope="module")
def work(request):
    """Not pytest's tmp_path: concurrent pytest sessions prune old tmp_path bases, and the cluster's spool (the
    script a requeued job runs again) and the shared reference run must outlive this whole module. Kept when a
    test failed: job logs, run dirs and the daemons' logs (state/log/) are in it."""
    path = Path(tempfile.mkdtemp(prefix="arctrain-slurm-test-"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"\nslurm tests: logs kept in {path}")


@pytest.fixture
def tmp_path(work, request) -> Path:  # a test's own directory, inside `work`
    path = work / re.sub(r"\W", "_", request.node.name)
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def cluster(work):
    cluster = Cluster(work / "state")
    try:
        yield cluster
    finally:
        cluster.stop()  # daemons, namespaces, bridge, /etc/hosts lines: also when a test failed


@pytest.fixture(scope="module")
def shards(tiny_models, work) -> Path:
    """A small shard set (the first 120 documents of the tiny corpus) built with the real `arc-data build`."""
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join((tiny_models / "corpus.jsonl").read_text().splitlines(keepends=True)[:120]))
    models = {name: tiny_models / name for name in ("encoder", "llama", "mistral")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools.cli",
            "build",
            "--input",
            str(corpus),
            "--out",
            str(work / "shards"),
            "--encoder-tokenizer",
            str(models["encoder"]),
            "--decoder",
            f"llama={models['llama']}",
            "--decoder",
            f"mistral={models['mistral']}",
            "--segment-tokens",
            "64",
            "--val-fraction",
            "0.05",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    return work / "shards"


def train_env(tiny_models: Path, shards: Path, run_dir: Path, nproc: int, extra: str = "") -> dict[str, str]:
    overrides = (
        f"model.encoder_path={tiny_models / 'encoder'} decoders.0.path={tiny_models / 'llama'} "
        f"decoders.1.path={tiny_models / 'mistral'} data.shards={shards} data.num_workers=0 data.micro_batch_size=4 "
        f"train.steps={STEPS} checkpoint.interval=1000 eval.interval=0 logging.interval=1 logging.wandb_mode=disabled "
        f"logging.sample_keys=true {extra}"
    )
    return {
        "CONFIG": "configs/tiny_cpu.yaml",
        "RUN_DIR": str(run_dir),
        "OVERRIDES": overrides,
        "NPROC_PER_NODE": str(nproc),
    }


@pytest.fixture(scope="module")
def reference(cluster, tiny_models, shards, work) -> tuple[Path, Path, dict]:
    """An uninterrupted `sbatch slurm/pretrain.sh` of the tiny config: 1 node, 2 ranks. (run dir, log, job)."""
    cluster.ensure(1)
    run_dir, log = work / "reference", work / "reference.out"
    env = train_env(tiny_models, shards, run_dir, nproc=2)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    return run_dir, log, cluster.wait_finished(job_id, log)


def test_pretrain_job_trains_and_checkpoints(reference):
    run_dir, log, job = reference
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-4000:]
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "config.yaml").is_file()
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag).is_dir()
    banner = [f"job {job['JobId']} ", "nodes 1:", "ranks per node 2", "config configs/tiny_cpu.yaml"]
    banner += ["resume from: none (fresh start)", "training finished"]
    for expected in banner:
        assert expected in text, f"{expected!r} not in the job log:\n{text[-4000:]}"
    # The commit the job ran: HEAD then (HEAD or an ancestor of it now, as others may commit meanwhile).
    commit = re.search(r"git commit ([0-9a-f]{7,})", text)
    ancestor = ["git", "merge-base", "--is-ancestor", commit.group(1) if commit else "none", "HEAD"]
    assert commit and subprocess.run(ancestor, cwd=REPO).returncode == 0, text[:2000]


def test_usr1_checkpoints_requeues_and_resumes(cluster, reference, tiny_models, shards, tmp_path):
    cluster.ensure(1)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = train_env(tiny_models, shards, run_dir, nproc=2)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    wait_for_step(run_dir, 4, cluster, job_id, log)
    # What SLURM does 300 s before the time limit (--signal=B:USR1@300): USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # A requeued job is held for a while (BeginTime, about 2 minutes): once it is back in the queue, release it.
    def requeued_or_over(j: dict) -> bool:
        return (j["Restarts"] == "1" and j["JobState"] == "PENDING") or j["JobState"] not in RUNNING

    requeued = cluster.wait(job_id, requeued_or_over, log, timeout=240)
    assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", log.read_text()[-4000:]
    # slurmd refuses a job credential made in the same second as the revocation of the previous run's ("Job
    # credential revoked", whole seconds): let a second pass, as SLURM's own hold does with minutes to spare.
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait_finished(job_id, log)

    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-4000:]
    assert "received SIGUSR1" in text and f"requeueing job {job_id} (restart 1)" in text
    resumed = [
        int(line.split("resumed from step")[1].split()[0]) for line in text.splitlines() if "resumed from step" in line
    ]
    assert resumed and 4 <= resumed[0] < STEPS, text[-4000:]
    assert f"preempted at step {resumed[0]}: saving a checkpoint" in text  # the trainer's line before exit 75
    assert f"resume from: checkpoints/step_{resumed[0]:08d}" in text  # the banner of the requeued job
    losses, expected = read_losses(run_dir), read_losses(reference[0])
    assert max(losses) == STEPS
    for step in range(resumed[0] + 1, STEPS + 1):  # every step after the resume, the last one included
        assert losses[step] == pytest.approx(expected[step], abs=1e-5), step


def test_requeues_are_bounded_by_max_restarts(cluster, tiny_models, shards, tmp_path):
    cluster.ensure(1)
    log = tmp_path / "job.out"
    env = {**train_env(tiny_models, shards, tmp_path / "run", nproc=1), "MAX_RESTARTS": "0"}
    job_id = cluster.sbatch("pretrain.sh", "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    cluster.wait(job_id, lambda j: log.exists() and "resume from:" in log.read_text(), log, timeout=120)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = cluster.wait_finished(job_id, log)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", log.read_text()[-4000:]
    assert "reached MAX_RESTARTS=0: not requeueing" in log.read_text()


def test_cancelled_job_is_not_requeued(cluster, tiny_models, shards, tmp_path):
    cluster.ensure(1)
    log = tmp_path / "job.out"
    env = train_env(tiny_models, shards, tmp_path / "run", nproc=1)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    cluster.wait(job_id, lambda j: log.exists() and "resume from:" in log.read_text(), log, timeout=120)
    cluster.run("scancel", job_id)  # SIGTERM to every process of the job: stop, do not come back
    job = cluster.wait_finished(job_id, log)
    cluster.wait(job_id, lambda _: "stopped by SIGTERM" in log.read_text(), log, timeout=60)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", log.read_text()[-4000:]
    assert "not requeueing" in log.read_text() and "requeueing job" not in log.read_text()


def test_training_failure_is_not_requeued(cluster, tiny_models, shards, tmp_path):
    cluster.ensure(1)
    log = tmp_path / "job.out"
    # Decoders swapped: the config and paths are fine, but the trainer refuses shards tokenized for other models.
    swapped = f"decoders.0.path={tiny_models / 'mistral'} decoders.1.path={tiny_models / 'llama'}"
    env = train_env(tiny_models, shards, tmp_path / "run", nproc=1, extra=swapped)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    job = cluster.wait_finished(job_id, log)
    text = log.read_text()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", text[-4000:]
    assert "not requeueing" in text and "requeueing job" not in text


@pytest.mark.parametrize("script", ["pretrain.sh", "finetune.sh"])
def test_bad_override_fails_in_one_line_before_launch(cluster, script, tmp_path):
    cluster.ensure(1)
    log = tmp_path / "job.out"
    env = {"CONFIG": "configs/tiny_cpu.yaml", "RUN_DIR": str(tmp_path / "run"), "OVERRIDES": "train.steps=0"}
    job_id = cluster.sbatch(script, "--nodes=1", *CPU_JOB, f"--output={log}", env=env)
    job = cluster.wait_finished(job_id, log, timeout=120)
    text = log.read_text()
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", text
    assert len(errors) == 1 and errors[0].startswith("arctrain-slurm: error: configs/tiny_cpu.yaml: "), text
    assert "train.steps" in errors[0] and "must be >= 1" in errors[0] and "Traceback" not in text


def test_export_job_writes_a_hugging_face_directory(cluster, reference, tmp_path):
    cluster.ensure(1)
    run_dir, log, out = reference[0], tmp_path / "job.out", tmp_path / "hf"
    env = {"RUN_DIR": str(run_dir), "EXPORT_DIR": str(out)}
    job_id = cluster.sbatch("export.sh", "--cpus-per-task=2", f"--output={log}", env=env)
    job = cluster.wait_finished(job_id, log)
    assert job["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())


def test_build_shards_array_job_merges_verified_shards(cluster, tiny_models, tmp_path):
    cluster.ensure(1)
    lines = (tiny_models / "corpus.jsonl").read_text().splitlines(keepends=True)[:60]
    for i in range(2):  # two input parts, one array task each
        (tmp_path / f"part{i}.jsonl").write_text("".join(lines[i::2]))
    (tmp_path / "parts.txt").write_text(f"{tmp_path / 'part0.jsonl'}\n{tmp_path / 'part1.jsonl'}\n")
    out = tmp_path / "shards"
    env = {
        "PARTS": str(tmp_path / "parts.txt"),
        "OUT": str(out),
        "ENCODER_TOKENIZER": str(tiny_models / "encoder"),
        "DECODERS": f"llama={tiny_models / 'llama'} mistral={tiny_models / 'mistral'}",
        "BUILD_ARGS": "--segment-tokens 64 --val-fraction 0.05 --no-progress",
    }
    log = tmp_path / "task-%a.out"
    options = ("--array=0-1", "--cpus-per-task=1", "--mem=1G", f"--output={log}")
    job_id = cluster.sbatch("build_shards.sh", *options, env=env)
    logs = [tmp_path / f"task-{i}.out" for i in range(2)]
    finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
    cluster.wait(job_id, lambda _: all(j["JobState"] in finished for j in cluster.jobs(job_id)), logs[0], timeout=300)
    states = [j["JobState"] for j in cluster.jobs(job_id)]
    assert states == ["COMPLETED", "COMPLETED"], "\n".join(p.read_text() for p in logs if p.exists())

    arc_data = str(Path(sys.executable).parent / "arc-data")
    verify = subprocess.run([arc_data, "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    merged = json.loads((out / "manifest.json").read_text())
    parts = [json.loads((out / "parts" / f"{i:05d}" / "manifest.json").read_text()) for i in range(2)]
    for split in ("train", "val"):
        assert merged["splits"][split]["samples"] == sum(p["splits"][split]["samples"] for p in parts) > 0
    # Each part numbers its shards from its own start (task * SHARD_STRIDE): no name is shared.
    names = sorted(s["name"] for s in merged["splits"]["train"]["shards"])
    assert names[0] == "train-000000.tar" and names[-1].startswith("train-01") and len(set(names)) == len(names)


def test_two_nodes_match_one_node_step_by_step(cluster, reference, tiny_models, shards, tmp_path):
    cluster.ensure(2)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = train_env(tiny_models, shards, run_dir, nproc=1)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=2", *CPU_JOB, f"--output={log}", env=env)
    job = cluster.wait_finished(job_id, log)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text[-4000:]
    assert "nodes 2: arcnode1 arcnode2; ranks per node 1" in text
    losses, expected = read_losses(run_dir), read_losses(reference[0])
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    """step -> the sample keys of all its micro-batches, over every rank's log (logging.sample_keys)."""
    keys: dict[int, list[str]] = {}
    for log in (run_dir / "logs").glob("samples_rank*.jsonl"):
        for record in map(json.loads, log.read_text().splitlines()):
            keys.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(k) for step, k in keys.items()}


def test_requeued_on_fewer_nodes_resumes_there(cluster, reference, tiny_models, shards, tmp_path):
    """A job on 2 nodes (1 rank each) gets USR1: it checkpoints and is requeued; it is then given 1 node, as a site
    does when it requeues onto what is free (`scontrol update NumNodes=1`: a `--nodes=1-2` range would start on 1
    node here, sbatch's tasks being min nodes x --ntasks-per-node; the job's CPUs are set to the one node's too), and
    resumes there (train.grad_accum 1 -> 2)
    with no arctrain setting changed."""
    cluster.ensure(2)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = train_env(tiny_models, shards, run_dir, nproc=1)
    job_id = cluster.sbatch("pretrain.sh", "--nodes=2", *CPU_JOB, f"--output={log}", env=env)
    wait_for_step(run_dir, 4, cluster, job_id, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    requeued = cluster.wait(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", log, 240)
    # 1 node of 2 CPUs: the job record keeps the first allocation's 4 CPUs unless told (never runnable otherwise).
    cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=2")
    time.sleep(2)  # see test_usr1_checkpoints_requeues_and_resumes
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait_finished(job_id, log)
    text = log.read_text()
    assert requeued and job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-4000:]
    assert "nodes 2: arcnode1 arcnode2; ranks per node 1" in text and "nodes 1: arcnode" in text, text[-4000:]
    resumed = int(text.split("resumed from step ")[1].split()[0])
    assert 4 <= resumed < STEPS and f"resumed from step {resumed} (written by 2 ranks)" in text, text[-4000:]
    assert "train.grad_accum 1 -> 2" in text
    # Every step consumed the reference's samples (1 node x 2 ranks): the data position survived the new size.
    assert step_keys(run_dir) == step_keys(reference[0]) and sorted(step_keys(run_dir)) == list(range(1, STEPS + 1))
    losses, expected = read_losses(run_dir), read_losses(reference[0])
    assert sorted(losses) == list(range(1, STEPS + 1))
    # Up to the resume, and the first step after it (the converted weights are exact), the reference's losses.
    # Later steps drift within float noise only: with gradient clipping the global norm is summed in another
    # order on 1 rank than on 2 (tests/checkpoint/test_elastic.py, without clipping, checks bitwise equality).
    for step in range(1, resumed + 2):
        assert losses[step] == pytest.approx(expected[step], abs=1e-5), step


def test_a_failing_rank_ends_the_job_with_its_cause_in_the_log(cluster, tiny_models, shards, tmp_path):
    """2 nodes, 1 rank each: rank 1 (on whichever node the rendezvous gave it) raises in its 3rd step
    (arctrain/faults.py). Every rank ends (the others told by the failing one; srun --kill-on-bad-exit ends what is
    left), the job fails without a requeue, and its log names the error."""
    cluster.ensure(2)
    log = tmp_path / "job.out"
    env = {**train_env(tiny_models, shards, tmp_path / "run", nproc=1), "ARCTRAIN_FAULT": "train_step:1:3:raise"}
    job_id = cluster.sbatch("pretrain.sh", "--nodes=2", *CPU_JOB, f"--output={log}", env=env)
    job = cluster.wait_finished(job_id, log)
    text = log.read_text()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", text[-4000:]
    cause = "rank 1 failed: InjectedFault: injected fault at train_step #3"
    assert f"arctrain train: error: {cause}" in text and f"rank 0: ending, {cause}" in text, text[-4000:]
    assert "training failed with exit status" in text and "requeueing job" not in text


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_two_node_cluster_is_torn_down(cluster):
    cluster.ensure(2)
    cluster.stop()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "arcbr0" not in links and "arcv0" not in links
    assert "arcnode" not in namespaces and "arctrain-slurm" not in Path("/etc/hosts").read_text()
    assert not list(cluster.state.glob("*.pid"))

"""Resume at another world size (arctrain/checkpoint/elastic.py): 2 ranks -> 1 and 1 -> 2 at step 10 of 20.

A step is the same global micro-batches however its 2 micro-batches of 4 are split, 2 ranks x 1 or 1 rank x 2
(arctrain/data/sampling.py `Layout`). The runs here train without gradient clipping (optim.clip=0), which makes
the two splits compute bitwise the same steps: each rank's loss is scaled by world_size (a power of two here),
DeepSpeed averages over ranks, one rank sums its micro-batches; both give the same floats. With clipping the global
gradient norm is summed in another order (a difference in its last bits, which Adam amplifies: measured 5e-6
relative loss at the second step after the resume, 3e-4 by the tenth, at the tiny config's learning rates).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, launch, metrics, overrides, step_losses, wait

pytestmark = pytest.mark.distributed
SETTINGS = ("train.steps=20", "checkpoint.interval=10", "optim.clip=0")


@pytest.fixture(scope="module")
def straight(tiny_models, tiny_shards, tmp_path_factory) -> dict[int, Path]:
    """20 steps without interruption on 2 ranks x 1 micro-batch and on 1 rank x 2 (run side by side)."""
    root = tmp_path_factory.mktemp("elastic_straight")
    accum = {2: "train.grad_accum=1", 1: "train.grad_accum=2"}
    procs = {
        n: launch(overrides(tiny_models, tiny_shards, root / f"w{n}", *SETTINGS, accum[n]), n, root / f"w{n}")
        for n in (2, 1)
    }
    assert [wait(p) for p in procs.values()] == [[0, 0], [0]]
    return {n: root / f"w{n}" for n in (2, 1)}


def stopped_at(source: Path, run_dir: Path, step: int) -> Path:
    """A copy of run `source` as it was had it stopped after its step-`step` checkpoint (its logs past that step
    are dropped by the resumed run itself, the logs of ranks it lacks included)."""
    shutil.copytree(source, run_dir)
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return run_dir


def micro_batches(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(step, global micro-batch index) -> sample keys, over every rank's log."""
    out = {}
    for log in (run_dir / "logs").glob("samples_rank*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            assert (record["step"], record["batch"]) not in out, f"{log}: {record['batch']} logged twice"
            out[(record["step"], record["batch"])] = record["keys"]
    return out


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for (step, _), keys in micro_batches(run_dir).items():
        out.setdefault(step, []).extend(keys)
    return {step: sorted(keys) for step, keys in out.items()}


def lrs(run_dir: Path) -> dict[int, dict[str, float]]:
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("lr/")} for m in metrics(run_dir)}


def consolidated(ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict], list[float]]:
    """Put together from the checkpoint's ZeRO-3 partition files, independently of DeepSpeed's converter: each
    trainable parameter's fp32 weight and Adam moments, the saved param groups (without parameters) and the Adam
    step of every sub-group. Rank r holds elements [r * p, (r + 1) * p) of a parameter of n elements (p =
    ceil(n / ranks), the last rank's part zero-padded), a sub-group's parameters one after another."""
    ranks = len(list(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    model = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    optim = [
        torch.load(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
        for r in range(ranks)
    ]
    params = {}
    for g, shapes in enumerate(model["param_shapes"]):
        flats = {"fp32": [o["fp32_flat_groups"][g] for o in optim]}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = [o["optimizer_state_dict"]["state"][g][key] for o in optim]
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = -(-n // ranks)
            params[name] = {
                k: torch.cat([f[offset : offset + part] for f in fs])[:n].view(shape) for k, fs in flats.items()
            }
            offset += part
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim[0]["optimizer_state_dict"]["param_groups"]]
    steps = [float(s["step"]) for s in optim[0]["optimizer_state_dict"]["state"].values()]
    return params, groups, steps


def elastic_load(source: Path, nproc: int, args: list[str], tmp_path: Path) -> dict:
    """What the engine holds right after loading `source`'s step-10 checkpoint on `nproc` ranks (in a copy: the
    load keeps this launch's config in the run directory), from tests/checkpoint/elastic_probe.py."""
    copy, out = stopped_at(source, tmp_path / "probe", 10), tmp_path / "probe.pt"
    args = [f"checkpoint.dir={copy}" if a.startswith("checkpoint.dir=") else a for a in args]
    program = (str(REPO / "tests" / "checkpoint" / "elastic_probe.py"), str(out))
    assert wait(launch(args, nproc, tmp_path / "probe", program)) == [0] * nproc, (tmp_path / "probe.rank0").read_text()
    return torch.load(out, weights_only=False)


def check_conversion(engine: dict, ckpt: Path, grad_accum: int) -> None:
    """Weights and Adam moments bitwise those of the checkpoint; every param group keeps its own name, decoder,
    weight decay and peaks (DeepSpeed's universal load alone gives every group group 0's)."""
    params, groups, steps = consolidated(ckpt)
    assert engine["grad_accum"] == grad_accum and engine["state"]["step"] == 10
    assert sorted(engine["params"]) == sorted(params) and len(params) > 10
    for name, saved in params.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(engine["params"][name][key], saved[key]), (name, key)
    assert any(saved["exp_avg"].abs().sum() > 0 for saved in params.values())
    assert engine["adam_steps"] == steps == [10.0] * len(groups)
    assert engine["adam_step_tensors"] == len(groups)  # each counted on its own, as before the conversion
    assert engine["groups"] == groups
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names) == 6, names  # encoder, 2 projectors, each with a no-decay twin
    assert {g["name"]: g["decoder"] for g in groups}["projector/mistral_no_decay"] == "mistral"
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    assert len({g["max_lr"] for g in groups}) == 2  # the encoder's peak and the projectors'


def check_resumed(run_dir: Path, reference: Path, log: str) -> None:
    """Steps 11-20 consume the reference's micro-batches, at its losses and learning rates, bitwise."""
    assert "resumed from step 10 (written by" in log
    assert sorted(step_losses(run_dir)) == list(range(1, 21))
    assert step_losses(run_dir) == step_losses(reference)
    assert step_keys(run_dir) == step_keys(reference)
    assert micro_batches(run_dir) == micro_batches(reference)  # each global micro-batch the same samples
    assert lrs(run_dir) == lrs(reference)  # per group, an idle decoder's projector at 0 on the other's steps
    idle = [s for s, lr in lrs(reference).items() if s > 10 and 0.0 in lr.values()]
    assert idle and all(v > 0 for s in idle for k, v in lrs(reference)[s].items() if k == "lr/encoder")
    assert not (run_dir / "checkpoints" / "universal").exists()  # the converted copy is removed once loaded


def test_one_rank_with_two_micro_batches_computes_the_two_rank_run(straight):
    assert sorted(micro_batches(straight[1])) == [(s, g) for s in range(1, 21) for g in (2 * s - 2, 2 * s - 1)]
    assert micro_batches(straight[1]) == micro_batches(straight[2])
    assert step_losses(straight[1]) == step_losses(straight[2])
    assert lrs(straight[1]) == lrs(straight[2])


def test_two_ranks_resume_on_one(straight, tiny_models, tiny_shards, tmp_path):
    run_dir = stopped_at(straight[2], tmp_path / "run", 10)
    args = overrides(tiny_models, tiny_shards, run_dir, *SETTINGS)  # train.grad_accum=1: it adapts to 2
    check_conversion(elastic_load(straight[2], 1, args, tmp_path), run_dir / "checkpoints" / "step_00000010", 2)
    assert wait(launch(args, 1, tmp_path / "log")) == [0]
    log = (tmp_path / "log.rank0").read_text()
    assert "train.grad_accum 1 -> 2: step_00000010 ran 2 micro-batches per step, this run has 1 ranks" in log
    check_resumed(run_dir, straight[2], log)
    state = json.loads((run_dir / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
    assert (state["world_size"], state["grad_accum"], state["next_sample"]) == (1, 2, 20 * 2 * 4)
    assert "grad_accum: 2" in (run_dir / "launches" / "config_002.yaml").read_text()  # what this launch ran


def test_one_rank_resumes_on_two(straight, tiny_models, tiny_shards, tmp_path):
    run_dir = stopped_at(straight[1], tmp_path / "run", 10)
    args = overrides(tiny_models, tiny_shards, run_dir, *SETTINGS, "train.grad_accum=2")  # adapts to 1
    check_conversion(elastic_load(straight[1], 2, args, tmp_path), run_dir / "checkpoints" / "step_00000010", 1)
    assert wait(launch(args, 2, tmp_path / "log")) == [0, 0]
    check_resumed(run_dir, straight[1], (tmp_path / "log.rank0").read_text())

"""DeepSpeed checkpoints for resuming: frozen decoders excluded, trainer state inside, `latest` written last.

    RUN_DIR/checkpoints/step_00000040/   DeepSpeed's files (ZeRO-3 partitions, optimizer and scheduler state)
                                         + trainer_state.json (step, data position, decoder schedule, counters)
                                         + rng_rank{r}.pt (each rank's RNG states)
    RUN_DIR/checkpoints/latest           the tag of the newest complete checkpoint
    RUN_DIR/checkpoints/diverged_step_N/ where a run stopped on non-finite steps: for a human to look at; neither
                                         `latest` nor pruning touch it, so a restart resumes the last good step

A crash during a save leaves `latest` on the previous checkpoint: it is replaced atomically only after every
rank has finished writing.
"""

import json
import os
import pickle
import random
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from arctrain.checkpoint.elastic import load_universal, resume_grad_accum
from arctrain.config.renamed import new_key
from arctrain.config.schema import Config
from arctrain.distributed import MAX, barrier, reduce_floats
from arctrain.faults import fault_point

TRAINER_STATE = "trainer_state.json"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        keep: int,
        rank: int,
        device: torch.device | None = None,
        interval: int = 0,
        last_step: int = 0,
    ):
        self.dir, self.keep, self.rank = run_dir / "checkpoints", keep, rank
        self.interval, self.last_step = interval, last_step  # checkpoint.interval, train.steps: when `due`
        self.device = device or torch.device("cpu")
        self._latest: list[str | None] = []  # the resolved tag, once looked up (see `latest`)

    def latest(self) -> str | None:
        """The tag to resume from: what `latest` names, or, when that checkpoint is missing or incomplete (a save cut
        short, a file truncated since), the newest complete one on disk, said in one line."""
        if not self._latest:
            self._latest = [resolve_latest(self.dir, self.rank == 0)]
        return self._latest[0]

    def due(self, step: int) -> bool:
        """A regular save falls on `step`: every checkpoint.interval steps, and at the run's last step."""
        return bool(self.interval and step % self.interval == 0) or step == self.last_step

    def save(self, engine, step: int, trainer_state: dict, tag: str | None = None) -> Path:
        """A checkpoint under `tag` (default step_%08d, which becomes `latest`, older ones pruned); any other tag
        (e.g. diverged_step_N) is written beside them and leaves `latest` and pruning alone."""
        regular = tag is None
        tag = tag or f"step_{step:08d}"
        failure = ""
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
            fault_point("checkpoint_save")  # tests: a rank killed with its partition written, the rest not
            torch.save(_rng_state(), self.dir / tag / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                (self.dir / tag / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        except (OSError, RuntimeError) as err:  # a full disk: OSError, or torch's "basic_ios::clear: iostream error"
            failure = " ".join(str(err).split())[:200] or type(err).__name__
        if reduce_floats([float(bool(failure))], self.device, MAX)[0]:  # every rank stops, not only the failed one
            self._failed_save(tag, failure)
        barrier(self.device)  # every rank's partition is on disk before `latest` may point at it
        if self.rank == 0 and regular:
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.dir / "latest")
            self._prune(keep_tag=tag)
        if regular:
            self._latest = [tag]
        barrier(self.device)
        return self.dir / tag

    def _failed_save(self, tag: str, failure: str) -> None:
        """Remove what a failed save wrote (rank 0, once every rank has stopped writing) and stop in one line."""
        barrier(self.device)
        if self.rank == 0:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        latest = self.latest() if regular_tag(tag) else None
        reason = f"this rank: {failure}" if failure else "another rank could not write its part"
        raise ValueError(
            f"{self.dir / tag}: the checkpoint could not be written ({reason}); is the disk full? The partial "
            f"directory was removed; `latest` still names {latest or 'no checkpoint'}"
        )

    def trainer_state(self) -> dict | None:
        """The trainer state of the newest checkpoint, or None for a fresh run."""
        tag = self.latest()
        if tag is None:
            return None
        return json.loads((self.dir / tag / TRAINER_STATE).read_text())  # readable: `latest` checked it

    def check_resumable(self, world_size: int, fingerprint: dict, grad_accum: int = 1, steps: int | None = None) -> int:
        """Refuse, in one line naming the key, to resume a checkpoint under settings that would reinterpret its
        data position (global micro-batch index -> samples). Returns the grad_accum to run with: the checkpoint
        fixes the micro-batches per step, so a resume at another world size adapts it when that is exact
        (`elastic.resume_grad_accum`)."""

        state = self.trainer_state()
        if state is None:
            return grad_accum
        where = self.dir / self.latest()
        if "next_sample" not in state and state.get("world_size", 1) > 1:  # one rank: the old order is the new one
            raise ValueError(
                f"{where} was written before the data order was made independent of the world size: resumed now, "
                f"its steps would hold other samples; start a new run directory (train.init_from={where} keeps the "
                f"weights)"
            )
        if steps is not None and steps < state["step"]:
            raise ValueError(
                f"train.steps={steps}, but {where} is at step {state['step']}: nothing to train; raise train.steps "
                f"or start a new run directory"
            )
        for old_key, value in state.get("fingerprint", {}).items():
            key = new_key(old_key) or old_key  # written before the QA keys moved under data.qa
            if key not in fingerprint or fingerprint[key] == value:
                continue
            if key in MODEL_SHAPE or key.endswith(".projector_hidden"):
                raise ValueError(
                    f"{where} was written with {key}={value!r}, this run has {key}={fingerprint[key]!r}: its weights "
                    f"belong to that model; keep {key}, or start a new run directory (train.init_from={where} loads "
                    f"the weights whose shapes still match)"
                )
            raise ValueError(
                f"{where} was written with {key}={value!r}, this run has {key}={fingerprint[key]!r}: resuming "
                f"would change which samples follow; keep {key} or start a new run directory"
            )
        return resume_grad_accum(state, where, world_size, grad_accum)

    def elastic(self, world_size: int) -> bool:
        """True when the newest checkpoint was written at another world size (DeepSpeed must load it universal)."""
        state = self.trainer_state()
        return state is not None and state.get("world_size", world_size) != world_size

    def load(self, engine, world_size: int) -> dict | None:
        """Restore the newest checkpoint into `engine`; its trainer state, or None for a fresh run. At another
        world size than the checkpoint's it goes through DeepSpeed's universal checkpoint
        (arctrain/checkpoint/elastic.py), and `engine` must have been built with checkpoint.load_universal."""
        state = self.trainer_state()
        if state is None:
            return None
        tag = self.latest()
        if self.elastic(world_size):
            load_universal(engine, self.dir / tag, self.rank, self.device)
        else:
            try:
                path, _ = engine.load_checkpoint(
                    str(self.dir),
                    tag=tag,
                    load_module_strict=False,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
            except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"{self.dir / tag}: a file of this checkpoint is not readable ({first})") from None
            if path is None:
                raise ValueError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        rng_file = self.dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():  # a rank the checkpoint did not have keeps the seeded state of a fresh start
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return state

    def _prune(self, keep_tag: str) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for tag in tags[: -self.keep]:
            if tag != keep_tag:
                shutil.rmtree(self.dir / tag, ignore_errors=True)


# Fingerprint keys that fix the shapes of the trained weights (the others fix the data position).
MODEL_SHAPE = ("model.n_truncated_layers", "model.pooling", "model.pooling_factor", "model.n_vectors")


def resume_fingerprint(cfg: Config) -> dict:
    """The settings a checkpoint's data position means something only under: global micro-batch g is a function
    of these (arctrain/data/sampling.py), so a resume must not change them. LRs, steps, intervals may change; the
    world size too, with grad_accum keeping world_size x grad_accum (`Checkpointer.check_resumable`)."""
    return {
        "data.micro_batch_size": cfg.data.micro_batch_size,
        "data.tokens_per_micro_batch": cfg.data.tokens_per_micro_batch,
        "train.seed": cfg.train.seed,
        "data.seed_offset": cfg.data.seed_offset,
        "data.shards": [f"{path}:{weight:g}" for path, weight in cfg.data.sources],
        "data.qa.train": cfg.data.qa.train,
        "data.qa.shots": cfg.data.qa.shots,
        "data.qa.max_passages": cfg.data.qa.max_passages,
        "data.task_ratio": cfg.data.task_ratio,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "data.shard_streams": cfg.data.shard_streams,
        "data.interleave_tokens": cfg.data.interleave_tokens,
        "data.chunk_tokens": cfg.data.chunk_tokens,
        "data.max_chunks": cfg.data.max_chunks,
        "decoders": [f"{d.name}:{d.weight:g}" for d in cfg.decoders],
        "train.decoder_schedule": cfg.train.decoder_schedule,
        "train.decoder_hold": cfg.train.decoder_hold,
        # The model: a resume loads weights and optimizer state of these shapes (DeepSpeed would fail naming no
        # key), and a changed pooling would silently train another compression.
        **{key: getattr(cfg.model, key.split(".")[1]) for key in MODEL_SHAPE},
        **{f"decoders.{i}.projector_hidden": d.projector_hidden for i, d in enumerate(cfg.decoders)},
    }


def training_state(state: dict, cfg: Config, world_size: int, scheduler) -> dict:
    """What trainer_state.json holds: the loop's counters (`state`: step, bad and skipped steps), the data position
    (the next global sample), the run's shape, the fingerprint a resume is checked against, the LR schedule."""
    per_step = world_size * cfg.train.grad_accum  # global micro-batches of a step: fixed for the run
    return {
        **state,
        "next_sample": state["step"] * per_step * cfg.data.micro_batch_size,
        "world_size": world_size,
        "grad_accum": cfg.train.grad_accum,
        "fingerprint": resume_fingerprint(cfg),
        "lr_schedule": scheduler.state_dict(),
    }


def regular_tag(tag: str) -> bool:
    return tag.startswith("step_")


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory `path` cannot be resumed from (one phrase naming the file), or None. Cheap: the
    trainer state is parsed, and each torch file's zip directory (at its end) is found, so a truncated one fails."""
    state = path / TRAINER_STATE
    if not path.is_dir():
        return f"{path} does not exist"
    if not state.is_file():
        return f"{path} has no {TRAINER_STATE} (its save did not finish, or it is not from arctrain)"
    try:
        if not isinstance(json.loads(state.read_text()).get("step"), int):
            return f"{state} has no step"
    except (ValueError, AttributeError) as err:
        return f"{state} is truncated or not JSON ({err})"
    for file in sorted(path.glob("*.pt")):
        if not zipfile.is_zipfile(file):
            return f"{file} is truncated or not a torch file"
    return None


def resolve_latest(ckpts: Path, say: bool = True) -> str | None:
    """The tag `ckpts/latest` names if that checkpoint is complete, else the newest complete step_* (one line on
    stderr says so when `say`); None without a `latest` file. No complete checkpoint at all is an error."""
    pointer = ckpts / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    problem = checkpoint_problem(ckpts / tag)
    if problem is None:
        return tag
    for other in sorted((p.name for p in ckpts.glob("step_*") if p.is_dir() and p.name != tag), reverse=True):
        if checkpoint_problem(ckpts / other) is None:
            if say:
                print(
                    f"checkpoint: `latest` names {tag}, but {problem}; using {other}, the newest complete checkpoint",
                    file=sys.stderr,
                )
            return other
    raise ValueError(f"{pointer} names {tag}, but {problem}; no other complete checkpoint is in {ckpts}")


def checkpoint_dir(run: Path, step: int | None) -> Path:
    """The checkpoint directory of `step` (or the latest), checked to be a complete arctrain checkpoint."""
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    ckpts = run / "checkpoints"
    if step is None:
        if not (ckpts / "latest").is_file():
            raise FileNotFoundError(f"{ckpts}: no checkpoint (no 'latest' file); train first or pass --step")
        tag = resolve_latest(ckpts)
    else:
        tag = f"step_{step:08d}"
    path = ckpts / tag
    if not path.is_dir():
        have = sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if p.is_dir())
        raise FileNotFoundError(f"{path}: no such checkpoint (steps available: {have or 'none'})")
    if (problem := checkpoint_problem(path)) is not None:
        raise ValueError(f"checkpoint incomplete or damaged: {problem}")
    if not list(path.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        raise FileNotFoundError(f"{path}: no DeepSpeed model files (zero_pp_rank_*_mp_rank_00_model_states.pt)")
    return path


def consolidate(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 trainable weights, gathered from every rank's partition (frozen decoders excluded)."""
    # deepspeed picks its accelerator on import: imported after DS_ACCELERATOR is set
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=True)

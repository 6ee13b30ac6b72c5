"""DeepSpeed checkpoints for resuming: frozen decoders excluded, trainer state inside, `latest` written last.

    RUN_DIR/checkpoints/step_00000040/   DeepSpeed's files (ZeRO-3 partitions, optimizer and scheduler state)
                                         + trainer_state.json (step, data position, decoder schedule, counters)
                                         + rng_rank{r}.pt (each rank's RNG states)
    RUN_DIR/checkpoints/latest           the tag of the newest complete checkpoint

A crash during a save leaves `latest` on the previous checkpoint: it is replaced atomically only after every
rank has finished writing.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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
    def __init__(self, run_dir: Path, keep: int, rank: int):
        self.dir, self.keep, self.rank = run_dir / "checkpoints", keep, rank

    def latest(self) -> str | None:
        pointer = self.dir / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag = f"step_{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        torch.save(_rng_state(), self.dir / tag / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            (self.dir / tag / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        dist.barrier()  # every rank's partition is on disk before `latest` may point at it
        if self.rank == 0:
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.dir / "latest")
            self._prune(keep_tag=tag)
        dist.barrier()
        return self.dir / tag

    def load(self, engine, world_size: int) -> dict | None:
        """Restore the newest checkpoint into `engine`; its trainer state, or None for a fresh run."""
        tag = self.latest()
        if tag is None:
            return None
        state_file = self.dir / tag / TRAINER_STATE
        if not state_file.is_file():
            raise ValueError(f"{self.dir / tag}: checkpoint has no {TRAINER_STATE}; it was not written by arctrain")
        state = json.loads(state_file.read_text())
        if state.get("world_size", world_size) != world_size:
            # ZeRO-3 partitions and each rank's data stream depend on the number of ranks.
            raise ValueError(
                f"{self.dir / tag} was written by {state['world_size']} ranks; resume it with {state['world_size']} "
                f"ranks (this run has {world_size}), or start a new run directory"
            )
        path, _ = engine.load_checkpoint(
            str(self.dir), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        rng_file = self.dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return state

    def _prune(self, keep_tag: str) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for tag in tags[: -self.keep]:
            if tag != keep_tag:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

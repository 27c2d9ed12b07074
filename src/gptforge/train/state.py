"""A run's checkpoints (checkpoints/step-N: a model folder and the training state) and that training state, gathered
and put back.

Model and optimizer state are whole and keyed by parameter name, gathered from every rank when the model
is sharded (so all ranks call `gather`): the same format for 1, N or sharded ranks is what lets a
checkpoint resume on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..checkpoint import weights_files
from ..config import GPTConfig
from ..errors import CheckpointError, GPTForgeError
from ..fsio import atomic_dir

BEST_RECORD = "best_validation.json"  # in best/: the step and score of the model it holds


def record_best(folder: Path, step: int, metric: str, score: float) -> None:
    """Write into a best/ folder (before it is renamed into place) which evaluation its model won."""
    (folder / BEST_RECORD).write_text(json.dumps({"step": step, "metric": metric, "score": score}) + "\n")


def best_on_disk(folder: Path, metric: str) -> tuple[float, int] | None:
    """(score, step) of the model in a run's best/ folder, or None when it holds no readable record of `metric`."""
    try:
        rec = json.loads((folder / BEST_RECORD).read_text())
        return (float(rec["score"]), int(rec["step"])) if rec.get("metric") == metric else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Whole model and optimizer state dicts (on the CPU when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full) if sharded else model.state_dict()
    return model_state, get_optimizer_state_dict(model, optimizer, options=full)


def pack(trainer, optim_state: dict) -> dict:
    """Everything but the weights that a resumed run needs to continue exactly: step, clock, best score,
    optimizer and scaler, random generators, options, and what the data and tokenizer were."""
    return {
        "step": trainer.step,
        "elapsed": trainer.elapsed,
        "best_val": trainer.best_val,
        "best_step": trainer.best_step,
        "evals_since_best": trainer.evals_since_best,
        "optimizer": optim_state,
        "scaler": trainer.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "train_config": dataclasses.asdict(trainer.cfg),
        "data": trainer.data.fingerprint,
        "tokenizer": getattr(trainer.tokenizer, "fingerprint", None)
        or getattr(trainer.data, "tokenizer_fingerprint", ""),
        "world_size": trainer.dist.world_size,
        "task_options": trainer.resume_options(),
        "average": trainer.average.state_dict() if trainer.average is not None else None,
    }


def restore(trainer, state: dict) -> str:
    """Put a packed state back into the trainer (its model already holds the checkpoint's weights); what it did
    about a weight average (--ema) that only one of the run and its checkpoint has, for the resume line."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        trainer.model, trainer.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    trainer.step, trainer.elapsed = state["step"], state["elapsed"]
    trainer.best_val, trainer.evals_since_best = state["best_val"], state["evals_since_best"]
    trainer.best_step = state.get("best_step")  # None: a checkpoint written before 2026-12-01 did not record it
    # best/ may hold a better model than the checkpoint knows of (the final evaluation comes after the last
    # checkpoint): keep it from being overwritten. One of a later step (a kill between best/ and that step's
    # checkpoint) is not adopted: the resumed run evaluates that step again, to the same score, as it did.
    disk = best_on_disk(trainer.out / "best", trainer.task.metric)
    if (
        disk
        and math.isfinite(disk[0])
        and (disk[1] is None or disk[1] <= trainer.step)
        and trainer.task.better(disk[0], trainer.best_val)
    ):
        trainer.best_val, trainer.best_step = disk
    if trainer.average is not None and state.get("average"):
        trainer.average.load_state_dict(state["average"])
    elif trainer.average is not None:
        trainer.average.restart()
        return "; --ema: the checkpoint holds no weight average, so it starts from the resumed weights"
    elif state.get("average"):
        return (
            "; the checkpoint's weight average (--ema) is dropped: this run keeps none (--ema 0), so it uses the "
            "weights"
        )
    return ""


# --- training checkpoints ------------------------------------------------------------------------------

STATE_NAME = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, write_model: Callable[[Path], None], state: dict, keep: int
) -> Path:
    """Write `checkpoints/step-N/` (the model folder `write_model(folder)` makes, plus the training state)
    under a temporary name, rename it into place, then delete all but the `keep` newest checkpoints."""
    target = Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        write_model(tmp)
        torch.save(state, tmp / STATE_NAME)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def newest_intact_checkpoint(run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The newest checkpoint of a run whose config, weights and training state read back, with that state.

    Newer damaged ones (a truncated file, a disk error) are named and skipped; none at all is an error."""
    from safetensors import safe_open

    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            GPTConfig.load(path)
            adapter = path / "adapter_model.safetensors"  # a LoRA run's checkpoints hold the adapter only
            for f in [adapter] if (path / "adapter_config.json").is_file() else weights_files(path):  # truncation shows
                with safe_open(str(f), "pt") as weights:
                    weights.keys()
            state = load_training_state(path)
        except (GPTForgeError, SafetensorError, OSError, ValueError) as e:
            log(f"skipping damaged checkpoint {path} ({str(e).splitlines()[0][:200]}); trying an older one")
            continue
        if path != found[-1]:
            log(f"resuming from {path.name}, the newest checkpoint that is intact")
        return path, state
    where = Path(run_dir) / CHECKPOINTS
    raise CheckpointError(
        f"{where}: no intact checkpoint to resume from"
        if found
        else f"{Path(run_dir)}: no checkpoint to resume from (looked in {where})"
    )


def load_training_state(path: str | os.PathLike) -> dict:
    """The training state saved with a checkpoint (tensors and plain data only; nothing is executed)."""
    file = Path(path) / STATE_NAME
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{file}: the training state cannot be read ({msg}); the checkpoint is damaged") from None


__all__ = [
    "CHECKPOINTS",
    "STATE_NAME",
    "gather",
    "list_checkpoints",
    "load_training_state",
    "newest_intact_checkpoint",
    "pack",
    "restore",
    "save_checkpoint",
]

"""The rules that keep a user's work safe around a training run, checked before any work starts.

- `--out` is a new or empty folder, or a gptforge run (resumed with --resume, replaced with --overwrite);
  a folder of other files, an existing file, or the model folder `--init` starts from is refused.
- One process trains into a run folder at a time (`claim_run_folder` holds its lock), and what killed
  saves left there is cleaned up first.
- A resumed run continues the same run: the data and the tokenizer it started with, from the newest
  intact checkpoint.
- Options that contradict each other, or a batch that cannot fit in memory, are refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .. import checkpoint as ckpt
from ..config import GPTConfig
from ..errors import OptionError, RunFolderError, TokenizerError
from ..fsio import LOCK_NAME, clean_leftovers, exclusive_lock
from ..runtime import job_restarted
from . import state as ckpt_state

PREVIOUS = ("metrics.jsonl", ckpt_state.CHECKPOINTS)  # what an earlier run leaves as soon as it has trained
# what a run writes into its folder, removed by --overwrite (the prepared data/ is kept: it is reused when it fits)
RUN_FILES = (
    ckpt_state.CHECKPOINTS,
    "best",
    "metrics.jsonl",
    "samples.txt",
    "loss.png",
    "tensorboard",
    "run_config.json",
    "config.json",
    ckpt.WEIGHTS_NAME,
    "generation_config.json",
)


def is_run_folder(out: Path) -> bool:
    """Whether `out` was made by a gptforge training run (its lock file, metrics or checkpoints)."""
    return any((out / name).exists() for name in (LOCK_NAME, *PREVIOUS))


def resume_after_restart(cfg):
    """The options of workers that torchrun (--max-restarts) started again after one of them failed: they
    continue from the run's newest intact checkpoint without being told (--resume), whatever the command said
    (--overwrite would throw the run away). With no checkpoint yet, the options stay as given: a restart of a
    run begun with --overwrite starts it again, one begun without it stops at the earlier attempt's files."""
    if cfg.resume or not (job_restarted(cfg.device) and ckpt_state.list_checkpoints(Path(cfg.out_dir))):
        return cfg
    return dataclasses.replace(cfg, resume=True, overwrite=False)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def refuse_previous_run(out: Path, cfg, init: str | None = None) -> list[str]:
    """The files of an earlier run in `out`; an error when `out` cannot take this run (see the module doc)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a folder; choose a folder name for the run")
    if (
        init is not None
        and Path(init).exists()
        and _inside(out, Path(init) if Path(init).is_dir() else Path(init).parent)
    ):
        raise RunFolderError(
            f"--out {out} is inside --init {init}: the run would overwrite the model it starts from; "
            "choose another --out"
        )
    if out.is_dir() and not is_run_folder(out):
        names = sorted(p.name for p in out.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise RunFolderError(
                f"{out}: holds files that are not a gptforge run ({shown}); choose a new or empty "
                "--out so nothing of yours is overwritten"
            )
    previous = [n for n in PREVIOUS if (out / n).exists()]
    if previous and not cfg.resume and not cfg.overwrite:
        raise RunFolderError(
            f"{out}: holds another run ({', '.join(previous)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if cfg.resume and not ckpt_state.list_checkpoints(out):
        raise RunFolderError(
            f"{out}: no checkpoint to resume from (looked in {out / ckpt_state.CHECKPOINTS}); "
            "start the run without --resume"
        )
    return previous


def clear_previous_run(out: Path) -> None:
    """Remove what an earlier run wrote into `out` (--overwrite); other files stay."""
    for name in RUN_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_folder(out: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run folder's lock for the block (rank 0 of a distributed run holds it for all ranks) and
    clear the temporary files of saves that were killed. A run that trained (metrics, checkpoints) leaves no
    lock file behind; one that stopped before keeps the empty lock file, which marks the folder as a run's."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return

    def trained() -> bool:  # the folder is known as a run's without its lock file
        return any((Path(out) / name).exists() for name in PREVIOUS)

    with exclusive_lock(out, "training run", log, remove=trained):
        for folder in (Path(out), Path(out) / ckpt_state.CHECKPOINTS):
            for name in clean_leftovers(folder):
                log(f"cleaned up {folder / name}, left by an interrupted save")
        yield


# --- resuming the same run ----------------------------------------------------------------------------


def _checkpoint_tokenizer(path: Path):
    from ..tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError):
        return None


def resume_tokenizer(out: Path) -> Path | None:
    """The newest checkpoint of a run that holds a usable tokenizer (None when there is none)."""
    return next((p for p in reversed(ckpt_state.list_checkpoints(out)) if _checkpoint_tokenizer(p) is not None), None)


def check_same_run(path: Path, state: dict, data, tokenizer) -> None:
    """Refuse to resume checkpoint `path` on other data or with another tokenizer than it was trained with."""
    theirs, mine = state.get("data"), getattr(data, "fingerprint", "")
    if theirs and mine and theirs != mine:
        show = lambda fp: str(json.loads(fp) if fp.startswith('"') else fp)[:40]  # noqa: E731 - two uses
        raise RunFolderError(
            f"{path}: the training data changed since this checkpoint (dataset {show(theirs)} then, {show(mine)} now); "
            "resume with the data the run started on, or start a new run (--overwrite or another --out)"
        )
    mine = getattr(tokenizer, "fingerprint", None) or getattr(data, "tokenizer_fingerprint", "")
    saved = _checkpoint_tokenizer(path)
    theirs = state.get("tokenizer") or getattr(saved, "fingerprint", None)
    if mine and theirs and mine != theirs:
        raise RunFolderError(
            f"{path}: the tokenizer changed since this checkpoint (fingerprint {theirs} then, {mine} now); resume with "
            f"the tokenizer the run started with (a copy is in {path}), or start a new run"
        )


def check_same_setup(path: Path, saved: dict, config: GPTConfig, options_now: dict) -> None:
    """A checkpoint resumes only the model config and the task options (Trainer.resume_options) it was saved with."""
    theirs, mine = GPTConfig.load(path).to_dict(), config.to_dict()
    differ = [f"{k}: checkpoint {theirs[k]} vs now {mine[k]}" for k in mine if k in theirs and mine[k] != theirs[k]]
    if differ:
        raise RunFolderError(f"{path}: was trained with a different model config ({'; '.join(differ)})")
    theirs = saved.get("task_options") or {}
    show = lambda v: "none" if v is None else v
    differ = [
        f"{k} {show(theirs[k])} then, {show(options_now[k])} now"
        for k in options_now
        if k in theirs and options_now[k] != theirs[k]
    ]
    if differ:
        raise RunFolderError(
            f"{path}: this run was begun with other options ({'; '.join(differ)}); resume with the options it "
            "began with"
        )


def batch_change_note(saved: dict, cfg) -> str | None:
    """What to say when a run resumes with another batch size or accumulation than it began with."""
    began = saved.get("train_config") or {}
    changed = [
        f"--{k.replace('_', '-')} {began[k]} then, {getattr(cfg, k)} now"
        for k in ("batch_size", "grad_accum")
        if began.get(k) is not None and began[k] != getattr(cfg, k)
    ]
    if not changed:
        return None
    return (
        f"note: {'; '.join(changed)}: the run goes on with another batch, so it will not end as the stopped run "
        "would have; resume with the command it began with to continue it exactly"
    )


def check_tokenizer_of_data(tokenizer, data) -> None:
    """Refuse a tokenizer other than the one a prepared dataset's ids belong to."""
    mine, theirs = getattr(tokenizer, "fingerprint", None), getattr(data, "tokenizer_fingerprint", "")
    if mine and theirs and mine != theirs:
        raise TokenizerError(
            f"the tokenizer {getattr(tokenizer, 'source', '')} is not the one the dataset was prepared with "
            f"(fingerprint {mine} vs {theirs}); train with the dataset's own tokenizer (its tokenizer/ folder) "
            "or prepare the data again with this one"
        )


# --- options -------------------------------------------------------------------------------------------


def _flag(key: str, overrides: dict) -> str:
    """The flag that set a model override: --dropout sets the three dropouts, --attn-dropout the attention's alone."""
    if key == "attn_pdrop" and "resid_pdrop" not in overrides:
        return "--attn-dropout"
    return "--dropout" if key.endswith("_pdrop") else "--" + key.replace("_", "-")


def refuse_conflicts(
    inputs, data, eval_inputs, init, size, overrides: dict, tokenizer, vocab_size, line_by_line
) -> None:
    """Options that contradict each other are refused, never silently ignored."""
    if init is not None:
        scratch = (["--size"] if size else []) + sorted({_flag(k, overrides) for k in overrides or {}})
        if scratch:
            raise OptionError(
                f"--init {init} fine-tunes that model as it is; {', '.join(scratch)} only apply when "
                "training from scratch (drop them, or drop --init)"
            )
    if data is not None:
        if inputs:
            raise OptionError(
                f"--data {data} is a prepared dataset, so the input files ({inputs[0]}, ...) would be "
                "ignored; give either --data or input files"
            )
        if eval_inputs:
            raise OptionError(
                f"--val-file with --data: the dataset {data} has its own validation split; prepare it "
                "with `gptforge prepare --val-file` instead"
            )
        if line_by_line:
            raise OptionError(
                f"--line-by-line with --data: the dataset {data} is already prepared; prepare it with "
                "`gptforge prepare --line-by-line` instead"
            )
    if vocab_size is not None and (init is not None or tokenizer is not None or data is not None):
        used = "--init" if init is not None else "--tokenizer" if tokenizer is not None else "--data"
        raise OptionError(
            f"--vocab-size sizes a tokenizer trained for the run, but {used} brings its own tokenizer; "
            "drop --vocab-size"
        )


def check_block_size(block_size: int, config: GPTConfig) -> None:
    if block_size > config.n_positions:
        raise OptionError(
            f"--block-size {block_size} is larger than the model's context n_positions={config.n_positions}; "
            "lower --block-size"
        )


def memory_of(device) -> int | None:
    """Bytes of memory on `device` (physical RAM for the CPU), or None when unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits_memory(config: GPTConfig, cfg, block_size: int, device) -> None:
    """Refuse a model and batch that cannot fit in the device's memory, before anything is allocated.

    The estimate is a lower bound (fp32 weights, gradient and two AdamW moments, plus a fraction of the
    activations a step really keeps), so it refuses only what cannot work."""
    total = memory_of(device)
    if total is None:
        return
    params = config.num_params()
    tokens = cfg.batch_size * block_size
    per_token = config.n_embd * (1 if cfg.gradient_checkpointing else 8) * config.n_layer * 4
    need = 16 * params + tokens * per_token
    if need > total:
        raise OptionError(
            f"--batch-size {cfg.batch_size} x --block-size {block_size} with a {params / 1e6:,.0f}M-parameter model "
            "needs "
            f"at least {need / 2**30:,.1f} GiB, and {device} has {total / 2**30:,.1f} GiB; lower --batch-size (raise "
            "--grad-accum to keep the tokens per step), lower --block-size, add --gradient-checkpointing, or pick a "
            "smaller model"
        )


__all__ = [
    "RUN_FILES",
    "check_block_size",
    "check_fits_memory",
    "check_same_run",
    "check_tokenizer_of_data",
    "claim_run_folder",
    "clear_previous_run",
    "is_run_folder",
    "memory_of",
    "refuse_conflicts",
    "refuse_previous_run",
    "resume_tokenizer",
]

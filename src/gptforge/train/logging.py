"""Where a run reports: plain messages, progress, metrics.jsonl rows, external loggers (TensorBoard, Weights &
Biases, MLflow), samples.txt and loss.png."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from ..errors import OptionError
from ..options import REPORTERS
from ..progress import LINE_SECONDS, clock, display, progress_bar

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_reporters(names) -> list[str]:
    """The external loggers asked for, each checked to be installed (before any work starts)."""
    names = [names] if isinstance(names, str) else list(names or [])
    for name in names:
        if name not in REPORTERS:
            raise OptionError(f"--report-to {name!r}: choose from {', '.join(REPORTERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise OptionError(f"--report-to {name} needs the {_PACKAGES[name]} package: pip install 'gptforge[{name}]'")
    return names


class RunLog:
    """The reporting of one run. Only the main process writes; every process keeps the history rows.

    `report_to` names external loggers ("tensorboard", "wandb", "mlflow"; `True` means TensorBoard);
    `config` (the run's options) is sent to those that record parameters.
    """

    def __init__(self, out: Path, main: bool = True, report_to=(), plot: bool = True, config: dict | None = None):
        self.out, self.main, self.plot_enabled = Path(out), main, plot
        self.history: list[dict] = []
        self.config = config or {}
        self.reporters = check_reporters(["tensorboard"] if report_to is True else report_to or []) if main else []
        self._open: dict = {}  # reporter name -> its writer or run, made at the first row
        self._said_no_plot = False

    def message(self, text: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(text)

    def record(self, row: dict) -> None:
        """One metrics row: kept in `history`, appended to metrics.jsonl, sent to the external loggers."""
        self.history.append(row)
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for name in list(self.reporters):
            try:
                getattr(self, f"_to_{name}")(scalars, row["step"])
            except Exception as e:  # noqa: BLE001 - a logger's own failure (its store, its server) never ends a run
                self.reporters.remove(name)
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                self.message(
                    f"warning: --report-to {name} failed ({type(e).__name__}: {first}); the run goes on without "
                    f"it (metrics.jsonl has every row)"
                )

    def _to_tensorboard(self, scalars: dict, step: int) -> None:
        if "tensorboard" not in self._open:
            from torch.utils.tensorboard import SummaryWriter

            self._open["tensorboard"] = SummaryWriter(str(self.out / "tensorboard"))
        for k, v in scalars.items():
            self._open["tensorboard"].add_scalar(k, v, step)

    def _to_wandb(self, scalars: dict, step: int) -> None:
        import wandb

        if "wandb" not in self._open:  # WANDB_MODE=offline keeps the run on disk, under the run folder
            self._open["wandb"] = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "gptforge"),
                name=self.out.name,
                dir=str(self.out),
                config=self.config,
            )
        self._open["wandb"].log(scalars, step=step)

    def _to_mlflow(self, scalars: dict, step: int) -> None:
        import mlflow

        if "mlflow" not in self._open:  # the tracking store is MLFLOW_TRACKING_URI's, as everywhere in MLflow
            self._open["mlflow"] = mlflow.start_run(run_name=self.out.name, nested=mlflow.active_run() is not None)
            mlflow.log_params({k: str(v)[:500] for k, v in self.config.items()})
        mlflow.log_metrics(scalars, step=step)

    def continue_from(self, step: int, final_again: bool = False) -> None:
        """A resumed run picks up its records at checkpoint `step`: the history (and loss.png) from the start,
        and no rows or samples of the steps after it, which the run is about to take again (with `final_again`,
        nor the evaluation and sample of `step` itself, which a finished run repeats)."""
        from ..fsio import read_json_lines, write_text

        metrics, samples = self.out / "metrics.jsonl", self.out / "samples.txt"
        if metrics.is_file():
            rows = read_json_lines(metrics)  # a line cut short by the kill that ended the run is left out
            self.history = [
                r
                for r in rows
                if isinstance(r, dict)
                and (r.get("step", 0) < step or r.get("step", 0) == step and not (final_again and "val_loss" in r))
            ]
            if self.main and len(self.history) != len(rows):
                write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.history))
        if self.main and samples.is_file():
            text = samples.read_text(encoding="utf-8")
            later = next(
                (
                    m.start()
                    for m in re.finditer(r"(?m)^=== step (\d+) ===$", text)
                    if int(m.group(1)) > step or final_again and int(m.group(1)) == step
                ),
                None,
            )
            if later is not None:
                write_text(samples, text[:later])

    def sample(self, step: int, text: str) -> None:
        self.message(f"--- sample at step {step} ---\n{text}\n---")
        if self.main:
            with open(self.out / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {step} ===\n{text}\n\n")

    def plot(self) -> None:
        """Draw loss.png from the history. matplotlib is a dependency; where it cannot be imported (a broken
        install) or drawing fails, that is said once and training goes on."""
        if not (self.plot_enabled and self.main):
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            draw_loss(self.history, self.out / "loss.png", title=f"{self.out.resolve().name}: loss per token")
        except (ImportError, OSError, RuntimeError, ValueError) as e:
            if not self._said_no_plot:
                why = "matplotlib cannot be imported" if isinstance(e, ImportError) else "drawing failed"
                self.message(
                    f"loss.png is not drawn: {why} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                    "reinstall gptforge (matplotlib is one of its dependencies) or pass --no-plot"
                )
                self._said_no_plot = True

    def close(self) -> None:
        for name, handle in self._open.items():
            if name == "mlflow":
                import mlflow

                mlflow.end_run()
            else:
                (handle.finish if name == "wandb" else handle.close)()
        self._open.clear()


def draw_loss(history: list[dict], path: Path, title: str = "loss") -> None:
    """Training and validation loss (nats per token) with validation bits per byte on the right-hand axis,
    the learning rate below, and a note where the final evaluation on all validation tokens differs from
    the periodic ones on a part of them."""
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    vals = [r for r in history if "val_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in history if "lr" in r]
    final = (
        vals[-1]
        if len(vals) > 1 and vals[-1].get("val_tokens", 0) > max(r.get("val_tokens", 0) for r in vals[:-1])
        else None
    )
    periodic = [r for r in vals if r is not final]
    rewards = any("rewards/margins" in r for r in history)  # preference tuning: trl's figures get a panel
    fig, axes = plt.subplots(
        3 if rewards else 2, 1, sharex=True, figsize=(8, 8 if rewards else 6),
        gridspec_kw={"height_ratios": [3, 2, 1] if rewards else [3, 1]},
    )  # fmt: skip
    ax, ax_lr = axes[0], axes[-1]
    if rewards:
        draw_rewards(axes[1], history)
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if periodic:
        ax.plot([r["step"] for r in periodic], [r["val_loss"] for r in periodic], "o-", label="validation")
    if final is not None:
        ax.plot([final["step"]], [final["val_loss"]], "*", markersize=12, label="final validation (all tokens)")
        ax.annotate(
            f"final: {final['val_loss']:.3f} on {final['val_tokens']:,} tokens\n"
            f"(periodic: {periodic[-1]['val_loss']:.3f} on {periodic[-1]['val_tokens']:,})",
            (final["step"], final["val_loss"]),
            textcoords="offset points",
            xytext=(-10, 15),
            ha="right",
            fontsize=8,
        )
    ax.set_ylabel("loss (per pair)" if rewards else "loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    scale = next(
        (r["val_bits_per_byte"] / r["val_loss"] for r in vals if r.get("val_bits_per_byte") and r["val_loss"]), None
    )
    if scale:  # bits per byte is loss x a constant: a second scale on the same axis
        right = ax.twinx()
        low, high = ax.get_ylim()
        right.set_ylim(low * scale, high * scale)
        right.set_ylabel("validation bits/byte")
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_rewards(ax, history: list[dict]) -> None:
    """Preference tuning's figures: the reward margin and the share of pairs preferred the right way, training and
    validation."""
    for key, style in (("rewards/margins", "-"), ("rewards/accuracies", "--")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            points = [(r["step"], r[prefix + key]) for r in history if prefix + key in r]
            if points:
                ax.plot(*zip(*points), style, marker="o" if prefix else None, label=f"{label} {key.split('/')[1]}")
    ax.set_ylabel("reward margin / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


class StepProgress:
    """Training progress: a bar on a terminal or in a notebook (steps; seconds of the budget under
    --max-time), and plain lines on stderr when it is neither or the bar is off."""

    def __init__(
        self, max_steps: int | None, max_time: float | None, step: int = 0, main: bool = True, bar: bool = True
    ):
        self.max_steps, self.max_time, self.main = max_steps, max_time, main
        self.lines = main and (not bar or display() == "lines")
        self.timed = max_time is not None
        self.bar = None
        if main and bar and not self.lines:
            total, unit = (max_time, "s") if self.timed else (max_steps, "step")
            self.bar = progress_bar(
                total,
                unit=unit,
                initial=0 if self.timed else step,
                bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}" if self.timed else None,
            )
        self._printed, self._pending = -math.inf, ""

    def left(self, step: int, elapsed: float) -> float | None:
        """Seconds left: to the deadline, or at this pace to the last step, whichever comes first."""
        options = []
        if self.max_time:
            options.append(self.max_time - elapsed)
        if self.max_steps and step:
            options.append(elapsed / step * (self.max_steps - step))
        return max(min(options), 0.0) if options else None

    def advance(self, step: int, elapsed: float) -> None:
        if self.bar is None:
            return
        if self.timed:
            fraction = max(elapsed / self.max_time, step / self.max_steps if self.max_steps else 0.0)
            self.bar.update(min(fraction, 1.0) * self.max_time - self.bar.n)  # tqdm redraws at its own pace
        else:
            self.bar.update(1)

    def show(self, step: int, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None:
        """The latest training numbers (at each log interval)."""
        left = self.left(step, elapsed)
        if self.bar is not None:
            post = dict(step=step) if self.timed else {}
            post.update(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.set_postfix(**post, **({"left": clock(left)} if left is not None else {}))
        if self.lines:
            of = f"/{self.max_steps:,}" if self.max_steps else ""
            self._pending = (
                f"step {step:,}{of} | loss {loss:.2f} | lr {lr:.1e} | {tokens_per_s:,.0f} tok/s | "
                f"{clock(elapsed)} elapsed" + (f" | {clock(left)} left" if left is not None else "")
            )
            if time.monotonic() - self._printed >= LINE_SECONDS:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            print(self._pending, file=sys.stderr, flush=True)
            self._printed, self._pending = time.monotonic(), ""

    def close(self) -> None:
        self._flush()  # the last numbers are always printed
        if self.bar is not None:
            self.bar.close()


def describe_run(trainer) -> str:
    """What a run is about to do, in a few lines: model, device, batch, optimizer, length, data, output."""
    cfg, c = trainer.cfg, trainer.model.config
    length = " and ".join(
        s
        for s in (
            f"{trainer.max_steps} steps" if trainer.max_steps else "",
            f"{cfg.max_time:.0f}s" if cfg.max_time else "",
        )
        if s
    )
    warmup = f"{trainer.warmup_share:.0%} of the run" if trainer.warmup_share else f"{cfg.warmup_steps} steps"
    world = trainer.dist.world_size
    frozen = f", {trainer.frozen:,} frozen" if trainer.frozen else ""
    muon = f"Muon lr {cfg.muon_lr:g} for the block matrices, " if cfg.optimizer == "muon" else ""
    schedule = f"wsd, cooldown {cfg.cooldown:.0%}" if cfg.schedule == "wsd" else cfg.schedule
    bf16 = " (products from bf16 inputs: measured faster here; --precision fp32 keeps them fp32)"
    bf16 = bf16 if trainer.bf16_products else ""
    return (
        f"model: {trainer.model.num_params() / 1e6:.2f}M parameters (n_layer={c.n_layer}, n_embd={c.n_embd}, "
        f"n_head={c.n_head}, vocab={c.vocab_size}){frozen}\n"
        f"device: {trainer.device}, precision: {str(trainer.dtype).removeprefix('torch.')}"
        f"{bf16}, world size {world}\n"
        f"batch: {cfg.batch_size} x {trainer.block_size} tokens x {cfg.grad_accum} accumulation"
        f"{f' x {world} ranks' if world > 1 else ''} = {trainer.tokens_per_step:,} tokens per step\n"
        f"optimizer: {muon}AdamW lr {cfg.learning_rate:g} ({schedule}, warmup {warmup}, floor x{cfg.min_lr_ratio}), "
        f"weight decay {cfg.weight_decay}, betas ({cfg.beta1}, {cfg.beta2}), clip {cfg.grad_clip}"
        f"{f'; weight average (ema) {cfg.ema:g}' if cfg.ema else ''}\n"
        f"length: {length}; {trainer.task.size()}; output: {trainer.out}"
    )


__all__ = ["describe_run", "RunLog", "StepProgress", "check_reporters", "draw_loss", "draw_rewards"]

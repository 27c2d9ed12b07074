"""Where a run reports: plain messages, metrics.jsonl rows, TensorBoard scalars, samples.txt and loss.png."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import OptionError


class RunLog:
    """The reporting of one run. Only the main process writes; every process keeps the history rows."""

    def __init__(self, out: Path, main: bool = True, tensorboard: bool = False, plot: bool = True):
        self.out, self.main, self.plot_enabled = Path(out), main, plot
        self.history: list[dict] = []
        self._tb = None
        self._tensorboard = tensorboard and main
        if self._tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401  (checked now, before any work)
            except ImportError:
                raise OptionError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    def message(self, text: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(text)

    def record(self, row: dict) -> None:
        """One metrics row: kept in `history`, appended to metrics.jsonl, sent to TensorBoard."""
        self.history.append(row)
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def sample(self, step: int, text: str) -> None:
        self.message(f"--- sample at step {step} ---\n{text}\n---")
        if self.main:
            with open(self.out / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {step} ===\n{text}\n\n")

    def plot(self) -> None:
        """Draw loss.png from the history (when matplotlib is installed)."""
        if not (self.plot_enabled and self.main):
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label in ((train, "train"), (val, "validation")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


__all__ = ["RunLog"]

"""An exponential moving average of the trained weights (`--ema DECAY`).

After every optimizer step each trainable weight's average moves towards it: avg += (1 - d) * (w - avg), with
d = min(DECAY, (1 + n) / (10 + n)) after n updates, so that the first steps are not averaged with the
initial weights for long. Evaluations, `best/` and the final model folder use the average; the training
steps, and the model folder inside each checkpoint (what `--resume` continues from), use the weights
themselves, and the checkpoint's training state holds the average, so a resumed run averages on exactly.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import CheckpointError


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.average = [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def restart(self) -> None:
        """Average from the model's weights as they are now (a resumed run whose checkpoint holds no average)."""
        self.updates = 0
        torch._foreach_copy_(self.average, [p.detach() for _, p in self.named])

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for _, p in self.named], 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        """For the duration, the model's trainable weights are the average (then its own weights again)."""
        with torch.no_grad():
            own = [p.detach().clone() for _, p in self.named]
        self.install()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), w in zip(self.named, own):
                    p.copy_(w)

    def install(self) -> None:
        """The average into the model's trainable weights, for good (a finished run's model is the one it saved)."""
        with torch.no_grad():
            for (_, p), a in zip(self.named, self.average):
                p.copy_(a)

    def state_dict(self) -> dict:
        return {
            "updates": self.updates,
            "average": {n: a.detach().cpu().clone() for (n, _), a in zip(self.named, self.average)},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n, _ in self.named if n not in state["average"]]
        if missing:
            raise CheckpointError(
                f"the checkpoint's weight average (--ema) lacks {', '.join(missing[:3])}: resume with the "
                "--freeze and --lora-* options the run began with"
            )
        self.updates = state["updates"]
        with torch.no_grad():
            for (n, _), a in zip(self.named, self.average):
                a.copy_(state["average"][n])


__all__ = ["WeightAverage"]

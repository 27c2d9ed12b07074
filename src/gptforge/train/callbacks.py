"""Python hooks into a run, as transformers' Trainer callbacks are used: each is a plain function.

    train(model, data, on_log=lambda trainer, row: print(row["loss"]),
          on_evaluate=lambda trainer, row: print(row["val_loss"]),
          on_save=lambda trainer, folder: print("saved", folder))

`on_step(trainer)` after every optimizer step; `on_log(trainer, row)` with each log row (step, loss, lr,
tokens_per_s, elapsed: every --log-interval steps); `on_evaluate(trainer, row)` with each evaluation's row
(val_loss, val_perplexity, ...; a classifier's val_accuracy, val_macro_f1 and what compute_metrics adds);
`on_save(trainer, folder)` after each checkpoint and the final model folder are written. They run on the
process that does the work (with torchrun: every rank logs and saves, rank 0 evaluates) and their time is not
counted as training time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OptionError

NAMES = ("on_step", "on_log", "on_evaluate", "on_save")


@dataclass
class Callbacks:
    on_step: Callable | None = None
    on_log: Callable | None = None
    on_evaluate: Callable | None = None
    on_save: Callable | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None and not callable(getattr(self, f.name)):
                raise OptionError(f"{f.name}={getattr(self, f.name)!r}: must be a function (called with the trainer)")

    @classmethod
    def take(cls, options: dict) -> Callbacks:
        """The callbacks among keyword `options`, removed from them."""
        return cls(**{name: options.pop(name) for name in NAMES if name in options})

    def call(self, name: str, *args) -> None:
        hook = getattr(self, name)
        if hook is not None:
            hook(*args)


__all__ = ["NAMES", "Callbacks"]

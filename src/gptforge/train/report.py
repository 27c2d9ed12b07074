"""What a finished run tells its user beyond the loss: how much the model copies its training text
(--memorization), and when an earlier evaluation beat the final model. `trainer` is the Trainer."""

from __future__ import annotations

from ..errors import GPTForgeError
from .tasks import LanguageModelling


def memorization_summary(trainer) -> None:
    """--memorization: how much of what the model writes copies its training text, in metrics.jsonl (and so in
    the model card) and a line here; a warning when it memorises."""
    if not (
        trainer.cfg.memorization
        and type(trainer.task) is LanguageModelling
        and trainer.tokenizer is not None
        and getattr(trainer.data, "val", None) is not None
        and len(trainer.data.val)
    ):
        return
    from ..memorization import run_summary

    try:
        report = run_summary(trainer.model, trainer.tokenizer, trainer.data, trainer.history)
    except (GPTForgeError, OSError, ImportError) as e:  # a report is a bonus: never fail a finished run for it
        trainer.log.message(f"memorization report skipped: {str(e).splitlines()[0]}")
        return
    copied, base = report.copied, report.baseline
    trainer.log.record(
        {
            "step": trainer.step,
            "memorization": {
                "copied": copied,
                "baseline": base,
                "samples": report.samples,
                "warning": report.warning,
            },
        }
    )
    trainer.log.message(
        f"memorization: {copied[16]:.1%} of sampled tokens lie in copies of 16+ training tokens "
        f"(validation text: {base[16]:.1%}); `gptforge eval {trainer.out} --memorization` for the full "
        "report" + (f"\nwarning: {report.warning}" if report.warning else "")
    )


def say_if_best_was_better(trainer, row: dict) -> None:
    """Tell the user when an earlier evaluation was more than 2% better than the final model: the run went
    on past its best, as a small model does that sees its training text many times and learns it by
    heart (the from-scratch defaults' Muon fits it sooner than AdamW did); best/ holds that model. Only
    where the periodic evaluations read every validation token, as the final one does."""
    best, final, higher = trainer.best_val, row[trainer.task.metric], trainer.task.higher_is_better
    whole = not trainer.cfg.eval_tokens or row.get("val_tokens", 0) <= trainer.cfg.eval_tokens
    if whole and trainer.best_step != trainer.step and (final < best * 0.98 if higher else final > best * 1.02):
        metric, which = (
            trainer.task.metric,
            "an earlier evaluation" if trainer.best_step is None else f"step {trainer.best_step}",
        )
        trainer.log.message(
            f"note: the model of {which} ({metric} {best:.4f}) is better on validation than "
            f"the final one ({metric} {final:.4f}); it is in {trainer.out / 'best'}. The run went on past "
            "its best: use that folder, or train for less time or with --dropout"
        )

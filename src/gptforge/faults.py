"""Faults of the machine that the user can fix, and stopping: one line for permission denied, disk full or
out of memory; SIGTERM handled as Ctrl-C; Ctrl-C for native code that never looks at signals."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

_left_running: list[threading.Thread] = []  # native work a Ctrl-C left behind (it may outlive its Python thread)


def describe_fault(e: BaseException) -> str | None:
    """One line for a fault the user can fix (see `fsio.describe_os_error`, and running out of memory on
    any device), or None when `e` is something else (a bug, which keeps its traceback)."""
    if isinstance(e, OSError):
        from .fsio import describe_os_error

        return describe_os_error(e)
    if "torch" not in sys.modules:  # no tensor was ever allocated
        return None
    from .runtime import out_of_memory

    if not out_of_memory(e):
        return None
    return (
        f"out of memory ({str(e).splitlines()[0][:160]}); lower --batch-size (raise --grad-accum to keep the "
        "tokens per step), lower --block-size, or pick a smaller model"
    )


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`) stop every stage as Ctrl-C does, with its clean-up; a handler already set stays."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


def run_interruptibly(work: Callable[[], object], stop: threading.Event) -> None:
    """Run `work` in a thread and wait for it, so that Ctrl-C stops the caller at once: the native BPE trainer
    never looks at signals. On Ctrl-C `stop` is set (the text stream ends) and the thread is left to finish."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the caller's thread
            failed.append(e)

    thread = threading.Thread(target=run, name="gptforge-tokenizer-training", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        _left_running.append(thread)
        raise
    if failed:
        raise failed[0]


def leave(code: int) -> int:
    """`code`, for a command to return, or the end of the process now when a Ctrl-C left native work behind:
    the tokenizers trainer reads its text on threads of its own, which Python's shutdown would stop inside
    native code ("FATAL: exception not rethrown", abort)."""
    if _left_running:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


__all__ = [
    "describe_fault",
    "leave",
    "on_stop_signals",
    "restore_signal_handlers",
    "run_interruptibly",
    "stop_on_sigterm",
]


def on_stop_signals(first: Callable[[], None], stopping: Callable[[], bool]) -> dict:
    """Ctrl-C and SIGTERM call `first` (finish the work in hand, save, return); one more while `stopping()`
    gives up at once (KeyboardInterrupt). Returns the handlers replaced, for `restore_signal_handlers`; outside
    the main thread, where handlers cannot be set, nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if stopping():
            raise KeyboardInterrupt
        first()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)

"""Ctrl-C for work done in native code that never looks at signals (the BPE trainer of `tokenizers`)."""
from __future__ import annotations

import threading
from typing import Callable


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
        raise
    if failed:
        raise failed[0]


__all__ = ["run_interruptibly"]

"""The errors gptforge raises for users: one base, one line each.

Everything derived from `GPTForgeError` is a problem with the user's input, options or files, and its
message says what is wrong and what to do; the `gptforge` command prints it as one line. Any other
exception is a bug and keeps its traceback. Each class also derives from the built-in error that
describes it, so `except ValueError` / `except FileNotFoundError` keep working.
"""

from __future__ import annotations


class GPTForgeError(Exception):
    """A problem with the user's input, options or files; the message names it and says what to do."""


class OptionError(GPTForgeError, ValueError):
    """An option value that cannot work (negative, out of range, conflicting)."""


class ConfigError(GPTForgeError, ValueError):
    """A model configuration that cannot describe a GPT-2 network."""


class TokenizerError(GPTForgeError, ValueError):
    """A tokenizer file that cannot be used, or options that cannot build one."""


class DataError(GPTForgeError, ValueError):
    """Input text or options that cannot be turned into a dataset."""


class NotFoundError(GPTForgeError, FileNotFoundError):
    """A file, folder or model the user named does not exist."""


class CheckpointError(GPTForgeError, RuntimeError):
    """A model folder or weights file that cannot be loaded."""


class RunFolderError(GPTForgeError, ValueError):
    """The output folder and the requested run do not fit together."""


class TrainingError(GPTForgeError, RuntimeError):
    """Training cannot go on (diverged, out of memory); the message says what to change."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GPTForgeError",
    "NotFoundError",
    "OptionError",
    "RunFolderError",
    "TokenizerError",
    "TrainingError",
]

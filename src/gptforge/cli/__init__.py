"""The `gptforge` command. Thin: it parses arguments and calls the library; each group of commands is a module
of this package (models, data, train, classify, reward, generate, serve), in the order of the pipeline."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..aliases import translate_argv, unknown_flag
from ..errors import GPTForgeError, OptionError
from ..faults import describe_fault, leave, stop_on_sigterm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Train GPT-2 language models on your own text.")
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each stage adds its own commands, in the order of the pipeline.
    from .classify import add_classify_commands
    from .data import add_data_commands
    from .generate import add_generate_commands
    from .models import add_convert_commands, add_model_commands
    from .reward import add_reward_commands
    from .serve import add_serve_command
    from .train import add_train_commands

    for add in (
        add_model_commands,
        add_data_commands,
        add_train_commands,
        add_classify_commands,
        add_reward_commands,
        add_generate_commands,
        add_convert_commands,
        add_serve_command,
    ):
        add(sub)
    return parser


def _take_late_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """`generate MODEL --chat "question"`: argparse fills a command's variadic positional (prompts, files) before
    the options and calls what follows them unrecognized; such words join it, anything else is an error."""
    own = getattr(args, "parser", None)
    variadic = [a for a in (own._actions if own else []) if not a.option_strings and a.nargs in ("*", "+")]
    cut = extra.index("--") if "--" in extra else len(extra)  # after `--` a word may start with "-"
    flag = next((w for w in extra[:cut] if w.startswith("-") and w != "-"), None)
    if flag is not None:  # one line: what to use instead, or the closest flag (not the whole usage)
        raise unknown_flag(own or parser, flag)
    if len(variadic) != 1:
        raise OptionError(f"unrecognized arguments: {' '.join(extra)} (see --help)")
    dest = variadic[0].dest
    setattr(args, dest, [*(getattr(args, dest) or []), *extra[:cut], *extra[cut + 1 :]])


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The parser of the (sub-)command `argv` names, and where its own arguments start."""
    p, i = parser, 0
    while True:
        subs = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subs is None or i >= len(argv) or argv[i] not in subs.choices:
            return p, i
        p, i = subs.choices[argv[i]], i + 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    own, start = _command_parser(parser, argv)
    if start:  # other tools' spellings (--output_dir, --num_train_epochs, --k) as gptforge's flags
        argv = argv[:start] + translate_argv(own, argv[start:])
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv[argv.index(args.command) + 1 :]  # the command's own arguments
    stop_on_sigterm()
    try:
        if extra:
            _take_late_positionals(parser, args, extra)
        if getattr(args, "config", None):
            from ..configfile import apply_config_file

            apply_config_file(args, args.parser, args.argv, args.config)
        return args.func(args)
    except GPTForgeError as e:  # a problem with the user's input: one line; anything else is a bug with its traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets the same bad input: say it once
            print(f"gptforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return leave(130)
    except BrokenPipeError:  # `gptforge info MODEL | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        return 141
    except (OSError, RuntimeError, MemoryError) as e:  # permission denied, disk full, out of memory: one line too
        if describe_fault(e) is None:
            raise
        print(f"gptforge {args.command}: error: {describe_fault(e)}", file=sys.stderr)
        return 2

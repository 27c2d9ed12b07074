"""`gptforge reward train|score`: reward models from the command line. Thin: it parses and calls
`train.reward.train_reward_model` and `reward.score`."""

from __future__ import annotations

import argparse
import json

REWARD_EXAMPLES = """examples:
  gptforge reward train prefs.jsonl --init sft_model --out rm --max-time 10m
  gptforge reward score rm "Tell me about cats:" " Cats purr and sleep." --json
"""


def cmd_reward_train(args: argparse.Namespace) -> int:
    from ..options import InstructOptions, TrainConfig
    from ..options.flags import option_values
    from ..train.reward import train_reward_model

    result = train_reward_model(
        args.inputs,
        init=args.init,
        eval_inputs=args.val_file,
        instruct=InstructOptions(chat_template=args.chat_template),
        **option_values(args, TrainConfig),
    )
    return 130 if result.interrupted else 0


def cmd_reward_score(args: argparse.Namespace) -> int:
    from ..checkpoint import resolve_model_path
    from ..classify import load_classifier
    from ..errors import OptionError
    from ..fsio import folder_of
    from ..reward import is_reward_model, score
    from ..runtime import resolve_device
    from ..tokenizer import load_tokenizer

    model = load_classifier(args.model, device=resolve_device(args.device))
    if not is_reward_model(model):
        raise OptionError(f"{args.model}: a classifier of {len(model.labels)} labels, not a reward model (one output)")
    tokenizer = load_tokenizer(folder_of(resolve_model_path(args.model)))
    value = score(model, tokenizer, [args.prompt], [args.answer])[0]
    print(json.dumps({"prompt": args.prompt, "answer": args.answer, "score": value}) if args.json else f"{value:.6f}")
    return 0


def add_reward_commands(sub) -> None:
    """`reward` and its two actions."""
    from ..options import TRAIN_GROUPS, TrainConfig
    from ..options.flags import add_dataclass_options

    p = sub.add_parser(
        "reward",
        help="reward models: train one on preference pairs, score answers with it",
        description="A GPT-2 body with a one-output head (transformers' GPT2ForSequenceClassification, "
        "num_labels=1), trained with trl's RewardTrainer's pairwise loss.",
    )
    rsub = p.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    t = rsub.add_parser(
        "train",
        help="train a reward model on preference pairs",
        epilog=REWARD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Pairs: JSON Lines of {"prompt", "chosen", "rejected"} (text, or message lists rendered '
        "with the chat template). --block-size is the longest sequence kept (default: the model's context).",
    )
    groups = {title: t.add_argument_group(title) for title in TRAIN_GROUPS}
    g = groups["data"]
    g.add_argument("inputs", nargs="+", help="JSON Lines files of preference pairs")
    g.add_argument("--val-file", action="append", help="validation pairs instead of a split (repeatable)")
    g.add_argument("--chat-template", help="a Jinja chat template file for message-list pairs (default: the model's)")
    groups["model"].add_argument("--init", required=True, help="the language-model folder or hub id to start from")
    add_dataclass_options(t, TrainConfig, groups)
    t.set_defaults(func=cmd_reward_train, parser=t)

    s = rsub.add_parser("score", help="the reward of an answer to a prompt")
    s.add_argument("model", help="reward-model folder (gptforge or transformers)")
    s.add_argument("prompt", help="the prompt")
    s.add_argument("answer", help="the answer, scored as the text prompt + answer")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    s.add_argument("--json", action="store_true", help="print prompt, answer and score as JSON")
    s.set_defaults(func=cmd_reward_score, parser=s)


__all__ = ["add_reward_commands"]

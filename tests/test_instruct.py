"""Instruction and chat data: chat templates as transformers renders them, answer-only labels, padded batches,
truncation, bad input, and instruction tuning end to end (with LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, Conversation, load_template_file
from gptforge.data.examples import ExampleBatches, encode_example, is_example_file, pad_examples, read_examples
from gptforge.errors import DataError, GPTForgeError, NotFoundError, OptionError
from gptforge.options import InstructOptions, LoRAOptions

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Two plus two?"},
    {"role": "assistant", "content": "Four, I think."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sample_text):
    from gptforge.data.vocabulary import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    (folder / "corpus.txt").write_text(sample_text + "\n### User:\n### Assistant:\nHello. Four, I think. Be brief.\n")
    return train_tokenizer([folder / "corpus.txt"], vocab_size=320, out_dir=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    from gptforge.checkpoint import save_model
    from gptforge.config import GPTConfig
    from gptforge.model import GPT

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_model(
        GPT(
            GPTConfig(
                vocab_size=tokenizer.vocab_size,
                n_positions=64,
                n_embd=32,
                n_layer=2,
                n_head=4,
                bos_token_id=tokenizer.eos_id,
                eos_token_id=tokenizer.eos_id,
            )
        ),
        folder,
        tokenizer,
    )
    return folder


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_template_stored_in_tokenizer_config_gives_transformers_ids(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.meta["chat_template"] = DEFAULT_CHAT_TEMPLATE
    tokenizer.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer)
    ids, answer = encode_example({"messages": CHAT}, tokenizer, template, False, "x")
    assert ids == list(theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    prompt = theirs.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == template.render(CHAT[:2], add_generation_prompt=True)
        == "Be brief.\n\n### User:\nHi there!\n\n### Assistant:\n"
    )
    # the labelled tokens decode to exactly the two answers, each with its end-of-text token
    text = tokenizer.decode([i for i, a in zip(ids, answer) if a])
    assert text == "Hello.<|endoftext|>Four, I think.<|endoftext|>"


def test_prompt_completion_labels_and_train_on_prompt(tokenizer):
    record = {"prompt": "Question: two plus two?\nAnswer:", "completion": " four"}
    ids, answer = encode_example(record, tokenizer, None, False, "x")
    n_prompt = len(tokenizer.encode(record["prompt"]))
    assert ids[-1] == tokenizer.eos_id and not any(answer[:n_prompt]) and all(answer[n_prompt:])
    assert tokenizer.decode(ids[n_prompt:]) == " four<|endoftext|>"
    _, everything = encode_example(record, tokenizer, None, True, "x")
    assert all(everything)
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer)
    _, chat_all = encode_example({"messages": CHAT}, tokenizer, template, True, "x")
    assert all(chat_all)


def test_padded_batches_with_masks_and_answer_labels(tokenizer, tmp_path):
    rows = [{"prompt": "a" * (i + 1), "completion": " b" * (i + 1)} for i in range(7)]
    examples = read_examples([_jsonl(tmp_path / "d.jsonl", rows)], tokenizer, max_tokens=65)
    x, y, mask = pad_examples(examples.ids[:3], examples.answer[:3], pad_id=tokenizer.pad_id)
    assert x.shape == y.shape == mask.shape and x.shape[1] == max(len(i) for i in examples.ids[:3]) - 1
    for row in range(3):
        n = len(examples.ids[row]) - 1
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (x[row, n:] == tokenizer.pad_id).all() and (y[row, n:] == -100).all()
        want = np.where(examples.answer[row][1:], examples.ids[row][1:], -100)
        assert y[row, :n].tolist() == want.tolist()
    batches = ExampleBatches(examples, 3, tokenizer.pad_id, seed=4)
    assert all(
        torch.equal(a, b)
        for a, b in zip(batches.batch(5), ExampleBatches(examples, 3, tokenizer.pad_id, seed=4).batch(5))
    )
    # two ranks of batch 3 see what one process of batch 6 sees, without overlap
    one = ExampleBatches(examples, 6, tokenizer.pad_id, seed=4).indices(1)
    ranks = [ExampleBatches(examples, 3, tokenizer.pad_id, seed=4, rank=r, world_size=2).indices(1) for r in (0, 1)]
    assert np.concatenate(ranks).tolist() == one.tolist()


def test_long_examples_are_cut_and_counted_never_split(tokenizer, tmp_path):
    rows = [
        {"prompt": "Q ", "completion": "word " * 80},
        {"prompt": "long " * 90, "completion": "lost"},
        {"prompt": "Q ", "completion": "short"},
    ]
    examples = read_examples([_jsonl(tmp_path / "d.jsonl", rows)], tokenizer, max_tokens=33)
    assert len(examples) == 2 and examples.truncated == 2 and examples.dropped == 1
    assert max(len(i) for i in examples.ids) == 33  # one example, cut at the end: not two pieces


def test_bad_examples_and_templates(tokenizer, tmp_path):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokenizer)
    with pytest.raises(DataError, match=r"d.jsonl:2: messages\[1\] has the unknown role 'robot'"):
        read_examples(
            [
                _jsonl(
                    tmp_path / "d.jsonl",
                    [{"messages": CHAT}, {"messages": [CHAT[1], {"role": "robot", "content": "x"}]}],
                )
            ],
            tokenizer,
            65,
            template,
        )
    with pytest.raises(DataError, match=r"e.jsonl:1: missing field 'completion'"):
        read_examples([_jsonl(tmp_path / "e.jsonl", [{"prompt": "x"}])], tokenizer, 65, template)
    with pytest.raises(DataError, match=r"needs a 'role' and a 'content'"):
        read_examples([_jsonl(tmp_path / "f.jsonl", [{"messages": [{"role": "user"}]}])], tokenizer, 65, template)
    # a conversation without an assistant turn used to be "every example lost its answer when cut to 65 tokens"
    with pytest.raises(DataError, match=r"u.jsonl:2: no answer to train on \(no assistant message"):
        read_examples(
            [_jsonl(tmp_path / "u.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}])],
            tokenizer,
            65,
            template,
        )
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content + 5 }}{% endfor %}")
    failing = ChatTemplate(load_template_file(tmp_path / "t.jinja"), tokenizer, "--chat-template t.jinja")
    with pytest.raises(DataError, match="t.jinja failed to render"):
        encode_example({"messages": CHAT}, tokenizer, failing, False, "g.jsonl:1")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(GPTForgeError, match="bad.jinja: not a valid Jinja template"):
        load_template_file(tmp_path / "bad.jinja")
    with pytest.raises(NotFoundError, match="--chat-template"):
        load_template_file(tmp_path / "missing.jinja")


def test_example_files_are_recognised(tmp_path):
    assert is_example_file(_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}]))
    assert is_example_file(_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}]))
    assert not is_example_file(_jsonl(tmp_path / "c.jsonl", [{"text": "plain"}]))
    (tmp_path / "d.txt").write_text('{"prompt": "p", "completion": "c"}\n')
    assert not is_example_file(tmp_path / "d.txt")


def test_instruction_tuning_with_lora_end_to_end(base, tmp_path, capsys, one_thread):
    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.cli import main
    from gptforge.train.pipeline import run_training

    rows = [
        {"messages": [{"role": "user", "content": f"Number {i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(24)
    ] + [{"prompt": f"Say {i}: ", "completion": f"{i}!"} for i in range(8)]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    logs = []
    result = run_training(
        [data],
        init=str(base),
        out_dir=str(tmp_path / "bot"),
        lora=LoRAOptions(lora_r=2),
        max_steps=6,
        batch_size=4,
        eval_interval=3,
        plot=False,
        progress=False,
        log=logs.append,
    )
    assert any("instruction data: 29 training and 3 validation examples" in line for line in logs)
    assert result.val_loss is not None and result.validation["val_tokens"] > 0
    rows_logged = [json.loads(line) for line in (tmp_path / "bot" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows_logged)
    config = json.loads((tmp_path / "bot" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE  # generate --chat and transformers find it
    _, tok = load_model_and_tokenizer(tmp_path / "bot", device="cpu")
    assert Conversation(tok).ask("Hi") == "### User:\nHi\n\n### Assistant:\n"
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(tmp_path / "bot"),
                "Number 3?",
                "--chat",
                "--seed",
                "1",
                "--max-new-tokens",
                "5",
                "--greedy",
                "--no-stream",
            ]
        )
        == 0
    )
    assert "### User:" not in capsys.readouterr().out  # only the answer is printed


def test_instruction_options_are_checked_before_training(base, tmp_path):
    from gptforge.train.pipeline import run_training

    data = _jsonl(tmp_path / "chat.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
    (tmp_path / "plain.txt").write_text("plain text\n")
    with pytest.raises(OptionError, match="--init"):
        run_training([data], out_dir=str(tmp_path / "a"), max_steps=1)
    with pytest.raises(DataError, match="cannot be mixed"):
        run_training([data, str(tmp_path / "plain.txt")], init=str(base), out_dir=str(tmp_path / "b"), max_steps=1)
    with pytest.raises(OptionError, match="--chat-template"):
        run_training(
            [str(tmp_path / "plain.txt")],
            init=str(base),
            out_dir=str(tmp_path / "c"),
            max_steps=1,
            instruct=InstructOptions(chat_template="t.jinja"),
        )
    with pytest.raises(NotFoundError, match="--chat-template"):
        run_training(
            [data],
            init=str(base),
            out_dir=str(tmp_path / "d"),
            max_steps=1,
            instruct=InstructOptions(chat_template=str(tmp_path / "missing.jinja")),
        )
    assert not (tmp_path / "d" / "checkpoints").exists()

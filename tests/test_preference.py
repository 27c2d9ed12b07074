"""Preference tuning and reward models: pairs read and refused, DPO / ORPO / reward losses equal to trl's on the same
weights and batch, the reference kept for an exact resume, LoRA's reference without the adapter, the reward folder
in transformers and on the server's classification route."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptforge.chat import ChatTemplate, template_of
from gptforge.data.preferences import is_preference_file, read_pairs
from gptforge.errors import DataError, OptionError
from gptforge.options import PreferenceOptions

ROWS = [
    {"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " rain falls."},
    {"prompt": "rain", "chosen": " falls on the roof.", "rejected": " the cat sat."},
    {"prompt": "on the", "chosen": " mat.", "rejected": " roof of the cat sat on."},
    {"prompt": "the mat", "chosen": " is flat.", "rejected": " rain rain."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gptforge.data.vocabulary import train_tokenizer

    folder = tmp_path_factory.mktemp("ptok")
    (folder / "c.txt").write_text("the cat sat on the mat. rain falls on the roof. the mat is flat. " * 40)
    return train_tokenizer([folder / "c.txt"], vocab_size=300, out_dir=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    from gptforge.checkpoint import save_model
    from gptforge.config import GPTConfig
    from gptforge.model import GPT

    folder = tmp_path_factory.mktemp("pbase")
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
    )  # fmt: skip
    save_model(GPT(config), folder, tokenizer)
    return folder


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _template(tokenizer):
    return ChatTemplate(template_of(tokenizer), tokenizer)


# --- data ---------------------------------------------------------------------------------------------------


def test_pairs_share_the_prompt_and_label_only_the_answers(tokenizer, tmp_path):
    pairs = read_pairs([_jsonl(tmp_path / "p.jsonl", ROWS)], tokenizer, 65, _template(tokenizer))
    assert len(pairs) == 4 and is_preference_file(tmp_path / "p.jsonl")
    first = pairs.chosen[0].tolist()
    assert first == tokenizer.encode("the cat sat on the mat.") + [tokenizer.eos_id]
    assert first[: pairs.prompt[0]] == tokenizer.encode("the cat")[: pairs.prompt[0]]
    x, y, index = pairs.batch([0, 1], tokenizer.pad_id)
    assert x.shape[0] == 4 and index.tolist() == [0, 1]  # chosen rows, then rejected rows
    labelled = (y[0] != -100).nonzero()[:, 0]
    assert int(labelled[0]) == pairs.prompt[0] - 1  # the first label is the first answer token
    assert y[0, labelled].tolist() == first[pairs.prompt[0] :]


def test_message_pairs_use_the_chat_template(tokenizer, tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "the cat?"}],
        "chosen": [{"role": "assistant", "content": "sat on the mat."}],
        "rejected": [{"role": "assistant", "content": "rain falls."}],
    }
    implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    template = _template(tokenizer)
    a = read_pairs([_jsonl(tmp_path / "a.jsonl", [row, implicit])], tokenizer, 200, template)
    text = template.render(row["prompt"] + row["chosen"])
    assert a.chosen[0].tolist() == tokenizer.hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert a.chosen[1].tolist() == a.chosen[0].tolist() and a.prompt[1] == a.prompt[0]
    prompt = tokenizer.hf_tokenizer.encode(
        template.render(row["prompt"], add_generation_prompt=True), add_special_tokens=False
    ).ids
    assert a.prompt[0] <= len(prompt) and a.chosen[0].tolist()[: a.prompt[0]] == prompt[: a.prompt[0]]


@pytest.mark.parametrize(
    "row, words",
    [
        ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
        ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
        ({"prompt": "a", "chosen": "same", "rejected": "same"}, "same answer"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, "must be a string"),
        ({"prompt": "the cat " * 40, "chosen": " b", "rejected": " c"}, "leaves no room"),
    ],
)
def test_bad_pairs_are_refused_by_file_and_line(tokenizer, tmp_path, row, words):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=words) as e:
        read_pairs([path], tokenizer, 33, _template(tokenizer))
    assert f"{path}:2:" in str(e.value)


def test_preference_options_and_inputs_are_checked(tmp_path):
    from gptforge.train.preference import preference_inputs

    with pytest.raises(OptionError, match="--beta"):
        PreferenceOptions(preference="dpo", beta=0)
    with pytest.raises(OptionError, match="--preference"):
        PreferenceOptions(preference="ppo")
    pairs, text = _jsonl(tmp_path / "p.jsonl", ROWS), tmp_path / "t.txt"
    text.write_text("plain text\n")
    with pytest.raises(OptionError, match="--preference dpo"):
        preference_inputs([pairs], None, PreferenceOptions())
    with pytest.raises(DataError, match="t.txt"):
        preference_inputs([str(text)], None, PreferenceOptions(preference="dpo"))
    assert preference_inputs([pairs], None, PreferenceOptions(preference="orpo"))
    assert not preference_inputs([str(text)], None, PreferenceOptions())


# --- losses ----------------------------------------------------------------------------------------------


def test_dpo_loss_and_figures_follow_the_formula():
    from gptforge.train.preference import dpo_loss, orpo_loss

    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    loss, figs = dpo_loss(c, r, rc, rr, 0.5)
    margins = 0.5 * ((c - rc) - (r - rr))
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(margins).mean()), abs=1e-7)
    assert figs["rewards/accuracies"].item() == 0.5 and figs["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert figs["logps/chosen"].item() == -4.0
    loss, figs = orpo_loss(torch.tensor([-0.5]), torch.tensor([-2.0]), torch.tensor(0.5), 0.1)
    odds = np.log(np.exp(-0.5) / (1 - np.exp(-0.5))) - np.log(np.exp(-2.0) / (1 - np.exp(-2.0)))
    assert loss.item() == pytest.approx(0.5 + 0.1 * np.log1p(np.exp(-odds)), rel=1e-6)


def test_adapters_off_gives_the_base_model(base, tokenizer):
    from gptforge.adapters import apply_lora
    from gptforge.checkpoint import load_model
    from gptforge.train.preference import adapters_off, disable_dropout, sequence_logps

    model = load_model(base)
    disable_dropout(model)
    x = torch.tensor([tokenizer.encode("the cat sat on the mat.")])
    y = torch.cat([x[:, 1:], torch.tensor([[tokenizer.eos_id]])], 1)
    before = sequence_logps(model, x, y)[0]
    apply_lora(model, 4, 16.0, 0.0, ["c_attn", "c_fc"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that has learnt something
    assert not torch.allclose(sequence_logps(model, x, y)[0], before)
    with adapters_off(model):
        assert torch.equal(sequence_logps(model, x, y)[0], before)
    assert not torch.allclose(sequence_logps(model, x, y)[0], before)  # switched back on


# --- end to end -------------------------------------------------------------------------------------------


def _train(pairs, base, out, *extra, steps=6):
    from gptforge.cli import main

    return main(
        [
            "train", pairs, "--init", str(base), "--preference", "dpo", "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--log-interval", "2", "--eval-interval", "3", "--save-steps", "3", "--no-progress",
            "--no-plot", "--lr", "1e-3", "--schedule", "constant", "--warmup-steps", "0", *extra,
        ]
    )  # fmt: skip


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_run_logs_trl_figures_and_resumes_exactly(base, tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    from gptforge.train.preference import REFERENCE_FILE

    pairs = _jsonl(tmp_path / "p.jsonl", ROWS * 3)
    assert _train(pairs, base, tmp_path / "whole") == 0
    rows = _rows(tmp_path / "whole")
    train_rows = [r for r in rows if "loss" in r]
    assert all(k in train_rows[0] for k in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"))
    assert any("val_rewards/accuracies" in r for r in rows)
    assert (tmp_path / "whole" / REFERENCE_FILE).is_file() and (tmp_path / "whole" / "best").is_dir()
    # stopped at step 3, then resumed: the same weights as the run that never stopped
    assert _train(pairs, base, tmp_path / "cut", steps=3) == 0
    assert _train(pairs, base, tmp_path / "cut", "--resume", steps=6) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert _train(pairs, base, tmp_path / "cut", "--resume", "--beta", "0.5", steps=9) != 0
    assert "--beta 0.1 then, 0.5 now" in capsys.readouterr().err
    changed = _jsonl(tmp_path / "p2.jsonl", ROWS[::-1] * 3)
    assert _train(changed, base, tmp_path / "cut", "--resume", steps=9) != 0
    assert "training data changed" in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_with_lora_and_orpo_train(base, tmp_path, one_thread):
    pairs = _jsonl(tmp_path / "p.jsonl", ROWS * 3)
    assert _train(pairs, base, tmp_path / "lora", "--lora-r", "4") == 0
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert not (tmp_path / "lora" / "reference_logps.safetensors").exists()  # the base is the reference
    assert _train(pairs, base, tmp_path / "orpo", "--preference", "orpo") == 0
    assert "rewards/margins" in _rows(tmp_path / "orpo")[0]


@pytest.mark.slow
def test_reward_model_trains_scores_and_opens_in_transformers(base, tokenizer, tmp_path, one_thread, capsys):
    transformers = pytest.importorskip("transformers")
    from gptforge.cli import main

    pairs = _jsonl(tmp_path / "p.jsonl", ROWS * 3)
    out = tmp_path / "rm"
    args = ["reward", "train", pairs, "--init", str(base), "--out", str(out), "--max-steps", "4", "--batch-size", "2"]
    assert main([*args, "--no-progress", "--no-plot", "--eval-interval", "2"]) == 0
    assert any("val_accuracy" in r for r in _rows(out)) and any("margin" in r and "loss" in r for r in _rows(out))
    capsys.readouterr()
    assert main(["reward", "score", str(out), "the cat", " sat on the mat.", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["score"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat.") + [tokenizer.eos_id]])
    assert hf.config.num_labels == 1
    with torch.no_grad():
        assert float(hf(ids).logits[0, 0]) == pytest.approx(ours, abs=1e-5)


def test_server_route_gives_a_reward_models_score(base, tokenizer):
    pytest.importorskip("starlette")
    from gptforge.checkpoint import load_model
    from gptforge.classify import from_language_model
    from gptforge.options import ServeOptions
    from gptforge.reward import LABEL, score
    from gptforge.serve.classify import ClassifierServer

    model = from_language_model(load_model(base), [LABEL], tokenizer.pad_id).eval()
    server = ClassifierServer(model, tokenizer, ServeOptions())
    data, _ = server.classify(["the cat sat on the mat."])
    assert data[0]["label"] == LABEL
    assert data[0]["score"] == pytest.approx(score(model, tokenizer, ["the cat"], [" sat on the mat."])[0], abs=1e-6)
    assert "probs" not in data[0]


# --- parity with trl --------------------------------------------------------------------------------------


def _trl_batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _grads_equal(ours, theirs, tol):
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if name not in named:
            continue
        g = named[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            g = g.t()  # transformers' Conv1D keeps (in, out)
        assert (p.grad - g).abs().max().item() < tol, name


@pytest.mark.slow
def test_dpo_loss_and_gradient_equal_trls(base, tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from gptforge.checkpoint import load_model
    from gptforge.train.preference import disable_dropout, dpo_loss, pair_logps, sequence_logps

    policy = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():  # a policy that has moved away from its reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    policy.save_pretrained(tmp_path / "policy")
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    reference = transformers.AutoModelForCausalLM.from_pretrained(base)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], beta=0.1, use_cpu=True,
        bf16=False, max_length=64,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=transformers.AutoTokenizer.from_pretrained(base),
    )
    batch = _trl_batch(trainer, 4)
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    pairs = read_pairs([_jsonl(tmp_path / "p.jsonl", ROWS)], tokenizer, 65, _template(tokenizer))
    ref = pair_logps(load_model(base), pairs, 8, tokenizer.pad_id, "cpu")[0]
    ours_model = load_model(tmp_path / "policy").train()
    disable_dropout(ours_model)
    x, y, index = pairs.batch(range(4), tokenizer.pad_id)
    assert x[:, :1].tolist() == batch["input_ids"][:, :1].tolist()
    sums, _ = sequence_logps(ours_model, x, y)
    ours, figs = dpo_loss(*sums.chunk(2), ref[index, 0], ref[index, 1], 0.1)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for k in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(figs[k]) == pytest.approx(trainer._metrics["train"][k][-1], abs=1e-4)
    _grads_equal(ours_model, trainer.model, 1e-5)


@pytest.mark.slow
def test_reward_loss_equals_trls(base, tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from gptforge.checkpoint import load_model
    from gptforge.classify import from_language_model, load_classifier, pad_batch, save_classifier
    from gptforge.reward import LABEL
    from gptforge.train.preference import disable_dropout
    from gptforge.train.reward import reward_loss

    torch.manual_seed(3)
    save_classifier(from_language_model(load_model(base), [LABEL], tokenizer.pad_id), tmp_path / "rm", tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
        max_length=64,
    )  # fmt: skip
    trainer = trl.RewardTrainer(
        model=hf,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=transformers.AutoTokenizer.from_pretrained(tmp_path / "rm"),
    )
    batch = _trl_batch(trainer, 4)
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    ours_model = load_classifier(tmp_path / "rm").train()
    disable_dropout(ours_model)  # as trl's RewardTrainer has it by default
    pairs = read_pairs([_jsonl(tmp_path / "p.jsonl", ROWS)], tokenizer, 64, _template(tokenizer))
    ids = pad_batch(pairs.sequences(range(4))[0], tokenizer.pad_id)[0]
    assert ids.tolist() == batch["input_ids"].tolist()  # the same sequences as trl tokenizes
    ours, _ = reward_loss(ours_model(ids)[:, 0])
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    _grads_equal(ours_model, trainer.model, 1e-5)


@pytest.mark.slow
def test_orpo_odds_ratio_term_equals_trls():
    orpo = pytest.importorskip("trl.experimental.orpo")
    from gptforge.train.preference import orpo_loss

    chosen, rejected = torch.tensor([-0.7, -1.9, -0.2]), torch.tensor([-1.1, -0.4, -3.0])
    trainer = orpo.ORPOTrainer.__new__(orpo.ORPOTrainer)  # the method reads beta and the device only
    trainer.beta = 0.25
    trainer.accelerator = type("A", (), {"device": torch.device("cpu")})()
    losses, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(chosen, rejected)
    nll = torch.tensor(1.5)
    ours, figs = orpo_loss(chosen, rejected, nll, 0.25)
    assert ours.item() == pytest.approx((nll - losses.mean()).item(), abs=1e-6)
    assert figs["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-7)


def test_loss_picture_shows_the_reward_figures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gptforge.train import logging as run_logging

    drawn = []
    monkeypatch.setattr(run_logging, "draw_rewards", lambda ax, history: drawn.append(len(history)))
    history = [
        {"step": 1, "loss": 0.7, "lr": 1e-4, "rewards/margins": 0.1, "rewards/accuracies": 0.5},
        {"step": 2, "val_loss": 0.6, "val_rewards/margins": 0.2, "val_rewards/accuracies": 1.0, "val_pairs": 4},
    ]
    run_logging.draw_loss(history, tmp_path / "loss.png")
    run_logging.draw_loss([{"step": 1, "loss": 0.7, "lr": 1e-4}], tmp_path / "lm.png")
    assert drawn == [2] and (tmp_path / "loss.png").is_file()

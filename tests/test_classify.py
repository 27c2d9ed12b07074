"""Text classification: transformers parity both ways, the pipeline, labelled inputs, metrics, training, bad input."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from conftest import LazyTransformers

from gptforge.checkpoint import load_model, save_model
from gptforge.classify import (
    classification_metrics,
    evaluate_classifier,
    from_language_model,
    load_classifier,
    predict,
    save_classifier,
)
from gptforge.cli import main
from gptforge.config import GPTConfig
from gptforge.data.labelled import read_labelled, stratified_split
from gptforge.errors import CheckpointError, DataError, OptionError, RunFolderError
from gptforge.model import GPT
from gptforge.options import ClassifyOptions
from gptforge.tokenizer import load_tokenizer
from gptforge.train.classification import LabelledBatches, random_span, train_classifier

transformers = LazyTransformers()
LABELS = ["sport", "food", "tech"]
WORDS = {
    "sport": "ball goal team match score win player coach league",
    "food": "bread cheese soup apple cook taste eat",
    "tech": "computer code bug server data chip network disk",
}


def padded(lengths, T, left: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids, mask = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(T - n, T) if left else slice(0, n)
        ids[i, cols], mask[i, cols] = torch.randint(1, 300, (n,), generator=g), 1
    return ids, mask


@pytest.fixture(scope="module")
def clf_dir(hf_gpt2_dir, tmp_path_factory):
    """A classifier with the body of the transformers LM `hf_gpt2_dir`, saved by gptforge (pad 0)."""
    torch.manual_seed(3)
    model = from_language_model(load_model(hf_gpt2_dir), LABELS, pad_token_id=0).eval()
    return save_classifier(model, tmp_path_factory.mktemp("clf"))


def test_folder_opens_in_transformers_with_the_same_logits_both_paddings(clf_dir):
    ours = load_classifier(clf_dir)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.pad_token_id == 0 and hf.config.num_labels == 3
    right, right_mask = padded([5, 17, 3, 11], 17, left=False)
    left, left_mask = padded([5, 17, 3, 11], 17, left=True)
    with torch.no_grad():
        ref = hf(input_ids=right, attention_mask=right_mask).logits
        torch.testing.assert_close(ours(right, right_mask), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(left, left_mask), ref, atol=1e-4, rtol=1e-4)  # left padding: same logits
        torch.testing.assert_close(ours(right), ref, atol=1e-4, rtol=1e-4)  # no mask: transformers' rule alone
        one = ours(right[1:2, :17])  # a row alone, unpadded
        torch.testing.assert_close(one, ref[1:2], atol=1e-4, rtol=1e-4)


def test_texts_and_labels_of_other_lengths_are_one_error(clf_dir, byte_tokenizer):
    with pytest.raises(
        DataError, match="2 texts but 1 labels; give one label per text"
    ):  # was torch's batch-size error
        evaluate_classifier(load_classifier(clf_dir), byte_tokenizer, ["a", "b"], [LABELS[0]])


@pytest.mark.parametrize("max_length", [0, -5, 1000])
def test_max_length_outside_the_context_is_one_error(clf_dir, byte_tokenizer, max_length):
    # -5 used to fail inside argmax, 1000 deep in the model, and 0 meant "the context" without a word
    with pytest.raises(
        OptionError, match=f"--max-length {max_length}: must be a number of tokens from 1 to the model's context"
    ):
        predict(load_classifier(clf_dir), byte_tokenizer, ["some text"], max_length=max_length)


def test_a_transformers_classifier_folder_loads_and_predicts_the_same(tmp_path):
    torch.manual_seed(5)
    config = transformers.GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=7,
        num_labels=4,
    )
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_classifier(tmp_path)
    assert ours.labels == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"] and ours.pad_token_id == 7
    ids, mask = padded([9, 4, 30], 30, left=False)
    ids[mask == 0] = 7
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
    save_classifier(ours, tmp_path / "again")  # and back: the same numbers in transformers
    again = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, ref)


def test_a_transformers_classifier_padding_with_an_id_outside_its_vocabulary_is_one_error(tmp_path):
    # GPT2Config's own eos_token_id (50256) in a small vocabulary and no pad_token_id: the usual small GPT-2
    # built in transformers; padding a batch with it used to end in an IndexError inside the embedding
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"pads with eos_token_id=50256, which is not a token of its 300; set \"pad_token_id\""
    ):
        load_classifier(tmp_path)


def test_a_transformers_classifier_of_two_default_labels_loads(tmp_path):
    # transformers writes no id2label for its default two labels; the folder used to be called a language model
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2, eos_token_id=0, pad_token_id=0
    )
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    assert load_classifier(tmp_path).labels == ["LABEL_0", "LABEL_1"]


def texts_and_labels(n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        words = WORDS[label].split() + ["the", "a", "and"]
        rows.append((" ".join(rng.choice(words, size=int(rng.integers(2, 12)))), label))
    return rows


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    """A tiny language-model folder with a BPE tokenizer (vocab 300) trained on the example texts."""
    from gptforge.data.vocabulary import train_tokenizer

    tok = train_tokenizer([], vocab_size=300, texts=[t for t, _ in texts_and_labels(90)] * 3, out_dir=None)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=300,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    return save_model(model, tmp_path_factory.mktemp("lm"), tok)


def test_pipeline_text_classification_with_batches(small_lm, tmp_path):
    tok = load_tokenizer(small_lm)
    torch.manual_seed(1)
    model = from_language_model(load_model(small_lm), LABELS, tok.pad_id).eval()
    save_classifier(model, tmp_path, tok)
    texts = [t for t, _ in texts_and_labels(7)] + [
        "ball",
        "a much longer text about the coach and the cheese and code " * 3,
    ]
    pipe = transformers.pipeline("text-classification", model=str(tmp_path), device="cpu")
    theirs = pipe(texts, batch_size=4, top_k=None, truncation=True)  # both keep the first 64 tokens
    ours = predict(load_classifier(tmp_path), tok, texts, batch_size=3)
    for mine, ref in zip(ours, theirs):
        for r in ref:
            assert mine["probs"][r["label"]] == pytest.approx(r["score"], abs=1e-4)
        assert mine["label"] == max(ref, key=lambda r: r["score"])["label"]


def test_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8) and m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_labelled_formats_read_alike(tmp_path):
    rows = [("first text", "b"), ("second, with a comma", "a"), ("third", "b")]
    (tmp_path / "d.csv").write_text("label,text\n" + "".join(f'{y},"{t}"\n' for t, y in rows))
    (tmp_path / "d.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "y": y}) + "\n" for t, y in rows))
    for t, y in rows:
        (tmp_path / "folder" / y).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / y / f"{t[:5]}.txt").write_text(t + "\n")
    by_name = read_labelled(tmp_path / "d.csv")
    by_index = read_labelled(tmp_path / "d.tsv", 0, 1, header=False)
    jsonl = read_labelled(tmp_path / "d.jsonl", "body", "y")
    folder = read_labelled(tmp_path / "folder")
    for d in (by_name, by_index, jsonl):
        assert list(zip(d.texts, d.labels)) == rows
    assert sorted(zip(folder.texts, folder.labels)) == sorted(rows)
    assert by_name.label_names() == ["a", "b"] and by_name.where[0].endswith("d.csv:2")


def test_stratified_split_keeps_every_label():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    val_labels = [labels[i] for i in val]
    assert val_labels.count("a") == 10 and val_labels.count("b") == 2 and val_labels.count("c") == 1
    assert "d" not in val_labels  # a label's only example stays in training
    assert stratified_split(labels, 0.2, seed=0) == (train, val)


def test_balanced_sampling_draws_classes_equally():
    seqs = [np.arange(1, 2 + i % 5) for i in range(100)]
    labels = np.array([0] * 90 + [1] * 10)
    plain = LabelledBatches(seqs, labels, 10, 0, seed=0)
    balanced = LabelledBatches(seqs, labels, 10, 0, seed=0, balanced=True)
    seen_plain = torch.cat([plain.batch(s)[1] for s in range(plain.steps_per_epoch)])
    assert sorted(seen_plain.tolist()) == sorted(labels.tolist())  # an epoch is every example once
    seen = torch.cat([balanced.batch(s)[1] for s in range(40)]).float().mean().item()
    assert 0.4 < seen < 0.6
    ids, y = plain.batch(3)
    assert torch.equal(ids, plain.batch(3)[0]) and ids.shape[0] == 10  # a pure function of the step


def test_crop_gives_spans_of_at_least_half_and_repeats_by_step():
    rng = np.random.default_rng(0)
    seq = np.arange(100, 140)
    spans = [random_span(seq, rng) for _ in range(200)]
    assert all(len(s) >= 20 and np.array_equal(s, np.arange(s[0], s[0] + len(s))) for s in spans)  # contiguous
    assert len({(s[0], len(s)) for s in spans}) > 50 and any(len(s) == 40 for s in spans)
    assert np.array_equal(random_span(seq[:8], rng), seq[:8])  # short texts stay whole
    seqs = [np.arange(1, 30 + i % 7) for i in range(64)]
    labels = np.arange(64) % 4
    whole = LabelledBatches(seqs, labels, 16, 0, seed=0)
    cropped = LabelledBatches(seqs, labels, 16, 0, seed=0, crop=0.5)
    ids, y = cropped.batch(1)
    assert torch.equal(y, whole.batch(1)[1])  # the same examples and labels, fewer of their tokens
    assert (ids != 0).sum() < (whole.batch(1)[0] != 0).sum()
    assert torch.equal(ids, cropped.batch(1)[0])  # a pure function of the step: resume repeats it
    with pytest.raises(OptionError, match="--crop"):
        ClassifyOptions(crop=1.5)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def quick(tmp_path, **kw):
    return dict(
        out_dir=str(tmp_path / "run"),
        batch_size=8,
        eval_interval=4,
        progress=False,
        plot=False,
        learning_rate=3e-3,
        save_minutes=None,
        log=lambda m: None,
        **kw,
    )


def test_train_resume_eval_and_predict(small_lm, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", texts_and_labels(60))
    stop = lambda trainer: trainer.step == 3 and os.kill(os.getpid(), signal.SIGINT)  # noqa: E731 - Ctrl-C at step 3
    first = train_classifier(
        data, init=str(small_lm), on_step=stop, **quick(tmp_path, max_steps=8, freeze="embeddings")
    )
    assert first.interrupted and first.step in (3, 4)
    result = train_classifier(
        data, init=str(small_lm), **quick(tmp_path, max_steps=8, freeze="embeddings", resume=True)
    )
    assert result.step == 8 and 0 <= result.validation["val_macro_f1"] <= 1
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_macro_f1" in r for r in rows) and any("loss" in r for r in rows)
    report = json.loads((run / "val_metrics.json").read_text())
    assert set(report["per_class"]) == set(LABELS) and len(report["confusion"]) == 3
    assert json.loads((run / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    assert (run / "best" / "model.safetensors").is_file()
    test = write_jsonl(tmp_path / "test.jsonl", texts_and_labels(12, seed=1))
    assert main(["classify", "eval", str(run), str(test), "--json"]) == 0
    assert main(["classify", "predict", str(run), "ball goal", "cheese", "--json"]) == 0


def test_resume_refuses_other_classification_options(small_lm, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", texts_and_labels(40))
    began = ClassifyOptions(balance="weights", crop=0.5)
    stop = lambda trainer: trainer.step == 2 and os.kill(os.getpid(), signal.SIGINT)  # noqa: E731 - Ctrl-C at step 2
    assert train_classifier(
        data, init=str(small_lm), options=began, on_step=stop, **quick(tmp_path, max_steps=6)
    ).interrupted
    with pytest.raises(RunFolderError, match=r"--balance weights then, none now; --crop 0.5 then, 0.0 now"):
        train_classifier(data, init=str(small_lm), **quick(tmp_path, max_steps=6, resume=True))
    result = train_classifier(data, init=str(small_lm), options=began, **quick(tmp_path, max_steps=6, resume=True))
    assert result.step == 6 and not result.interrupted


def test_class_weights_lm_loss_and_left_truncation(small_lm, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", texts_and_labels(30))
    options = ClassifyOptions(balance="weights", truncate="left", lm_weight=0.5, dropout=0.2, crop=0.5)
    said, crops = [], []
    result = train_classifier(
        data,
        init=str(small_lm),
        options=options,
        on_step=lambda t: crops.append(t.batches.crop),
        **{**quick(tmp_path, max_steps=2, block_size=4), "log": said.append},
    )
    assert result.step == 2 and crops == [0.5, 0.5]
    tok = load_tokenizer(small_lm)
    lengths = {t: len(tok.encode(t)) for t, _ in texts_and_labels(30)}
    (line,) = [m for m in said if "longer than the context (4 tokens)" in m]  # the training texts, told once
    cut, total = map(int, re.match(r"(\d+) of (\d+) training texts", line).groups())
    assert 0 < cut <= total < 30 and cut >= sum(n > 4 for n in lengths.values()) - (30 - total)
    assert "cut to their end" in line
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resid_pdrop"] == 0.2
    model = from_language_model(load_model(small_lm), LABELS, 0)
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    logits, lm = model(ids, lm_loss=True)
    with torch.no_grad():
        full = model.lm_head(model.hidden(ids))
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].flatten(0, 1), torch.tensor([6, 7, -100, -100, 9, -100, -100, -100])
    )
    torch.testing.assert_close(lm, ref)
    torch.testing.assert_close(logits, model(ids))


def test_bad_inputs_name_the_row_or_option(small_lm, clf_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:2: no label"):
        read_labelled(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\nfine,x\nno label here,\n")
    with pytest.raises(DataError, match=r"empty.csv:3: no label"):
        read_labelled(empty)
    with pytest.raises(DataError, match="no column 'label_'.*--label-field"):
        read_labelled(empty, "text", "label_")
    with pytest.raises(OptionError, match="--stride: only for language modelling"):
        train_classifier(empty, init=str(small_lm), **quick(tmp_path, max_steps=1, stride=4))
    one = write_jsonl(tmp_path / "one.jsonl", [("a", "x"), ("b", "x")])
    with pytest.raises(DataError, match="only the class 'x'"):
        train_classifier(one, init=str(small_lm), **quick(tmp_path, max_steps=1))
    blank = write_jsonl(tmp_path / "blank.jsonl", [("fine", "x"), ("", "y"), ("ok", "y")])
    with pytest.raises(DataError, match=r"blank.jsonl:2: the text is empty after tokenization"):
        train_classifier(blank, init=str(small_lm), **quick(tmp_path, max_steps=1))
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [("ball", "sport"), ("x", "politics")])
    assert main(["classify", "eval", str(clf_dir), str(unseen), "--tokenizer", str(small_lm)]) == 2
    assert "unseen.jsonl:2: label 'politics' was never seen in training" in capsys.readouterr().err
    assert main(["classify", "predict", str(small_lm), "some text"]) == 2
    err = capsys.readouterr().err
    assert "a language-model folder, not a classifier" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="language-model folder"):
        load_classifier(small_lm)
    with pytest.raises(OptionError, match="--truncate 'middle'"):
        predict(load_classifier(clf_dir), load_tokenizer(small_lm), ["x"], truncate="middle")


def test_evaluate_refuses_unseen_labels(clf_dir, small_lm):
    with pytest.raises(DataError, match="label 'other' was never seen"):
        evaluate_classifier(load_classifier(clf_dir), load_tokenizer(small_lm), ["x"], ["other"])


def test_lora_trains_the_head_saves_merged_and_resumes(small_lm, tmp_path):
    from gptforge.options import LoRAOptions

    data = write_jsonl(tmp_path / "train.jsonl", texts_and_labels(40))
    lora = LoRAOptions(lora_r=4, lora_dropout=0.0)
    stop = lambda trainer: trainer.step == 2 and os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    first = train_classifier(data, init=str(small_lm), lora=lora, on_step=stop, **quick(tmp_path, max_steps=5))
    assert first.interrupted
    result = train_classifier(data, init=str(small_lm), lora=lora, **quick(tmp_path, max_steps=5, resume=True))
    assert result.step == 5
    run = tmp_path / "run"
    model, base = load_classifier(run), load_model(small_lm)  # a plain classifier folder: adapters merged in
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(
        model.transformer.wte.weight, base.transformer.wte.weight
    )  # the base outside the adapters: frozen
    with pytest.raises(OptionError, match="--lora-r"):
        train_classifier(data, init="tiny", lora=lora, **quick(tmp_path / "x", max_steps=1))


def test_from_scratch_trains_a_tokenizer_and_resumes_with_it(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", texts_and_labels(30))
    first = train_classifier(data, init="tiny", vocab_size=300, **quick(tmp_path, max_steps=2, block_size=16))
    assert first.step == 2 and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    again = train_classifier(
        data, init="tiny", vocab_size=300, **quick(tmp_path, max_steps=3, block_size=16, resume=True)
    )
    assert again.step == 3 and load_classifier(tmp_path / "run").config.vocab_size == 300

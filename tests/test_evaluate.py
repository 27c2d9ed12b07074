"""Evaluation: sliding-window perplexity equals a transformers-based computation of the same method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LazyTransformers

from gptforge.evaluate import evaluate_text, evaluate_tokens, sliding_windows

transformers = LazyTransformers()  # tests that use it skip one by one without it


def hf_sliding_nll(hf, ids: torch.Tensor, block: int, stride: int) -> tuple[float, int]:
    """The method of transformers' perplexity guide on GPT2LMHeadModel: a window every `stride` tokens with
    up to `block` inputs, each label the next token, labels already scored set to -100."""
    nll, count, scored_until, n = 0.0, 0, 0, len(ids)
    for begin in range(0, n, stride):
        end = min(begin + block + 1, n)
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : max(scored_until, begin + 1) - begin] = -100  # the first token of a window is never a label
        with torch.no_grad():
            logits = hf(x[:, :-1]).logits
        nll += F.cross_entropy(logits[0], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count, scored_until = count + int((labels[:, 1:] != -100).sum()), end
        if end == n:
            break
    return nll, count


@pytest.mark.parametrize("block, stride", [(64, None), (64, 16), (32, 7), (10, 10), (17, 3)])
def test_equals_transformers_sliding_window(models, block, stride):
    ours, hf = models
    ids = torch.randint(0, 300, (301,), generator=torch.Generator().manual_seed(block))
    nll, count = hf_sliding_nll(hf, ids, block, stride or block)
    r = evaluate_tokens(ours, ids, block_size=block, stride=stride, batch_size=3)
    assert r.tokens == count == len(ids) - 1
    assert r.loss == pytest.approx(nll / count, rel=1e-4)
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert r.bits_per_byte is None


def test_default_is_non_overlapping_blocks_like_training(models):
    ours, _ = models
    ids = torch.randint(0, 300, (4 * 64 + 1,))
    x, y = ids[:-1].view(4, 64), ids[1:].view(4, 64)
    _, loss = ours(x, y)  # the training loss on consecutive blocks
    assert evaluate_tokens(ours, ids).loss == pytest.approx(loss.item(), rel=1e-5)


def test_smaller_stride_gives_more_context(models):
    ours, _ = models
    assert [w[2] for w in sliding_windows(100, 40, 10)] == [40, 10, 10, 10, 10, 10, 9]
    assert sum(w[2] for w in sliding_windows(1000, 64, 13)) == 999


def test_token_containers_agree(models, tmp_path):
    ours, _ = models
    arr = np.random.default_rng(0).integers(0, 300, 500).astype(np.uint16)
    path = tmp_path / "val.bin"
    arr.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    results = [
        evaluate_tokens(ours, t, block_size=48, stride=20).loss
        for t in (arr, mm, arr.tolist(), torch.from_numpy(arr.astype(np.int64)))
    ]
    assert max(results) - min(results) < 1e-9
    short = evaluate_tokens(ours, mm, block_size=48, max_tokens=101)
    assert short.tokens == 100
    assert short.loss == pytest.approx(evaluate_tokens(ours, arr[:101], block_size=48).loss, rel=1e-9)


def test_bits_per_byte_and_mode_restored(models):
    ours, _ = models
    ids = torch.randint(0, 300, (200,))
    ours.train()  # dropout 0.1 in this config: evaluation must switch it off and then restore training mode
    try:
        r = evaluate_tokens(ours, ids, bytes_count=333)
        assert ours.training
    finally:
        ours.eval()
    ref = evaluate_tokens(ours, ids)
    assert r.loss == pytest.approx(ref.loss, rel=1e-9)
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / math.log(2) / 333, rel=1e-9)


def test_evaluate_text_scores_each_text_after_eos(models, tmp_path, sample_text, byte_tokenizer):
    tok = byte_tokenizer
    ours, _ = models
    a, b = sample_text[:700], "short text, ünïcödé 🙂"
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    r = evaluate_text(ours, tok, [tmp_path / "a.txt", b], block_size=32, stride=16)
    ra = evaluate_tokens(ours, [0] + tok.encode(a), block_size=32, stride=16)
    rb = evaluate_tokens(ours, [0] + tok.encode(b), block_size=32, stride=16)
    assert r.tokens == ra.tokens + rb.tokens == len(a.encode()) + len(b.encode())
    nats = ra.loss * ra.tokens + rb.loss * rb.tokens
    assert r.loss == pytest.approx(nats / r.tokens, rel=1e-9)
    assert r.bits_per_byte == pytest.approx(nats / math.log(2) / (len(a.encode()) + len(b.encode())), rel=1e-9)
    # a string naming a file is read as that file
    assert evaluate_text(ours, tok, str(tmp_path / "a.txt"), block_size=32).loss == pytest.approx(
        evaluate_text(ours, tok, a, block_size=32).loss, rel=1e-9
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stride=100, block_size=64), "stride"),
        (dict(block_size=65), "block_size"),
        (dict(stride=0), "stride"),
    ],
)
def test_bad_window_options(models, kw, match):
    with pytest.raises(ValueError, match=match):
        evaluate_tokens(models[0], list(range(100)), **kw)


def test_bad_tokens(models):
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate_tokens(models[0], [1, 2, 300])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_tokens(models[0], [1])


def test_bad_files(models, tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for name, match in (("empty.txt", "empty"), ("bin.txt", "binary"), ("latin1.txt", "UTF-8")):
        with pytest.raises(ValueError, match=match):
            evaluate_text(models[0], tok, [tmp_path / name])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate_text(models[0], tok, [tmp_path / "missing.txt"])


def test_cli_eval_equals_the_api(models, hf_gpt2_dir, tmp_path, sample_text, capsys):
    import json

    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    from gptforge.cli import main
    from gptforge.tokenizer import load_tokenizer

    hf = Tokenizer(tok_models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        [sample_text],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(sample_text[:1200], encoding="utf-8")
    b.write_text(sample_text[1200:1600], encoding="utf-8")
    rc = main(
        [
            "eval",
            str(hf_gpt2_dir),
            str(a),
            str(b),
            "--tokenizer",
            str(tmp_path / "tokenizer.json"),
            "--block-size",
            "32",
            "--stride",
            "16",
            "--json",
            "--device",
            "cpu",
        ]
    )
    got = json.loads(capsys.readouterr().out)
    assert rc == 0
    ref = evaluate_text(models[0], load_tokenizer(tmp_path / "tokenizer.json"), [a, b], block_size=32, stride=16)
    assert got["total"]["loss"] == pytest.approx(ref.loss, rel=1e-6)
    assert got["total"]["tokens"] == ref.tokens == got[str(a)]["tokens"] + got[str(b)]["tokens"]
    assert got["total"]["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-6)
    rc = main(
        [
            "eval",
            str(hf_gpt2_dir),
            str(a),
            "--tokenizer",
            str(tmp_path / "tokenizer.json"),
            "--stride",
            "100",
            "--block-size",
            "32",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "stride=100" in err


def test_prepared_dataset_matches_its_tokens_and_training_bits_per_byte(
    models, hf_gpt2_dir, tmp_path, sample_text, capsys
):
    import json

    from gptforge.cli import main
    from gptforge.data import load_meta, load_split, prepare
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.evaluate import evaluate_prepared

    tok = train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text(sample_text * 3, encoding="utf-8")
    prepare([tmp_path / "corpus.txt"], tok, tmp_path / "data", val_fraction=0.2, shard_tokens=500)
    val = load_split(tmp_path / "data", "val")
    assert not isinstance(val, np.ndarray)  # several shards seen as one array
    meta = load_meta(tmp_path / "data")["val"]
    r = evaluate_prepared(models[0], tmp_path / "data", block_size=32)
    ref = evaluate_tokens(models[0], np.asarray(val), block_size=32)
    assert r.tokens == ref.tokens == len(val) - 1 and r.loss == pytest.approx(ref.loss, rel=1e-9)
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2) / (meta["bytes"] / meta["tokens"]), rel=1e-9)
    assert (
        main(["eval", str(hf_gpt2_dir), str(tmp_path / "data"), "--block-size", "32", "--json", "--device", "cpu"]) == 0
    )
    assert json.loads(capsys.readouterr().out)[str(tmp_path / "data")]["loss"] == pytest.approx(r.loss, rel=1e-6)

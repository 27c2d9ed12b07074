"""Datasets: readers, prepare (modes, split, shards, meta, reuse, workers), bad input, Batches, Prefetcher,
TokenDataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import gptforge.data.reading
import gptforge.data.shards  # noqa: F401  (data.shards, patched below)
from gptforge import data
from gptforge.data import (
    Batches,
    DataError,
    Prefetcher,
    ShardedTokens,
    TokenDataset,
    load_meta,
    load_split,
    prepare,
    token_dtype,
)
from gptforge.data.vocabulary import train_tokenizer
from gptforge.tokenizer import EOS


@pytest.fixture(scope="module")
def tok(tmp_path_factory, sample_text):
    path = tmp_path_factory.mktemp("tokcorpus") / "c.txt"
    path.write_text(sample_text, encoding="utf-8")
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([path], vocab_size=400, out_dir=out)


def docs_of(text: str) -> list[str]:
    """Blank-line blocks, the documents-mode definition, computed independently of data.py."""
    blocks, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def expected_stream(tok, docs: list[str]) -> list[int]:
    out = [tok.eos_id]
    for d in docs:
        out += tok.reference_encode_batch([d])[0] + [tok.eos_id]
    return out


def test_documents_mode_tokens_and_counts(tok, sample_text, tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(sample_text, encoding="utf-8")
    meta = prepare([src], tok, tmp_path / "ds", val_fraction=0.0)
    docs = docs_of(sample_text)
    train = load_split(tmp_path / "ds", "train")
    assert train.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert train.tolist() == expected_stream(tok, docs)
    assert meta["train"]["documents"] == len(docs)
    assert meta["train"]["bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["train"]["tokens"] == len(train)
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert meta["inputs"][0]["bytes"] == src.stat().st_size and len(load_split(tmp_path / "ds", "val")) == 0
    assert (tmp_path / "ds" / "tokenizer" / "tokenizer.json").is_file()


def test_line_by_line_mode(tok, tmp_path):
    src = tmp_path / "tweets.txt"
    lines = ["first tweet 🙂", "", "second one", "   ", "third 第三"]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare(src, tok, tmp_path / "ds", line_by_line=True, val_fraction=0.0)
    kept = [line for line in lines if line.strip()]
    assert load_split(tmp_path / "ds", "train").tolist() == expected_stream(tok, kept)
    assert meta["train"]["documents"] == 3


def test_split_is_seeded_by_document(tok, sample_text, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(sample_text, encoding="utf-8")
    a = prepare(src, tok, tmp_path / "a", seed=1)
    prepare(src, tok, tmp_path / "b", seed=1)
    prepare(src, tok, tmp_path / "c", seed=2)
    n = len(docs_of(sample_text))
    assert a["train"]["documents"] + a["val"]["documents"] == n and a["val"]["documents"] > 0
    assert a["val_split"] == "documents"
    assert np.array_equal(load_split(tmp_path / "a", "val"), load_split(tmp_path / "b", "val"))
    assert not np.array_equal(load_split(tmp_path / "a", "val"), load_split(tmp_path / "c", "val"))
    # every val document is a whole document of the input
    val_text = tok.decode(load_split(tmp_path / "a", "val"))
    assert all(d in docs_of(sample_text) for d in val_text.split(EOS) if d)


def test_explicit_val_file(tok, tmp_path):
    (tmp_path / "t.txt").write_text("train text one\n\ntrain text two\n")
    (tmp_path / "v.txt").write_text("held out\n")
    meta = prepare(tmp_path / "t.txt", tok, tmp_path / "ds", val_inputs=[tmp_path / "v.txt"])
    assert meta["train"]["documents"] == 2 and meta["val"]["documents"] == 1 and meta["val_split"] == "file"
    assert load_split(tmp_path / "ds", "val").tolist() == expected_stream(tok, ["held out"])


def test_single_document_val_is_the_tail(tok, tmp_path):
    text = "\n".join(f"line {i} of a book without blank lines" for i in range(200))
    (tmp_path / "book.txt").write_text(text)
    meta = prepare(tmp_path / "book.txt", tok, tmp_path / "ds", val_fraction=0.1)
    whole = expected_stream(tok, [text])
    train, val = load_split(tmp_path / "ds", "train"), load_split(tmp_path / "ds", "val")
    assert meta["val_split"] == "tail" and len(val) == int(len(whole) * 0.1)
    assert train.tolist() + val.tolist() == whole
    lengths = tok.token_byte_lengths()
    assert meta["val"]["bytes"] == int(lengths[val].sum()) and meta["train"]["bytes"] + meta["val"]["bytes"] == len(
        text.encode()
    )


def test_folder_glob_csv_tsv_jsonl(tok, tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha doc\n")
    (root / "sub" / "b.md").write_text("beta doc\n")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    (root / "sub" / "rows.csv").write_text('id,text\n1,"hello, csv"\n2,"multi\nline"\n')
    (root / "sub" / "rows.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "x": 1}\n')
    meta = prepare(root, tok, tmp_path / "ds", val_fraction=0.0, column="text")
    got = tok.decode(load_split(tmp_path / "ds", "train")).split(EOS)
    assert [g for g in got if g] == ["alpha doc", "beta doc", "hello, csv", "multi\nline", "json one", "json two"]
    assert len(meta["inputs"]) == 4
    # glob, csv column by index without header, tsv
    (tmp_path / "x.tsv").write_text("a\tfirst\nb\tsecond\n")
    prepare(str(tmp_path / "*.tsv"), tok, tmp_path / "ds2", val_fraction=0.0, column=1, header=False)
    assert tok.decode(load_split(tmp_path / "ds2", "train")) == f"{EOS}first{EOS}second{EOS}"
    (tmp_path / "f.jsonl").write_text('{"body": "b"}\n')
    prepare(tmp_path / "f.jsonl", tok, tmp_path / "ds3", val_fraction=0.0, field="body")
    assert tok.decode(load_split(tmp_path / "ds3", "train")) == f"{EOS}b{EOS}"


def test_cleaning_options(tok, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("Cafe\u0301 page\n12\n\nsame doc\n\nsame doc\n\nbell\x07 here\n")
    prepare(
        src,
        tok,
        tmp_path / "ds",
        val_fraction=0.0,
        nfc=True,
        drop_control=True,
        remove=[r"^[ \t]*\d+[ \t]*(\n|$)"],
        dedupe=True,
    )
    docs = tok.decode(load_split(tmp_path / "ds", "train")).split(EOS)
    assert [d for d in docs if d] == ["Café page\n", "same doc", "bell here"]


def test_reuse_and_rebuild(tok, tmp_path, sample_text):
    src = tmp_path / "c.txt"
    src.write_text(sample_text)
    first = prepare(src, tok, tmp_path / "ds")
    assert not first["reused"]
    again = prepare(src, tok, tmp_path / "ds")
    assert again["reused"] and again["train"] == first["train"]
    src.write_text(sample_text + "\nnew paragraph\n")
    changed = prepare(src, tok, tmp_path / "ds")
    assert not changed["reused"] and changed["fingerprint"] != first["fingerprint"]
    other = train_tokenizer([src], vocab_size=300, out_dir=None)
    assert not prepare(src, other, tmp_path / "ds")["reused"]
    assert load_meta(tmp_path / "ds")["tokenizer"]["fingerprint"] == other.fingerprint
    assert not prepare(src, other, tmp_path / "ds", force=True)["reused"]


def test_workers_and_shards_match_single_process(tok, sample_text, tmp_path, monkeypatch):
    """Several worker processes, small jobs and tiny shards must give exactly the single-process stream."""
    src = tmp_path / "c.txt"
    src.write_text(sample_text * 4)
    prepare(src, tok, tmp_path / "one", workers=1, seed=3, dedupe=True)
    monkeypatch.setattr(data.reading, "JOB_CHARS", 2000)
    monkeypatch.setattr(data.shards, "JOB_CHARS", 2000)
    meta = prepare(src, tok, tmp_path / "two", workers=2, seed=3, shard_tokens=1000, dedupe=True)
    for split in ("train", "val"):
        a, b = load_split(tmp_path / "one", split), load_split(tmp_path / "two", split)
        assert np.asarray(a).tolist() == np.asarray(b).tolist()
    assert len(meta["train"]["shards"]) > 2 and meta["workers"] == 2
    sharded = load_split(tmp_path / "two", "train")
    assert isinstance(sharded, ShardedTokens)
    flat = np.asarray(sharded)
    assert np.array_equal(sharded[990:2010], flat[990:2010]) and sharded[1500] == flat[1500]
    assert meta["train"]["documents"] == len(set(docs_of(sample_text * 4))) - meta["val"]["documents"]


def test_long_document_cut_into_pieces_keeps_ids(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data.textfile, "MAX_PIECE_CHARS", 300)
    monkeypatch.setattr(data.textfile, "BLOCK_BYTES", 256)
    text = "\n".join(f"Line {i}: some words,  spaced\tout; 第{i}行" for i in range(120))
    text += "\r\n".join(f"  windows line {i}  " if i % 2 else f"crlf{i}" for i in range(60))
    (tmp_path / "long.txt").write_text(text)
    meta = prepare(tmp_path / "long.txt", tok, tmp_path / "ds", val_fraction=0.0)
    assert load_split(tmp_path / "ds", "train").tolist() == expected_stream(tok, [text])
    assert meta["train"]["documents"] == 1


def test_uint32_for_large_vocabularies():
    assert token_dtype(50257) == "uint16" and token_dtype(65535) == "uint16" and token_dtype(65536) == "uint32"


def assert_no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_input_errors(tok, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        prepare(tmp_path / "missing.txt", tok, out)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        prepare(tmp_path / "empty.txt", tok, out)
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(DataError, match="blank.txt: no text"):
        prepare(tmp_path / "blank.txt", tok, out)
    (tmp_path / "bin.txt").write_bytes(b"text\x00\x01\x02")
    with pytest.raises(DataError, match=r"bin.txt: NUL byte at byte 4.*binary"):
        prepare(tmp_path / "bin.txt", tok, out)
    (tmp_path / "latin1.txt").write_bytes("good line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: invalid UTF-8 at byte 13.*--encoding-errors replace"):
        prepare(tmp_path / "latin1.txt", tok, out)
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"c.csv: no column 'text'.*\['a', 'b'\]"):
        prepare(tmp_path / "c.csv", tok, out, column="text")
    with pytest.raises(DataError, match=r"c.csv: 2 columns"):
        prepare(tmp_path / "c.csv", tok, out)
    (tmp_path / "r.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"r.jsonl:2: not valid JSON"):
        prepare(tmp_path / "r.jsonl", tok, out)
    (tmp_path / "f.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"f.jsonl:1: no text field 'text'.*--field"):
        prepare(tmp_path / "f.jsonl", tok, out)
    with pytest.raises(DataError, match="--val-fraction"):
        prepare(tmp_path / "c.csv", tok, out, val_fraction=1.5)
    assert_no_output(out)


def test_invalid_utf8_offset_across_blocks_and_replace(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data.textfile, "BLOCK_BYTES", 7)
    raw = "ab\nédé\n".encode() + b"\xff" + b"zz\n"
    (tmp_path / "x.txt").write_bytes(raw)
    bad = raw.index(b"\xff")
    with pytest.raises(DataError, match=f"invalid UTF-8 at byte {bad}"):
        prepare(tmp_path / "x.txt", tok, tmp_path / "ds")
    prepare(tmp_path / "x.txt", tok, tmp_path / "ds", encoding_errors="replace", val_fraction=0.0)
    assert tok.decode(load_split(tmp_path / "ds", "train")) == f"{EOS}ab\nédé\n\ufffdzz{EOS}"


def test_never_overwrites_a_foreign_folder(tok, tmp_path):
    (tmp_path / "c.txt").write_text("some text\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(tmp_path / "c.txt", tok, mine)
    assert (mine / "notes.txt").read_text() == "precious"


def test_failed_rebuild_keeps_previous_dataset(tok, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("good text\n\nmore good text\n")
    prepare(src, tok, tmp_path / "ds")
    src.write_bytes(b"now binary \x00")
    with pytest.raises(DataError):
        prepare(src, tok, tmp_path / "ds")
    assert load_meta(tmp_path / "ds")["train"]["tokens"] > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_truncated_shard_is_detected(tok, tmp_path):
    (tmp_path / "c.txt").write_text("some text here\n")
    meta = prepare(tmp_path / "c.txt", tok, tmp_path / "ds", val_fraction=0.0)
    shard = tmp_path / "ds" / meta["train"]["shards"][0]["file"]
    os.truncate(shard, shard.stat().st_size - 2)
    with pytest.raises(DataError, match="missing or truncated"):
        load_split(tmp_path / "ds", "train")
    assert not prepare(tmp_path / "c.txt", tok, tmp_path / "ds", val_fraction=0.0)["reused"]


# --- batches ---


def test_random_batches_are_pure_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, block_size=16, batch_size=4, seed=5)
    x, y = b.batch(7)
    assert x.dtype == torch.int64 and x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(Batches(tokens, 16, 4, seed=5).batch(7)[0], x)  # fresh object, same step: same batch
    assert not torch.equal(b.batch(8)[0], x)
    assert not torch.equal(
        Batches(tokens, 16, 4, seed=5, rank=1, world_size=2).batch(7)[0],
        Batches(tokens, 16, 4, seed=5, rank=0, world_size=2).batch(7)[0],
    )
    assert int(torch.stack([b.batch(s)[1] for s in range(200)]).max()) == 999  # the last token is reachable


def test_sequential_epoch_covers_every_window_once_across_ranks():
    tokens = np.arange(1001, dtype=np.uint16)
    world = [Batches(tokens, 10, 3, mode="sequential", stride=5, seed=1, rank=r, world_size=2) for r in range(2)]
    spe = world[0].steps_per_epoch
    assert world[0].num_windows == (1001 - 11) // 5 + 1 and spe == world[0].num_windows // 6
    starts = np.concatenate([w.starts(s) for s in range(spe) for w in world])
    assert len(set(starts.tolist())) == len(starts) == spe * 6
    assert set(starts.tolist()) <= set(range(0, 1001 - 10, 5))
    # the next epoch is another order of the same windows; resuming at any step gives the same batch
    assert not np.array_equal(world[0].starts(spe), world[0].starts(0))
    fresh = Batches(tokens, 10, 3, mode="sequential", stride=5, seed=1, rank=1, world_size=2)
    assert torch.equal(fresh.batch(spe + 2)[0], world[1].batch(spe + 2)[0])
    ordered = Batches(tokens, 10, 2, mode="sequential", shuffle=False)
    assert ordered.starts(0).tolist() == [0, 10] and ordered.starts(1).tolist() == [20, 30]


def test_batches_errors():
    with pytest.raises(DataError, match=r"has 20 tokens.*--block-size 16"):
        Batches(np.arange(20), block_size=32, batch_size=1)
    with pytest.raises(DataError, match="lower --batch-size"):
        Batches(np.arange(50), block_size=10, batch_size=8, mode="sequential")
    with pytest.raises(DataError, match="mode="):
        Batches(np.arange(50), 4, 1, mode="shuffled")


def test_prefetcher_yields_the_same_batches():
    b = Batches(np.arange(500, dtype=np.uint16), 8, 2, seed=3)
    with Prefetcher(b, start_step=10, device="cpu", depth=2) as pf:
        got = [next(pf) for _ in range(5)]
    for i, (x, y) in enumerate(got):
        ex, ey = b.batch(10 + i)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert len(list(Prefetcher(b, 0, "cpu", stop_step=3))) == 3


def test_prefetcher_reports_errors():
    class Broken(Batches):
        def batch(self, step):
            raise RuntimeError("disk gone")

    pf = Prefetcher(Broken(np.arange(100), 4, 1), 0, "cpu")
    with pytest.raises(RuntimeError, match="disk gone"):
        next(pf)
    pf.close()


# --- TokenDataset ---


def test_token_dataset_like_older_tools(tok, sample_text, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(sample_text)
    tok.save(tmp_path / "tok")
    ds = TokenDataset(
        str(src),
        vocab_file=str(tmp_path / "tok" / "vocab.json"),
        merges_file=str(tmp_path / "tok" / "merges.txt"),
        block_size=32,
        cache_dir=tmp_path / "cache",
    )
    assert ds.block_size == 32 and ds.tokenizer.fingerprint == tok.fingerprint
    assert len(ds) == (len(ds.tokens) - 1) // 32
    assert ds[1].tolist() == np.asarray(ds.tokens[32:64]).tolist() and ds[0].dtype == torch.int64
    assert ds[-1].tolist() == ds[len(ds) - 1].tolist()  # as a list indexes (was an IndexError)
    with pytest.raises(IndexError):
        ds[len(ds)]
    for bad in (0, -4):  # was accepted, then len() divided by zero
        with pytest.raises(DataError, match=f"block_size={bad}: must be a number of tokens"):
            TokenDataset(data_dir=tmp_path / "nowhere", tokenizer=tok, block_size=bad)
    again = TokenDataset(
        str(src), tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"), block_size=32, cache_dir=tmp_path / "cache"
    )
    assert again.data_dir == ds.data_dir and again.meta["reused"]
    x, y = ds.batches(4, seed=0).batch(0)
    assert x.shape == (4, 32)
    lines = TokenDataset(str(src), tokenizer=tok, block_size=16, line_by_line=True, cache_dir=tmp_path / "cache")
    assert lines.data_dir != ds.data_dir and lines.meta["train"]["documents"] > ds.meta["train"]["documents"]
    reopened = TokenDataset(data_dir=ds.data_dir, block_size=32)
    assert np.array_equal(reopened.tokens, ds.tokens)
    with pytest.raises(DataError, match=r"fewer than one block.*--block-size"):
        TokenDataset(str(src), tokenizer=tok, block_size=10**6, cache_dir=tmp_path / "cache")


# --- CLI ---


def test_cli_tokenizer_train_and_prepare(sample_text, tmp_path, capsys):
    from gptforge.cli import main

    src = tmp_path / "c.txt"
    src.write_text(sample_text)
    assert main(["tokenizer", "train", str(src), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert main(["tokenizer", "train", str(src), "--out", str(tmp_path / "tok")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(["prepare", str(src), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    )
    assert "train:" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["train"]["tokens"] > 0
    assert (
        main(["prepare", str(src), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    )
    assert "reused" in capsys.readouterr().out
    assert (
        main(
            ["prepare", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.txt: no such file" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetcher_cuda_matches_cpu_batches():
    b = Batches(np.arange(5000, dtype=np.uint16), 64, 4, seed=1)
    with Prefetcher(b, start_step=3, device="cuda", depth=2) as pf:
        for step in range(3, 8):
            x, y = next(pf)
            assert x.is_cuda and y.is_cuda
            ex, ey = b.batch(step)
            assert torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey)


def test_iter_texts_applies_cleaning_and_dedupe(tmp_path):
    from gptforge.data import iter_texts

    (tmp_path / "a.txt").write_text("same\n\nsame\n\npage\n7\n")
    assert list(iter_texts(tmp_path / "a.txt")) == ["same", "same", "page\n7"]
    assert list(iter_texts(tmp_path / "a.txt", dedupe=True, remove=[r"^\d+$"])) == ["same", "page\n"]


def test_tail_split_across_shards(tok, tmp_path):
    text = "\n".join(f"row {i} without any blank line" for i in range(300))
    (tmp_path / "one.txt").write_text(text)
    meta = prepare(tmp_path / "one.txt", tok, tmp_path / "ds", val_fraction=0.25, shard_tokens=100)
    whole = expected_stream(tok, [text])
    train, val = load_split(tmp_path / "ds", "train"), load_split(tmp_path / "ds", "val")
    assert meta["val_split"] == "tail" and len(val) == int(len(whole) * 0.25) > 100
    assert np.asarray(train).tolist() + np.asarray(val).tolist() == whole
    assert sum(s["tokens"] for s in meta["train"]["shards"]) == meta["train"]["tokens"] == len(train)
    assert sorted(p.name for p in (tmp_path / "ds").glob("train_*.bin")) == [s["file"] for s in meta["train"]["shards"]]


@pytest.mark.parametrize(
    "text",
    [
        " ".join(f"word{i}, it's   (x) {i}" for i in range(150)),  # one line, no line breaks at all
        "".join(f"床前明月光{i}，疑是地上霜。举头望明月！" for i in range(150)),  # Chinese: no spaces, no line breaks
    ],
)
def test_enormous_line_is_cut_without_changing_ids(tok, tmp_path, monkeypatch, text):
    monkeypatch.setattr(data.textfile, "MAX_PIECE_CHARS", 300)
    monkeypatch.setattr(data.textfile, "BLOCK_BYTES", 256)
    (tmp_path / "line.txt").write_text(text)
    cuts = []
    real = data.reading._text_pieces

    def spy(path, opts):
        for texts, ends in real(path, opts):
            cuts.extend(e for e in ends if not e)
            yield texts, ends

    monkeypatch.setattr(data.reading, "_text_pieces", spy)
    meta = prepare(tmp_path / "line.txt", tok, tmp_path / "ds", val_fraction=0.0)
    assert load_split(tmp_path / "ds", "train").tolist() == expected_stream(tok, [text])
    assert meta["train"]["documents"] == 1 and len(cuts) > 5

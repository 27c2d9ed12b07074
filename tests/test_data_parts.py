"""A dataset prepared in parts (`prepare --part I/N`) is one dataset with the tokens of one `prepare` of the
whole; a finished part is skipped when the command runs again, and a part killed half-way is redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gptforge.data import load_meta, load_split, prepare
from gptforge.data.parts import split_inputs
from gptforge.data.vocabulary import train_tokenizer
from gptforge.errors import DataError, OptionError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_text):
    """Seven files of different sizes (blank-line documents), and a tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    paragraphs = sample_text.split("\n\n")
    files = []
    for k in range(7):
        path = root / "text" / f"f{k}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n\n".join(paragraphs[k * 5 : k * 5 + 2 + 3 * (k % 3)]) + "\n", encoding="utf-8")
        files.append(path)
    tok = train_tokenizer([str(root / "text")], vocab_size=300, out_dir=root / "tok")
    return root, files, tok


def tokens(folder, split: str) -> np.ndarray:
    return np.asarray(load_split(folder, split))


@pytest.mark.parametrize("count", [1, 3, 10])  # 10 parts of 7 files: some parts are empty
def test_parts_are_one_dataset_with_the_tokens_of_one_prepare(inputs, tmp_path, count):
    root, files, tok = inputs
    whole = prepare([str(root / "text")], tok, tmp_path / "whole", val_fraction=0.3)
    for i in reversed(range(1, count + 1)):  # in any order: the last one to finish joins them
        if i < count:
            with pytest.raises(DataError, match=f"{count - i} of {count} parts are prepared"):
                load_meta(tmp_path / "parts")
        prepare([str(root / "text")], tok, tmp_path / "parts", val_fraction=0.3, part=f"{i}/{count}")
    joined = load_meta(tmp_path / "parts")
    assert whole["val"]["tokens"] > 0 and whole["val_split"] == "documents"  # the draw sent documents to val
    for split in ("train", "val"):  # part 1's tokens, then part 2's, ...: the same stream as one prepare
        np.testing.assert_array_equal(tokens(tmp_path / "parts", split), tokens(tmp_path / "whole", split))
        assert joined[split]["documents"] == whole[split]["documents"]
        assert joined[split]["bytes"] == whole[split]["bytes"]
    assert (tmp_path / "parts" / "tokenizer").is_dir() and joined["val_split"] == whole["val_split"]


def test_the_tail_rule_applies_to_the_whole(inputs, tmp_path):
    # no blank lines: each file is one document, and with val fraction 0.05 none of seven draws val
    root, files, tok = inputs
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, f in enumerate(files):
        (flat / f.name).write_text(f.read_text().replace("\n\n", "\n"))
    whole = prepare([str(flat)], tok, tmp_path / "whole", val_fraction=0.05)
    assert whole["val_split"] == "tail"
    for i in (1, 2):
        prepare([str(flat)], tok, tmp_path / "parts", val_fraction=0.05, part=f"{i}/2")
    assert load_meta(tmp_path / "parts")["val_split"] == "tail"
    for split in ("train", "val"):
        np.testing.assert_array_equal(tokens(tmp_path / "parts", split), tokens(tmp_path / "whole", split))


def test_each_unit_lands_in_one_part_by_size(inputs):
    _, files, _ = inputs
    for count in (1, 2, 3, 7, 12):
        parts = [split_inputs(files, [], i, count, [])[0] for i in range(1, count + 1)]
        assert [f for p in parts for f in p] == files  # each file once, in order
    sizes = [f.stat().st_size for f in files]
    halves = [sum(f.stat().st_size for f in split_inputs(files, [], i, 2, [])[0]) for i in (1, 2)]
    assert abs(halves[0] - halves[1]) <= max(sizes)  # about equal bytes, not equal counts


def test_a_finished_part_is_skipped_and_parts_of_other_inputs_are_refused(inputs, tmp_path):
    root, files, tok = inputs
    first = prepare([str(root / "text")], tok, tmp_path / "parts", part="1/2")
    again = prepare([str(root / "text")], tok, tmp_path / "parts", part="1/2")
    assert not first["reused"] and again["reused"]
    with pytest.raises(DataError, match="parts were prepared from different inputs"):
        prepare([str(f) for f in files[:-1]], tok, tmp_path / "parts", part="2/2")
    with pytest.raises(OptionError, match="--part '3/2'"):
        prepare([str(root / "text")], tok, tmp_path / "parts", part="3/2")


@pytest.fixture
def big_file(tmp_path, sample_text, monkeypatch):
    """One text file of many blocks (blocks of 3,000 bytes here), with CRLF line ends and whitespace-only lines
    among the blank ones in one half."""
    from gptforge.data import parts

    monkeypatch.setattr(parts, "BLOCK_BYTES", 3000)
    crlf = sample_text.replace("\n\n", "\n  \n\t\n").replace("\n", "\r\n")
    path = tmp_path / "big.txt"
    path.write_bytes((sample_text + crlf).encode("utf-8"))
    return path


@pytest.mark.parametrize("line_by_line", [False, True])
def test_a_large_file_is_cut_where_documents_end(big_file, line_by_line):
    from gptforge.data import ReadOptions, iter_pieces
    from gptforge.data.parts import FileBlock, cut_large

    blocks = cut_large([big_file], line_by_line)
    assert len(blocks) > 5 and all(isinstance(b, FileBlock) for b in blocks)
    assert [(b.start, b.stop) for b in blocks] == list(
        zip([0] + [b.stop for b in blocks[:-1]], [b.stop for b in blocks])
    )
    opts = ReadOptions(line_by_line=line_by_line)
    whole = [t for texts, _ in iter_pieces([big_file], opts) for t in texts]
    pieces = [t for texts, _ in iter_pieces(blocks, opts) for t in texts]
    assert pieces == whole  # the same documents, in the same order


def test_parts_of_one_large_file_are_the_tokens_of_one_prepare(big_file, inputs, tmp_path):
    _, _, tok = inputs
    whole = prepare([str(big_file)], tok, tmp_path / "whole")
    for i in (1, 2, 3):
        part = prepare([str(big_file)], tok, tmp_path / "parts", part=f"{i}/3")
        assert part["train"]["tokens"] > 0  # the file is spread over the parts
    assert whole["val_split"] == "documents"
    for split in ("train", "val"):
        np.testing.assert_array_equal(tokens(tmp_path / "parts", split), tokens(tmp_path / "whole", split))


KILLED = textwrap.dedent("""
    import os, signal, sys
    import gptforge.data.shards as shards
    from gptforge.data import prepare

    route = shards._route

    def dies_half_way(results, *args):
        def some(results):
            for n, r in enumerate(results):
                if n == 1:  # the first job's tokens are written
                    os.kill(os.getpid(), signal.SIGKILL)
                yield r
        return route(some(results), *args)

    shards._route = dies_half_way
    text, tok, out = sys.argv[1:]
    prepare([text], tok, out, part="2/2")
""")


@pytest.mark.slow
def test_a_part_killed_half_way_is_redone_whole(tmp_path, sample_text):
    text = tmp_path / "text.txt"
    text.write_text(sample_text * (3 * 2**20 // len(sample_text) + 1), encoding="utf-8")  # several jobs of 1 MB
    (tmp_path / "a.txt").write_text(sample_text, encoding="utf-8")
    tok = train_tokenizer([str(tmp_path / "a.txt")], vocab_size=300, out_dir=tmp_path / "tok")
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    done = subprocess.run([sys.executable, str(script), str(text), str(tmp_path / "tok"), str(tmp_path / "parts")])
    assert done.returncode == -signal.SIGKILL
    left = [p.name for p in (tmp_path / "parts").iterdir()]
    assert left and not any(n.startswith("part-00002") for n in left)  # only a temporary folder
    meta = prepare([str(text)], tok, tmp_path / "parts", part="2/2")
    assert not meta["reused"] and [p.name for p in (tmp_path / "parts").iterdir()] == ["part-00002-of-00002"]
    prepare([str(text)], tok, tmp_path / "whole", part="2/2")
    np.testing.assert_array_equal(
        tokens(tmp_path / "parts" / "part-00002-of-00002", "train"),
        tokens(tmp_path / "whole" / "part-00002-of-00002", "train"),
    )


@pytest.mark.slow
def test_prepare_under_torchrun_writes_the_part_of_each_rank(inputs, tmp_path):
    root, _, _ = inputs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gptforge"]
    cmd += ["prepare", str(root / "text"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "d"), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["parts"] == ["part-00001-of-00002", "part-00002-of-00002"]
    whole = prepare([str(root / "text")], str(root / "tok"), tmp_path / "whole")
    assert meta["train"]["tokens"] == whole["train"]["tokens"]

"""The memorization report: the suffix-array index against brute force, copy shares on known copies, the report
of a real run folder (sources, cache, baseline, warning), and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pydivsufsort")

from gptforge.memorization import KS, SuffixIndex, copied_shares, overfit_warning  # noqa: E402


def _brute_longest(train: list[int], query: list[int]) -> int:
    best = 0
    for s in range(len(train)):
        n = 0
        while n < len(query) and s + n < len(train) and train[s + n] == query[n]:
            n += 1
        best = max(best, n)
    return best


@pytest.mark.parametrize("alphabet", [3, 50, 70_000])
def test_longest_match_equals_brute_force(alphabet):
    rng = np.random.default_rng(alphabet)
    train = rng.integers(0, alphabet, size=1500).astype(np.uint32 if alphabet > 65535 else np.uint16)
    index = SuffixIndex.build(train)
    queries = [
        train[100:300],
        rng.integers(0, alphabet, size=40),
        np.concatenate([train[7:90], [alphabet], train[900:1000]]),
    ]
    width = max(map(len, queries))
    rows, expected = [], []
    for q in queries:
        q = np.asarray(q, dtype=np.int64)
        for s in range(len(q)):
            row = np.full(width, -1)
            row[: len(q) - s] = q[s:]
            rows.append(row)
            expected.append(_brute_longest(train.tolist(), q[s:].tolist()))
    lengths, where = index.longest(np.stack(rows))
    assert lengths.tolist() == expected
    for n, at, row in zip(lengths, where, rows):  # and the position given holds that match
        assert np.array_equal(np.asarray(train[at : at + n], dtype=np.int64), row[:n])


def test_copy_shares_count_the_tokens_inside_copies():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 60_000, size=5000).astype(np.uint32)
    index = SuffixIndex.build(train)
    fresh = lambda n: rng.integers(60_000, 65_000, size=n)  # noqa: E731 -- tokens the training text never has
    window = np.concatenate([fresh(10), train[1000:1020], fresh(10), train[3000:3040]])  # copies of 20 and 40 tokens
    shares, longest = copied_shares([window], index)
    assert shares == {8: 60 / 80, 16: 60 / 80, 32: 40 / 80, 64: 0.0}
    assert longest == [(40, 0, 40, 3000)]
    assert copied_shares([fresh(50)], index)[0] == dict.fromkeys(KS, 0.0)


def test_the_warning_needs_copying_above_the_baseline_and_a_widening_gap():
    widening = [
        {"step": 10, "loss": 3.0},
        {"step": 10, "val_loss": 3.1},
        {"step": 90, "loss": 1.0},
        {"step": 90, "val_loss": 2.5},
    ]
    steady = [
        {"step": 10, "loss": 3.0},
        {"step": 10, "val_loss": 3.1},
        {"step": 90, "loss": 2.0},
        {"step": 90, "val_loss": 2.12},
    ]
    high, base = dict.fromkeys(KS, 0.6), dict.fromkeys(KS, 0.05)
    assert "best/" in overfit_warning(high, base, widening)
    assert overfit_warning(high, base, steady) is None
    assert overfit_warning(base, base, widening) is None  # copying like the validation text itself
    assert overfit_warning(high, dict.fromkeys(KS, 0.5), widening) is None  # text that repeats itself anyway


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, sample_text):
    """A run trained for a few steps on documents of which some repeat (the baseline sees those)."""
    from gptforge.train.pipeline import run_training

    root = tmp_path_factory.mktemp("memo")
    docs = [p.strip() for p in sample_text.split("\n") if p.strip()]
    text = "\n\n".join(docs * 3)
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    run_training(
        [str(root / "corpus.txt")],
        size="tiny",
        vocab_size=300,
        out_dir=str(root / "run"),
        max_steps=3,
        eval_interval=2,
        log=lambda *_: None,
        progress=False,
        plot=False,
        sample_interval=None,
    )
    return root / "run"


def test_a_run_folders_report_finds_its_copies_in_the_input_file(run_folder, monkeypatch):
    """With generation replaced by text cut from the training split, every generated token is a copy, the sources
    point at the lines of corpus.txt that hold it, and the index is cached and reused."""
    import gptforge.generate
    from gptforge.data.shards import load_split
    from gptforge.memorization import report
    from gptforge.options import MemorizationOptions

    train = np.asarray(load_split(run_folder / "data", "train")[:], dtype=np.int64)

    def copying(model, prompts, **kw):
        return [train[100 + 40 * i : 100 + 40 * i + 30].tolist() for i in range(len(prompts))]

    monkeypatch.setattr(gptforge.generate, "generate_ids", copying)
    opts = MemorizationOptions(mem_samples=6, mem_tokens=30, mem_prompt_tokens=8)
    result = report(run_folder, options=opts)
    assert result.samples == 6 and result.generated_tokens == 180
    assert result.copied[16] == 1.0 and result.copied[64] == 0.0
    assert 0 < result.baseline[8] < 1  # the repeated documents overlap; the rest does not
    corpus = (run_folder.parent / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for copy in result.longest:
        assert copy.tokens == 30
        path, line = copy.source.rsplit(":", 1)
        assert path.endswith("corpus.txt")
        first = max(copy.text.split("<|endoftext|>"), key=len).strip().splitlines()[0]
        assert first in corpus[int(line) - 1]
    cached = list((run_folder / "data").glob("suffix_array-*.npy"))
    assert len(cached) == 1
    monkeypatch.setattr("pydivsufsort.divsufsort", lambda *a: pytest.fail("the cached index was built again"))
    assert report(run_folder, options=opts).copied == result.copied


def test_cli_memorization_of_a_run_and_of_a_folder_with_train_data(run_folder, tmp_path, capsys):
    import shutil

    from gptforge.cli import main

    opts = ["--mem-samples", "4", "--mem-tokens", "12", "--mem-batch-size", "4"]
    assert main(["eval", str(run_folder), "--memorization", "--json", *opts]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["samples"] <= 4 and set(data["copied"]) == {str(k) for k in KS}
    model = tmp_path / "model"  # the model alone, as another tool would have it
    shutil.copytree(run_folder, model, ignore=shutil.ignore_patterns("data", "checkpoints", "best", "metrics.jsonl"))
    assert main(["eval", str(model), "--memorization", *opts]) == 2
    assert "--train-data" in capsys.readouterr().err
    assert main(["eval", str(model), "--memorization", "--train-data", str(run_folder / "data"), *opts]) == 0
    assert "validation text" in capsys.readouterr().out


def test_a_run_ends_with_a_short_report_that_the_model_card_quotes(run_folder, tmp_path):
    from gptforge.cli import main

    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    summary = [r["memorization"] for r in rows if "memorization" in r]
    assert len(summary) == 1 and set(summary[0]["copied"]) == {str(k) for k in KS}
    assert main(["export", str(run_folder), str(tmp_path / "shared")]) == 0
    card = (tmp_path / "shared" / "README.md").read_text()
    assert f"Copying: {summary[0]['copied']['16']:.1%} of sampled tokens" in card

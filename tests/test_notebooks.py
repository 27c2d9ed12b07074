"""The example notebooks run from top to bottom (with tiny settings put into their parameters cell)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORDS = "a small cat sat on the warm mat while the old dog slept by the door and birds sang".split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(150)) + "\n")
    return path


def _run(name: str, parameters: str, cwd: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="the notebooks run in a Python kernel (ipykernel)")
    pytest.importorskip("transformers")
    book = nbformat.read(EXAMPLES / name, as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
    nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return book


def _printed(book) -> str:
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_train_from_scratch_notebook(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    _run(
        "train_from_scratch.ipynb",
        f"TEXT_FILE = {str(corpus)!r}\nMAX_TIME = None\nMAX_STEPS = 4\nOUT = 'run'\n"
        "EXTRA = dict(size='tiny', vocab_size=300, block_size=32, batch_size=2, eval_interval=2, eval_tokens=64, "
        "sample_tokens=8, save_minutes=None, progress=False, model_overrides={'n_layer': 1})",
        tmp_path,
    )
    assert (tmp_path / "run-export" / "README.md").is_file() and not (tmp_path / "run-export" / "data").exists()


@pytest.mark.slow
def test_finetune_notebook(tmp_path):
    import torch

    from gptforge.checkpoint import save_model
    from gptforge.config import GPTConfig
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.model import GPT

    corpus = _corpus(tmp_path / "book.txt")
    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=None)
    torch.manual_seed(0)
    save_model(
        GPT(GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)),
        tmp_path / "base",
        tok,
    )
    book = _run(
        "finetune_gpt2.ipynb",
        f"BASE = {str(tmp_path / 'base')!r}\nTEXT_FILE = {str(corpus)!r}\nMAX_STEPS = 2\nBLOCK_SIZE = 16\n"
        "BATCH_SIZE = 2\nOUT = 'run'\nEXTRA = dict(eval_interval=0, sample_tokens=8, save_minutes=None, "
        "progress=False)",
        tmp_path,
    )
    assert (tmp_path / "run-export" / "README.md").read_text().count("fine-tuned from") == 1
    # perplexity before and after on the same held-out text (it used to be the whole file, then the validation split)
    assert re.search(r"before [\d.]+, after [\d.]+ \(the same [\d,]+ held-out tokens\)", _printed(book))

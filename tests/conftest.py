"""Shared fixtures: everything a test needs is made here, nothing is downloaded."""
from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A small random GPT2LMHeadModel saved by transformers (safetensors), vocab 300, context 64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(hf_gpt2_dir):
    """(gptforge model, transformers model) holding the weights of `hf_gpt2_dir`, both in eval mode."""
    transformers = pytest.importorskip("transformers")
    from gptforge.checkpoint import load_model

    return load_model(hf_gpt2_dir), transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()


class ByteTokenizer:
    """Bytes as tokens 1..256, eos 0 (the hf_gpt2_dir model's eos): enough of the tokenizer interface to test
    the text layer, and it splits multi-byte characters across tokens like byte-level BPE does."""

    eos_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core CPU: one thread is faster than two fighting over it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_text() -> str:
    """A few kilobytes of varied text: English prose, digits, Chinese, emoji, odd whitespace."""
    rng = random.Random(7)
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew "
             "strong coffee near old lighthouses and 42 recipes call for 3.5 cups of flour").split()
    lines = []
    for i in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + ".")
        if i % 9 == 0:
            lines.append("")  # blank line: a document boundary
        if i % 37 == 0:
            lines.append("床前明月光，疑是地上霜。举头望明月，低头思故乡。 🙂🚀  tabs\tand   spaces")
    return "\n".join(lines) + "\n"


class LazyTransformers:
    """`transformers`, imported by the first test that touches it: without the package those tests skip one
    by one and the rest of their module still runs."""

    def __getattr__(self, name):
        return getattr(pytest.importorskip("transformers"), name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_text):
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(sample_text * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus):
    """A prepared dataset (vocabulary 300) and its tokenizer, made the way users make them."""
    from gptforge.data import prepare
    from gptforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("dataset")
    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=root / "tok")
    prepare([str(corpus)], tok, root / "data")
    return root / "data", tok

"""Shared fixtures: everything a test needs is made here, nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

API_KEY = "test-key-123"  # the key the serve tests' servers are started with


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A small random GPT2LMHeadModel saved by transformers (safetensors), vocab 300, context 64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
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
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "brew",
        "strong",
        "coffee",
        "near",
        "old",
        "lighthouses",
        "and",
        "42",
        "recipes",
        "call",
        "for",
        "3.5",
        "cups",
        "of",
        "flour",
    ]
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
    from gptforge.data.vocabulary import train_tokenizer

    root = tmp_path_factory.mktemp("dataset")
    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=root / "tok")
    prepare([str(corpus)], tok, root / "data")
    return root / "data", tok


class RunningServer:
    """`python -m gptforge.serve FOLDER --port 0 FLAGS...` on loopback, up once /health answers; `popen` goes to
    subprocess.Popen (a preexec_fn, say). `log` collects what it prints after its first line."""

    def __init__(self, folder: Path, *flags: str, **popen):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("GPTFORGE_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptforge.serve", str(folder), "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            **popen,
        )
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stdout.read()}")
        self.url = line.split("http://")[1].split()[0]
        self.base = f"http://{self.url}"
        self.host, self.port = self.url.rsplit(":", 1)
        self.log: list[str] = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        deadline = time.time() + 60
        while time.time() < deadline:  # uvicorn is up once /health answers
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server never answered /health")

    def raw(self, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30):
        """One HTTP request on a fresh socket, exactly as written: (status, headers, body bytes)."""
        import http.client

        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get(self, path: str, key: str | None = None):
        status, headers, body = self.raw("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        return status, json.loads(body) if headers.get("content-type", "").startswith("application/json") else body

    def post(self, path: str, payload, key: str | None = API_KEY, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {}),
        }
        status, headers, data = self.raw("POST", path, body, h)
        return status, headers, json.loads(data)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()

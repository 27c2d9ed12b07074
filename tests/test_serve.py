"""`gptforge serve`: the continuous-batching engine in-process, then the real server as a user meets it.

The engine tests run in-process and fast. The server tests (marked slow) start `python -m gptforge.serve`
on a free loopback port with a tiny model made here, and talk to it with the official `openai` client,
with raw HTTP for the error cases, and with a headless Chromium for the playground.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import API_KEY, RunningServer

from gptforge.checkpoint import save_model
from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.generate import SamplingOptions, generate_ids
from gptforge.inference import fastdecode, native
from gptforge.model import GPT
from gptforge.serve.engine import Engine, Sequence

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tiny(sample_text):
    """(model, tokenizer): a random 2-layer GPT with a 300-token BPE trained on the sample text."""
    tok = train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=None)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=1024,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    return GPT(config).eval(), tok


def prompts_of(tok, n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, longest, (1,), generator=g))
        out.append(torch.randint(1, tok.vocab_size, (length,), generator=g).tolist())
    return out


class Collector:
    """Sequences for an in-process engine, and what it sent back for each."""

    def __init__(self):
        self.events: dict[int, list] = {}
        self.finished = threading.Semaphore(0)

    def seq(self, i: int, prompt: list[int], max_tokens: int, choice: int | None = None, **opts) -> Sequence:
        """Sequence `i` (its choice number, which picks its seed, is `i` unless given)."""
        self.events[i] = []
        stop = opts.pop("stop", [])

        def emit(ev):
            self.events[i].append(ev)
            if ev.finish:
                self.finished.release()

        return Sequence(
            prompt,
            SamplingOptions(max_new_tokens=max_tokens, **opts),
            emit,
            choice=i if choice is None else choice,
            stop=stop,
        )

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.finished.acquire(timeout=timeout), "the engine did not finish in time"

    def text(self, i: int) -> str:
        return "".join(e.text for e in self.events[i])


# --- the engine, in-process --------------------------------------------------------------------------


@pytest.mark.parametrize("c_step", [True, False])
def test_engine_greedy_equals_generate_ids_while_rows_join_and_leave(tiny, one_thread, monkeypatch, c_step):
    model, tok = tiny
    steps = []  # decoding steps in one C call (fastdecode.py); without it, every step through the model
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a: steps.append(1) or real(*a))
    if not c_step:
        monkeypatch.setattr(fastdecode, "applies", lambda model: False)
    small = GPT(GPTConfig(**{**model.config.__dict__, "n_positions": 64, "extra": {}}))  # a full context is reached
    small.load_state_dict({k: v[:64] if k.endswith("wpe.weight") else v for k, v in model.state_dict().items()})
    small.eval()
    engine = Engine(small, tok, max_batch=4, max_queue=32).start()
    try:
        c = Collector()
        prompts = prompts_of(tok, 12, longest=44)
        lengths = [int(x) for x in torch.randint(1, 20, (12,), generator=torch.Generator().manual_seed(1))]
        for i, (p, n) in enumerate(zip(prompts, lengths)):  # staggered: some join a running batch, some queue
            assert engine.submit([c.seq(i, p, n, do_sample=False)])
            time.sleep(0.002 * (i % 3))
        c.wait(len(prompts))
        in_c = len(steps)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            ref = generate_ids(small, p, max_new_tokens=n, do_sample=False, eos_id=tok.eos_id)[0]
            assert c.text(i) == tok.decode(ref), f"sequence {i} differs from generate_ids"
            assert c.events[i][-1].finish == ("length" if len(ref) == n else "stop")
            assert c.events[i][-1].completion_tokens == len(ref)
        stats = engine.stats()
        assert stats["running"] == stats["waiting"] == 0
        assert stats["peak_batch"] > 1  # they really were decoded together
        # the engine's steps ran in C (all but those of more rows than the C step takes), or none did
        assert (in_c > stats["steps"] // 2) if c_step and native.available() else not steps
    finally:
        engine.stop()


def test_engine_sampling_is_reproducible_with_a_seed_and_honours_stop(tiny, one_thread):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8).start()
    try:
        c = Collector()
        p = tok.encode("The quick brown fox")
        opts = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
        engine.submit(
            [
                c.seq(0, p, 25, **opts),
                c.seq(1, p, 25, choice=0, **opts),
                c.seq(2, p, 25, presence_penalty=0.5, frequency_penalty=1.0, seed=1),
                c.seq(3, p, 25, seed=8),
            ]
        )
        c.wait(4)
        assert c.text(0) == c.text(1) and c.events[0][-1].completion_tokens > 0
        full = c.text(0)
        stop = full[3:5]
        if stop.strip("\ufffd"):
            engine.submit([c.seq(4, p, 25, choice=0, stop=[stop], **opts)])
            c.wait(1)
            assert c.text(4) == full[: full.index(stop)]
            assert c.events[4][-1].finish == "stop"
    finally:
        engine.stop()


def test_engine_queue_limit_and_cancel(tiny, one_thread):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, max_queue=1).start()
    try:
        c = Collector()
        p = tok.encode("the")
        a, b = c.seq(0, p, 900, do_sample=False), c.seq(1, p, 900, do_sample=False)
        assert engine.submit([a]) and engine.submit([b])
        assert not engine.submit([c.seq(2, p, 5)])  # full: the server answers 429
        assert engine.retry_after() >= 1
        engine.cancel([a, b])
        deadline = time.time() + 10
        while engine.stats()["running"] + engine.stats()["waiting"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0
        assert engine.steps < 800  # freed long before it would have finished
        assert engine.stats()["cancelled"] == 2  # /health shows them
        assert engine.submit([c.seq(3, p, 3)])
        c.wait(1)
    finally:
        engine.stop()


def test_a_client_leaving_during_a_step_is_counted_as_cancelled(tiny, one_thread, monkeypatch):
    """A cancel that lands after a step's sweep of cancelled rows, before its tokens are handed out, still counts."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    c = Collector()
    a = c.seq(0, tok.encode("the"), 900, do_sample=False)
    real = engine._sample

    def sample(logits):
        if engine.steps == 3:
            a.cancelled = True  # what Engine.cancel does from the web side, here at the worst moment
        return real(logits)

    monkeypatch.setattr(engine, "_sample", sample)
    engine.start()
    try:
        assert engine.submit([a])
        deadline = time.time() + 10
        while (engine.steps < 3 or engine.stats()["running"] + engine.stats()["waiting"]) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0 and engine.steps < 800
        assert engine.stats()["cancelled"] == 1
    finally:
        engine.stop()


def test_serve_face_needs_no_torch():
    code = (
        "import sys, argparse, gptforge.serve as s; p = s.add_serve_arguments(argparse.ArgumentParser()); "
        "a = p.parse_args(['m']); assert a.host == '127.0.0.1' and a.port == 8000; "
        "assert 'torch' not in sys.modules and 'starlette' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_prompt(tiny) -> str:
    """A prompt whose greedy continuation runs 1000 tokens without <|endoftext|> (to hold a slot for a while)."""
    model, tok = tiny
    n = 1000
    for text in ("the", "the quick", "fox", "a lazy dog", "coffee", "seven", "old", "wizards"):
        if tok.eos_id not in generate_ids(model, tok.encode(text), max_new_tokens=n, do_sample=False, eos_id=None)[0]:
            return text
    pytest.skip("no test prompt avoids end-of-text for long enough with this model")


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    """A plain language-model folder and one with a chat template."""
    model, tok = tiny
    plain = save_model(model, tmp_path_factory.mktemp("serve") / "tiny-lm", tok)
    chat = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(plain, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return plain, chat


def test_a_server_built_in_python_takes_the_folders_chat_template(folders):
    # docs/serve.md's create_app(Server(model, tok, ServeOptions())) used to have chat off
    from gptforge.chat import DEFAULT_CHAT_TEMPLATE
    from gptforge.checkpoint import load_model_and_tokenizer
    from gptforge.serve import ServeOptions, Server

    plain, chat = folders
    assert Server(*load_model_and_tokenizer(chat), ServeOptions()).template.source == CHAT_TEMPLATE
    assert Server(*load_model_and_tokenizer(plain), ServeOptions()).template.source == DEFAULT_CHAT_TEMPLATE


def test_a_port_out_of_range_is_one_line(folders, capsys):
    from gptforge.cli import main

    assert main(["serve", str(folders[0]), "--port", "70000"]) == 2  # used to be an OverflowError traceback
    assert "--port 70000: must be an integer at least 0 and at most 65535" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_server(folders):
    s = RunningServer(folders[1], "--api-key", API_KEY, "--max-batch", "8", "--max-body", "65536")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(folders):
    """The plain model, one sequence at a time and no queue: for 429, disconnects and chat without a template."""
    s = RunningServer(folders[0], "--max-batch", "1", "--max-queue", "0")
    yield s
    s.stop()


@pytest.fixture
def client(chat_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=chat_server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.mark.slow
def test_openai_client_completions_plain_and_streaming(client, tiny):
    model, tok = tiny
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    r = client.completions.create(model="tiny-chat", prompt="The quick brown", max_tokens=12, temperature=0)
    ref = tok.decode(
        generate_ids(model, tok.encode("The quick brown"), max_new_tokens=12, do_sample=False, eos_id=tok.eos_id)[0]
    )
    assert r.choices[0].text == ref
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode("The quick brown"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.completions.create(
        model="tiny-chat",
        prompt="The quick brown",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    many = client.completions.create(model="tiny-chat", prompt=["one", "two"], n=2, max_tokens=4, seed=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


@pytest.mark.slow
def test_int8_server_answers_as_the_int8_model_generates(folders, tiny):
    from gptforge.inference.quantize import quantize_model

    model, tok = tiny
    q = quantize_model(model, "int8", inplace=False)
    server = RunningServer(folders[0], "--quantize", "int8")
    try:
        status, _, body = server.post(
            "/v1/completions", {"prompt": "The quick brown", "max_tokens": 10, "temperature": 0}
        )
    finally:
        server.stop()
    ref = tok.decode(
        generate_ids(q, tok.encode("The quick brown"), max_new_tokens=10, do_sample=False, eos_id=tok.eos_id)[0]
    )
    assert status == 200 and body["choices"][0]["text"] == ref


@pytest.mark.slow
def test_classifier_folder_answers_labels_and_probabilities(tiny, tmp_path):
    from gptforge.classify import from_language_model, predict, save_classifier

    model, tok = tiny
    torch.manual_seed(0)
    clf = from_language_model(model, ["ham", "spam"], tok.eos_id).eval()
    folder = save_classifier(clf, tmp_path / "clf", tok)
    texts = ["free money now", "see you at lunch"]
    server = RunningServer(folder)
    try:
        status, _, body = server.post("/v1/classifications", {"input": texts}, key=None)
        bad, _, error = server.post("/v1/classifications", {"input": 3}, key=None)
        chat, _, _ = server.post("/v1/completions", {"prompt": "hi"}, key=None)
    finally:
        server.stop()
    want = predict(clf, tok, texts)
    assert status == 200 and [d["label"] for d in body["data"]] == [w["label"] for w in want]
    for got, ref in zip(body["data"], want):
        assert got["probs"] == pytest.approx(ref["probs"], abs=1e-5)
    assert bad == 400 and error["error"]["param"] == "input"
    assert chat == 404  # a classifier has no generation routes


@pytest.mark.slow
def test_openai_client_chat_plain_and_streaming(client, tiny):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    text = "system: Be brief.\nuser: Hello there\nassistant:"
    ref = tok.decode(generate_ids(model, tok.encode(text), max_new_tokens=10, do_sample=False, eos_id=tok.eos_id)[0])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == len(tok.encode(text))
    chunks = list(
        client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_concurrent_requests_batch_together_and_equal_generate_ids(client, chat_server, tiny):
    model, tok = tiny
    texts = ["the", "The quick brown fox jumps over", "coffee near old lighthouses", "42 recipes", "a", "seven wizards"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.completions.create(model="tiny-chat", prompt=texts[i], max_tokens=30 + 5 * i, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, text in enumerate(texts):
        ref = generate_ids(model, tok.encode(text), max_new_tokens=30 + 5 * i, do_sample=False, eos_id=tok.eos_id)[0]
        assert results[i] == tok.decode(ref), f"request {i} differs from generate_ids"
    assert chat_server.get("/health")[1]["peak_batch"] > 1


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(chat_server):
    s = chat_server
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"[" * 20000 + b"]" * 20000, 400, "invalid_json"),  # deeper than the JSON parser recurses
        (b'{"prompt": "hi", "max_tokens": "ten"}', 400, "invalid_type"),
        (b'{"prompt": "hi", "temperature": "hot"}', 400, "invalid_type"),
        (b'{"prompt": 12}', 400, "invalid_type"),
        (b'{"prompt": "hi", "max_tokens": 100000}', 400, "invalid_value"),
        (b'{"prompt": "hi", "top_p": 0}', 400, "invalid_value"),
        (b'{"prompt": "hi", "n": 0}', 400, "invalid_value"),
        (b'{"prompt": "hi", "logprobs": 50}', 400, "invalid_value"),  # at most 20 alternatives
        (b'{"prompt": "hi", "suffix": "x"}', 400, "unsupported_parameter"),
        (b'{"prompt": "hi", "frobnicate": true}', 400, "unknown_parameter"),
        (b'{"prompt": "hi", "model": "gpt-4"}', 404, "model_not_found"),
        ('{"prompt": "caf\u00e9"}'.encode("latin-1"), 400, "invalid_encoding"),
        (b"\xff\xfe{}", 400, "invalid_encoding"),
    ]
    for body, status, code in cases:
        got, _, err = s.post("/v1/completions", body)
        assert (got, err["error"]["code"]) == (status, code), body
        assert err["error"]["message"] and "Traceback" not in err["error"]["message"]
    status, _, err = s.post("/v1/completions", b'{"prompt": "' + b"a" * 70000 + b'"}')
    assert status == 413 and err["error"]["code"] == "body_too_large"
    status, _, err = s.post("/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and err["error"]["param"] == "messages"
    status, _, err = s.post("/v1/completions", {"prompt": "hi", "top_p": 0})  # refused by the sampling options
    assert status == 400 and err["error"]["param"] == "top_p"
    status, _, err = s.post("/v1/nothing", {})
    assert status == 404 and "error" in err
    # Too long a prompt: cut from the left and counted, or refused when asked.
    long = "the quick brown fox " * 600
    status, _, r = s.post("/v1/completions", {"prompt": long, "max_tokens": 4})
    assert status == 200 and r["usage"]["truncated_prompt_tokens"] > 0
    assert r["usage"]["prompt_tokens"] == 1024 - 4
    status, _, err = s.post("/v1/completions", {"prompt": long, "max_tokens": 4, "truncate_prompt": False})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    status, _, r = s.post("/v1/completions", {"prompt": "still here", "max_tokens": 3})
    assert status == 200 and r["choices"][0]["finish_reason"] in ("stop", "length")
    # A chat prompt that fits, without max_tokens: the default is the room it leaves, not a cut into it (a
    # default of 256 used to cut such a prompt, on a 128-token model down to its last token).
    ask = lambda n, **kw: s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * n}], **kw})
    per_word = (
        ask(200, max_tokens=1)[2]["usage"]["prompt_tokens"] - ask(100, max_tokens=1)[2]["usage"]["prompt_tokens"]
    ) / 100
    n = int(100 + (1024 - 100 - ask(100, max_tokens=1)[2]["usage"]["prompt_tokens"]) / per_word)  # ~100 tokens of room
    status, _, r = ask(n, temperature=0)
    assert status == 200 and not r["usage"].get("truncated_prompt_tokens")
    assert (
        1024 - 256 < r["usage"]["prompt_tokens"]
        and r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 1024
    )


@pytest.mark.slow
def test_api_key_is_required(chat_server):
    s = chat_server
    for key, code in ((None, "missing_api_key"), ("wrong", "invalid_api_key")):
        status, _, err = s.post("/v1/completions", {"prompt": "hi"}, key=key)
        assert status == 401 and err["error"]["code"] == code
        assert s.get("/v1/models", key)[0] == 401
    assert s.get("/v1/models", API_KEY)[0] == 200
    assert s.get("/health")[0] == 200  # health and the page need no key
    assert s.raw("GET", "/")[0] == 200


@pytest.mark.slow
def test_chat_without_a_template_uses_gpt2s_template_as_generate_chat_does(small_server, tiny):
    from gptforge.chat import Conversation
    from gptforge.generate import generate

    model, tok = tiny
    status, _, r = small_server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    )
    assert status == 200, r  # used to be a 400: the server refused what `generate --chat` does
    ref = generate(model, tok, Conversation(tok).ask("hi"), do_sample=False, max_new_tokens=10, include_prompt=False)
    assert r["choices"][0]["message"]["content"] == ref[0]
    status, _, err = small_server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and "unknown role 'wizard'" in err["error"]["message"]  # checked as training data is


def open_stream(server: RunningServer, prompt: str, max_tokens: int) -> socket.socket:
    """Start a streaming completion on a raw socket and read until its first event; returns the socket."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection((server.host, int(server.port)), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    data = b""
    while b"data:" not in data:
        data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 200")
    return sock


def wait_idle(server: RunningServer, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = server.get("/health")[1]
        if health["running"] == health["waiting"] == 0:
            return health
        time.sleep(0.02)
    raise AssertionError(f"the server still has work: {health}")


@pytest.mark.slow
def test_queue_full_is_429_and_a_disconnect_frees_the_slot(small_server, long_prompt):
    s, prompt = small_server, long_prompt
    before = s.get("/health")[1]["steps"]
    sock = open_stream(s, prompt, 1000)  # holds the only slot for a while
    status, headers, err = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 429 and err["error"]["type"] == "rate_limit_error"
    assert int(headers["retry-after"]) >= 1
    sock.close()  # the client goes away mid-stream
    health = wait_idle(s)
    assert health["steps"] - before < 900  # freed long before its 1000 tokens were done
    assert health["cancelled"] >= 1  # and /health counts it
    status, _, _ = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200


@pytest.mark.slow
def test_a_slow_stream_reader_does_not_hold_others_back(chat_server, long_prompt):
    s, prompt = chat_server, long_prompt
    body = json.dumps({"prompt": prompt, "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
    lazy = socket.create_connection((s.host, int(s.port)), timeout=30)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: "
        b"Bearer " + API_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        # The lazy stream is never read. A server whose loop waited on it would never answer these: the
        # client's socket timeout (30 s, RunningServer.raw) turns that into a failure, no clock needed.
        for _ in range(3):
            status, _, r = s.post("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0})
            assert status == 200 and r["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        lazy.close()
    wait_idle(s)


@pytest.mark.slow
def test_playground_streams_in_headless_chromium(chat_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(chat_server.base + "/")
            page.fill("#api_key", API_KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('parameters')", timeout=15000)
            assert "tiny-chat" in page.text_content("#model")
            page.fill("#prompt", "The quick brown fox")
            page.fill("#max_tokens", "40")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')", timeout=30000)
            assert page.text_content("#generated")
            assert page.text_content("#output").startswith("The quick brown fox")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            assert not errors
        finally:
            browser.close()


# --- one decoding core: the server and `gptforge generate` give the same text ----------------------------


def _server_texts(server: RunningServer, body: dict) -> tuple[list[str], list[str]]:
    """The choices' texts of one completion request, answered whole and streamed (index order)."""
    status, _, whole = server.post("/v1/completions", body)
    assert status == 200, whole
    raw = server.raw(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )[2].decode()
    streamed: dict[int, str] = {}
    for line in raw.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    texts = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    return texts, [streamed.get(i, "") for i in range(len(texts))]


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.9, top_k=20, top_p=0.9, seed=7),
        dict(temperature=1.3, top_k=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.8, seed=3),
        dict(temperature=0.8, min_new_tokens=6, no_repeat_ngram_size=2, seed=11, stop=["e "]),
        dict(temperature=1e-39, seed=5),
        dict(do_sample=False, repetition_penalty=1.5, stop=["th"]),
    ],
)
def test_the_server_the_cli_and_the_api_give_the_same_text(chat_server, folders, options, capsys):
    from gptforge import GPTForge
    from gptforge.cli import main

    prompt, n, new = "The quick brown", 3, 24
    o = dict(options)
    stop = o.pop("stop", [])
    body = {
        "prompt": prompt,
        "max_tokens": new,
        "n": n,
        "stop": stop or None,
        "temperature": 0 if o.get("do_sample") is False else o.get("temperature", 1.0),
        **{
            k: v
            for k, v in o.items()
            if k
            in (
                "top_k",
                "top_p",
                "seed",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "no_repeat_ngram_size",
            )
        },
    }
    if "min_new_tokens" in o:
        body["min_tokens"] = o["min_new_tokens"]
    whole, streamed = _server_texts(chat_server, body)
    assert whole == streamed

    api = GPTForge(str(folders[1])).generate(
        n=n,
        prompt=prompt,
        max_new_tokens=new,
        return_as_list=True,
        stop=stop,
        include_prompt=False,
        **{"top_k": 50, **o},
    )
    assert api == whole

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {"top_k": 50, **o}.items() if k != "do_sample"]
    flags += ["--greedy"] if o.get("do_sample") is False else []
    flags += [f"--stop={s}" for s in stop]
    argv = [
        "generate",
        str(folders[1]),
        prompt,
        f"--num-samples={n}",
        f"--max-new-tokens={new}",
        "--no-prompt",
        "--delimiter=\n<>\n",
        *flags,
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == "\n<>\n".join(whole) + "\n"
    assert main([*argv, "--batch-size=1"]) == 0  # streamed one sample at a time, and the batch size changes nothing
    assert capsys.readouterr().out == "\n<>\n".join(whole) + "\n"


def test_one_failing_choice_does_not_fail_the_others(tiny, one_thread, monkeypatch):
    from gptforge import generate as core

    model, tok = tiny
    real = core.process_logits

    def fragile(scores, opts, *a, **k):
        if opts.temperature == 0.123:
            raise RuntimeError("this group's processing broke")
        return real(scores, opts, *a, **k)

    monkeypatch.setattr(core, "process_logits", fragile)
    engine = Engine(model, tok, max_batch=4).start()
    try:
        c = Collector()
        p = tok.encode("The quick brown fox")
        engine.submit(
            [
                c.seq(0, p, 10, do_sample=False),
                c.seq(1, p, 10, temperature=0.123, seed=1),
                c.seq(2, p, 10, do_sample=False),
            ]
        )
        c.wait(3)
        assert c.events[1][-1].finish == "error" and "broke" in c.events[1][-1].error
        ref = tok.decode(generate_ids(model, p, max_new_tokens=10, do_sample=False, eos_id=tok.eos_id)[0])
        assert c.text(0) == c.text(2) == ref
        assert c.events[0][-1].finish in ("stop", "length")
    finally:
        engine.stop()


# --- log-probabilities ------------------------------------------------------------------------------------


def test_scoring_a_text_over_http_equals_gptforge_eval(chat_server, tiny):
    from gptforge.evaluate import evaluate_text

    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog. Coffee, then more coffee."
    body = {"prompt": "<|endoftext|>" + text, "echo": True, "max_tokens": 0, "logprobs": 2}
    status, _, r = chat_server.post("/v1/completions", body)
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["text"] == "<|endoftext|>" + text and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
    scores = lp["token_logprobs"][1:]
    assert len(scores) == len(tok.encode(text))
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    ours = evaluate_text(model, tok, [text])  # scored after an <|endoftext|>, as the prompt above is
    assert ours.tokens == len(scores)
    assert abs(-sum(scores) / len(scores) - ours.loss) < 1e-4


def test_generated_log_probabilities_are_the_models_own_plain_and_streamed(chat_server, tiny):
    import torch

    model, tok = tiny
    body = {"prompt": "The quick brown", "max_tokens": 12, "temperature": 0.9, "seed": 3, "logprobs": 3, "top_k": 0}
    status, _, r = chat_server.post("/v1/completions", {**body, "return_tokens_as_token_ids": True})
    assert status == 200, r
    lp = r["choices"][0]["logprobs"]
    new = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    assert tok.decode(new) == r["choices"][0]["text"]
    ids = tok.encode("The quick brown")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + new]))
    reference = logits[0].log_softmax(-1)  # the model's own distribution, before temperature and the rest
    for step, (token, value, top) in enumerate(zip(new, lp["token_logprobs"], lp["top_logprobs"]), len(ids) - 1):
        assert abs(reference[step, token].item() - value) < 1e-4
        best = reference[step].topk(3)
        assert [int(t.removeprefix("token_id:")) for t in top] == best.indices.tolist()
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    status, _, texts = chat_server.post("/v1/completions", body)  # the same choice, tokens named by their text
    assert texts["choices"][0]["logprobs"]["tokens"] == [tok.decode([t]) for t in new]
    offsets = texts["choices"][0]["logprobs"]["text_offset"]
    assert offsets == [sum(len(tok.decode([t])) for t in new[:i]) for i in range(len(new))]
    raw = chat_server.raw(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )[2].decode()
    streamed = [
        json.loads(line[6:])["choices"][0]["logprobs"] for line in raw.splitlines() if line.startswith("data: {")
    ]
    tokens = [t for chunk in streamed if chunk for t in chunk["tokens"]]
    assert tokens == texts["choices"][0]["logprobs"]["tokens"]


def test_chat_log_probabilities_in_openais_shape(client):
    r = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)  # greedy: the best one
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token


# --- structured output ------------------------------------------------------------------------------------


def test_structured_output_over_http(chat_server):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "yes": {"type": "boolean"}},
        "required": ["n", "yes"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    status, _, r = chat_server.post(
        "/v1/completions", {"prompt": "Reply:", "max_tokens": 60, "n": 4, "seed": 1, "response_format": fmt}
    )
    assert status == 200, r
    for c in r["choices"]:
        jsonschema.validate(json.loads(c["text"]), schema)
    status, _, r = chat_server.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 80,
            "seed": 2,
            "response_format": {"type": "json_object"},
        },
    )
    assert status == 200, r
    text, finish = r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]
    assert text.startswith("{")  # any object: a random model may still be inside a key when max_tokens runs out
    assert finish == "length" or isinstance(json.loads(text), dict)
    status, _, r = chat_server.post(
        "/v1/completions",
        {"prompt": "Pick:", "max_tokens": 8, "n": 6, "seed": 3, "guided_choice": ["red", "green", "blue"]},
    )
    assert status == 200 and {c["text"] for c in r["choices"]} <= {"red", "green", "blue"}, r
    status, _, r = chat_server.post("/v1/completions", {"prompt": "x", "max_tokens": 8, "guided_regex": "[0-9]{3}"})
    assert status == 200 and re.fullmatch("[0-9]{3}", r["choices"][0]["text"]), r
    for bad, field in (
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ):
        status, _, err = chat_server.post("/v1/completions", {"prompt": "x", "max_tokens": 4, **bad})
        assert status == 400 and err["error"]["param"] == field, err


def test_the_server_measures_its_cpu_paths_before_it_listens(folders, tmp_path, monkeypatch):
    # the first request used to wait for the kernel's build and the measurement of its paths (seconds)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    s = RunningServer(folders[0])
    try:
        assert list((tmp_path / "cache").glob("calibration-*.json")), "nothing was measured before listening"
    finally:
        s.stop()

"""`gptforge serve` against a hostile client, a hostile web page and a hostile model folder: each case runs
against a real server on 127.0.0.1 (issue 39's server items), in the fast test set."""

from __future__ import annotations

import json
import resource
import select
import signal
import socket
import threading

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import RunningServer

from gptforge.checkpoint import save_model
from gptforge.config import GPTConfig
from gptforge.data.vocabulary import train_tokenizer
from gptforge.model import GPT

N_CTX = 128  # the context of `tiny`, the smallest preset: a long chat does not fit
# A template that behaves until a message asks it not to: loops for good, or makes a 20M-character string.
HOSTILE_TEMPLATE = (
    "{% if messages[0]['content'] == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[0]['content'] == 'huge' %}{{ messages[0]['content'] * 10000000 }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tok(sample_text):
    return train_tokenizer([], vocab_size=300, texts=[sample_text], out_dir=None)


def lm_folder(tok, path, n_positions: int, n_embd: int = 32, n_layer: int = 1, eos_never: bool = False):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    model = GPT(config).eval()
    if eos_never:  # the final norm points every state one way, and <|endoftext|> far the other: answers run long
        with torch.no_grad():
            model.transformer.ln_f.weight.fill_(0.01)
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 10.0
            model.transformer.wte.weight[tok.eos_id, 0] = -5.0
    return save_model(model, path, tok)


@pytest.fixture(scope="module")
def hostile(tok, tmp_path_factory):
    """A 128-token model whose folder's chat template misbehaves on request, served with one more host name and
    one more origin allowed."""
    folder = lm_folder(tok, tmp_path_factory.mktemp("hostile") / "tiny-chat", N_CTX)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HOSTILE_TEMPLATE}))
    s = RunningServer(folder, "--allowed-hosts", "models.lan", "--cors-origins", "http://app.example:3000")
    yield s
    s.stop()


def ask(s: RunningServer, path: str, body: bytes, **headers) -> tuple[int, dict, dict]:
    """POST `body` as it is, with exactly these headers (Host defaults to the server's own)."""
    headers = {"Host": f"{s.host}:{s.port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    status, head, data = s.raw("POST", path, body, headers)
    return status, head, json.loads(data) if head.get("content-type", "").startswith("application/json") else data


COMPLETION = json.dumps({"prompt": "In the", "max_tokens": 3}).encode()
JSON = "application/json"


def test_a_web_page_cannot_use_the_local_server(hostile):
    s = hostile
    # the request: a rebound name, its page's origin, a text/plain body
    status, _, err = ask(
        s,
        "/v1/completions",
        COMPLETION,
        Host="attacker.example:8000",
        Origin="http://attacker.example:8000",
        Content_Type="text/plain",
    )
    assert status == 400 and err["error"]["code"] == "invalid_host"
    assert "--allowed-hosts attacker.example" in err["error"]["message"]
    # the right host, but a page of another origin: refused, preflight included
    status, _, err = ask(s, "/v1/completions", COMPLETION, Origin="http://attacker.example", Content_Type=JSON)
    assert status == 403 and err["error"]["code"] == "cross_origin_refused"
    assert (
        s.raw(
            "OPTIONS",
            "/v1/completions",
            headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"},
        )[0]
        == 403
    )
    # a body that is not declared JSON (a form or text/plain post needs no preflight)
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        status, _, err = ask(s, "/v1/completions", COMPLETION, **({"Content_Type": kind} if kind else {}))
        assert status == 415 and err["error"]["code"] == "unsupported_media_type"
    # what is allowed: the names it listens as, --allowed-hosts, the playground's own origin, --cors-origins
    for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}", f"[::1]:{s.port}", "models.lan"):
        assert ask(s, "/v1/completions", COMPLETION, Host=host, Content_Type=f"{JSON}; charset=utf-8")[0] == 200
    assert s.raw("GET", "/", headers={"Host": f"localhost:{s.port}"})[0] == 200
    assert ask(s, "/v1/completions", COMPLETION, Origin=s.base, Content_Type=JSON)[0] == 200
    status, head, _ = s.raw(
        "OPTIONS",
        "/v1/completions",
        headers={
            "Origin": "http://app.example:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert status == 200 and head["access-control-allow-origin"] == "http://app.example:3000"
    status, head, _ = ask(s, "/v1/completions", COMPLETION, Origin="http://app.example:3000", Content_Type=JSON)
    assert status == 200 and head["access-control-allow-origin"] == "http://app.example:3000"


def test_lone_surrogates_in_any_field_are_a_400_naming_it(hostile):
    cases = [
        (b'{"prompt": "half \\ud83d emoji", "echo": true}', "prompt", "'prompt'"),
        (b'{"prompt": "half \\ud83d emoji", "echo": true, "stream": true}', "prompt", "'prompt'"),
        (b'{"model": "\\udc80", "prompt": "hi"}', "model", "'model'"),
        (b'{"\\ud800x": 1, "prompt": "hi"}', "\\ud800x", "field name '\\ud800x'"),
        (b'{"prompt": "hi", "stop": ["ok", "\\udfff"]}', "stop", "'stop[1]'"),
    ]
    for body, param, named in cases:
        status, _, err = ask(hostile, "/v1/completions", body, Content_Type=JSON)
        assert status == 400 and err["error"]["code"] == "invalid_encoding", body
        assert err["error"]["param"] == param and named in err["error"]["message"], body
    status, _, err = ask(
        hostile, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}', Content_Type=JSON
    )
    assert status == 400 and "'messages[0].content'" in err["error"]["message"]
    # a whole pair is a character like any other
    pair = b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}'
    assert ask(hostile, "/v1/completions", pair, Content_Type=JSON)[0] == 200


def test_a_chat_template_that_loops_or_grows_fails_that_request_alone(hostile):
    s = hostile
    body = json.dumps({"messages": [{"role": "user", "content": "loop"}], "max_tokens": 2}).encode()
    looping = socket.create_connection((s.host, int(s.port)), timeout=60)
    looping.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        # while the template loops, the server answers others (a template run on the event loop blocked them
        # for good: the client's socket timeout turns that into a failure)
        assert s.get("/health")[0] == 200
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            assert select.select([looping], [], [], 60)[0], "no answer to the looping request"
            chunk = looping.recv(65536)
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
    finally:
        looping.close()
    assert answer.startswith(b"HTTP/1.1 400")
    err = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "chat_template_failed" and "tokenizer_config.json" in err["message"]
    assert "did not finish within" in err["message"]
    huge = json.dumps({"messages": [{"role": "user", "content": "huge"}]}).encode()
    status, _, err = ask(s, "/v1/chat/completions", huge, Content_Type=JSON)
    assert status == 400 and err["error"]["code"] == "chat_template_failed"
    assert "tokenizer_config.json" in err["error"]["message"] and "more than the limit" in err["error"]["message"]
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).encode()
    assert ask(s, "/v1/chat/completions", body, Content_Type=JSON)[0] == 200


def test_a_chat_longer_than_the_context_keeps_most_of_it_and_says_how_much_was_cut(hostile, tok):
    messages = [{"role": "user", "content": "the quick brown fox " * 60}]
    whole = len(tok.encode(f"user: {messages[0]['content']}\nassistant:"))
    assert whole > N_CTX
    body = json.dumps({"messages": messages, "temperature": 0}).encode()
    status, head, r = ask(hostile, "/v1/chat/completions", body, Content_Type=JSON)
    assert status == 200  # used to keep 127 tokens for the answer and 1 for the conversation
    kept, cut = r["usage"]["prompt_tokens"], r["usage"]["truncated_prompt_tokens"]
    assert kept == N_CTX - N_CTX // 4 and kept + cut == whole
    assert int(head["x-truncated-prompt-tokens"]) == cut
    assert r["usage"]["completion_tokens"] <= N_CTX // 4
    refuse = json.dumps({"messages": messages, "truncate_prompt": False}).encode()
    status, _, err = ask(hostile, "/v1/chat/completions", refuse, Content_Type=JSON)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def half_requests(s: RunningServer, n: int) -> list[socket.socket]:
    """n connections that each send a request line and one header, then nothing more."""
    socks = []
    for _ in range(n):
        c = socket.create_connection((s.host, int(s.port)), timeout=60)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(c)
    return socks


def lower_open_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.mark.parametrize("cap", [[], ["--max-connections", "100000"]], ids=["default-cap", "no-cap"])
def test_clients_that_never_finish_their_headers_do_not_hold_the_server(folders_small, cap):
    # 250 connections against 200 descriptors: beyond the cap they are refused at once; without one the
    # descriptors run out. Either way each half request is answered (408 after --header-timeout, or 503) and
    # closed, and the server serves again (it used to hold every one for good, /health included).
    s = RunningServer(folders_small, "--header-timeout", "1", *cap, preexec_fn=lower_open_files)
    try:
        # a first completion compiles the decoding kernel and measures its paths (seconds on a fresh machine):
        # done before the flood, so the completion after it waits on the server's recovery alone
        assert ask(s, "/v1/completions", COMPLETION, Content_Type=JSON)[0] == 200
        socks = half_requests(s, 250)
        statuses = set()
        for c in socks:
            answer = b""
            while chunk := c.recv(4096):  # the socket's timeout fails the test if the server never lets go
                answer += chunk
            statuses.add(answer[:12])
            c.close()
        assert statuses <= {b"HTTP/1.1 408", b"HTTP/1.1 503"} and b"HTTP/1.1 408" in statuses
        if not cap:
            assert b"HTTP/1.1 503" in statuses
        assert s.get("/health")[0] == 200
        assert ask(s, "/v1/completions", COMPLETION, Content_Type=JSON)[0] == 200
    finally:
        s.stop()


@pytest.fixture(scope="module")
def folders_small(tok, tmp_path_factory):
    return lm_folder(tok, tmp_path_factory.mktemp("small") / "tiny-lm", N_CTX)


def read_until_closed(c: socket.socket, into: list) -> None:
    data = b""
    try:
        while chunk := c.recv(65536):
            data += chunk
    finally:
        into.append(data)


def test_ctrl_c_ends_running_streams_cleanly_and_exits_0(tok, tmp_path):
    folder = lm_folder(tok, tmp_path / "long-lm", 2048, n_embd=128, n_layer=4, eos_never=True)
    s = RunningServer(folder)
    answers: list[bytes] = []
    try:
        body = json.dumps({"prompt": "the quick", "max_tokens": 2000, "stream": True, "seed": 1}).encode()
        readers = []
        for _ in range(3):
            c = socket.create_connection((s.host, int(s.port)), timeout=60)
            c.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            first = b""
            while b"data:" not in first:
                first += c.recv(4096)
            t = threading.Thread(target=read_until_closed, args=(c, answers))
            t.start()
            readers.append((c, t, first))
        s.proc.send_signal(signal.SIGINT)
        code = s.proc.wait(timeout=60)
        for c, t, _ in readers:
            t.join(60)
            c.close()
        s.reader.join(10)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    output = "".join(s.log)
    assert code == 0, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    assert len(answers) == 3
    for data in answers:  # each stream was cut, said why, and ended as a stream ends
        assert b"the server is shutting down" in data and b"data: [DONE]" in data
        assert b'"finish_reason":"length"' not in data

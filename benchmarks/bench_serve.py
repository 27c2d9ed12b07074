"""Serving under load: concurrent streaming clients against `gptforge serve`, batched and one at a time.

A `gpt2`-shaped model (124M parameters, random weights, a 50,257-token BPE trained here on synthetic
text) is served on loopback twice: with continuous batching (--max-batch = the most clients), then with
--max-batch 1, which serves the same requests one at a time. For each number of clients, every client
sends one streaming completion (a fixed-length prompt, `--max-tokens` new tokens, sampling) at the same
moment, and the table reports aggregate tokens/s (all new tokens over the wall time of the round), time to
first token and the gap between tokens of a stream (p50/p95 over all requests/gaps), and errors.

    python benchmarks/bench_serve.py [--clients 1,4,16,64] [--max-tokens 32] [--prompt-words 16] [--round-timeout 240]
                                     [--prefix-trials 5]

With --prefix-trials N it also measures the prefix cache on the batched server: N times, a new 512-token prefix
(token ids) with a 16-token tail is sent once (nothing cached) and then with another 16-token tail (the prefix's
keys and values come from the cache), one request at a time, and the table compares the time to first token.

Everything stays on 127.0.0.1; every round is bounded by --round-timeout (unfinished requests count as
errors), and the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import cpu_name


def make_model(folder: Path) -> None:
    """gpt2-shaped random weights and a full-size (50,257-token) BPE, so every sampled id decodes to text."""
    import torch

    from gptforge.checkpoint import save_model
    from gptforge.config import preset
    from gptforge.data.vocabulary import train_tokenizer
    from gptforge.model import GPT

    rng = random.Random(0)
    syllables = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(60000)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(3000)]
    tok = train_tokenizer([], vocab_size=50257, texts=texts, out_dir=None)
    torch.manual_seed(0)
    config = preset("gpt2", vocab_size=50257, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    save_model(GPT(config), folder, tok)


class ServerProcess:
    def __init__(self, folder: Path, max_batch: int):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gptforge.serve",
                str(folder),
                "--port",
                "0",
                "--max-batch",
                str(max_batch),
                "--max-queue",
                "512",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line}{self.proc.stdout.read()}")
        self.host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
        self.port = int(port)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_request(host: str, port: int, body: bytes) -> dict:
    """One streaming completion over a raw socket: times of each text event, and the usage."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            return {"error": status.decode(errors="replace").strip()}
        times, tokens, prompt, usage = [], None, 0, {}
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue  # headers, chunk sizes, blank lines
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": event["error"]["message"]}
            if event.get("usage"):
                usage = event["usage"]
                tokens, prompt = usage["completion_tokens"], usage["prompt_tokens"]
            if any(c.get("text") or c.get("finish_reason") for c in event["choices"]):
                times.append(time.perf_counter() - t0)
        return {
            "times": times,
            "tokens": tokens if tokens is not None else len(times),
            "prompt": prompt,
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
        }
    finally:
        writer.close()


async def run_round(server: ServerProcess, clients: int, prompts: list[str], max_tokens: int, timeout: float) -> dict:
    bodies = [
        json.dumps(
            {
                "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": i,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        for i in range(clients)
    ]
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(stream_request(server.host, server.port, b)) for b in bodies]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    wall = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    results = [t.result() if not t.exception() else {"error": repr(t.exception())} for t in done]
    good = [r for r in results if "error" not in r]
    ttft = [r["times"][0] for r in good if r["times"]]
    gaps = [b - a for r in good for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in good)
    return {
        "clients": clients,
        "requests": clients,
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft": ttft,
        "gaps": gaps,
        "prompt": statistics.mean(r["prompt"] for r in good) if good else 0,
        "errors": len(results) - len(good) + len(pending),
        "first_error": next((r["error"] for r in results if "error" in r), None),
    }


def prefix_rounds(server: ServerProcess, trials: int, timeout: float) -> list[dict]:
    """Time to first token of a 512-token prefix + 16-token tail, uncached then cached, `trials` times."""
    rng = random.Random(2)
    out = []
    for trial in range(trials):
        prefix = [rng.randrange(1, 50000) for _ in range(512)]
        row = {}
        for kind in ("uncached", "cached"):
            tail = [rng.randrange(1, 50000) for _ in range(16)]
            body = {"prompt": prefix + tail, "max_tokens": 1, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            r = asyncio.run(
                asyncio.wait_for(stream_request(server.host, server.port, json.dumps(body).encode()), timeout)
            )
            if "error" in r:
                raise RuntimeError(f"prefix trial {trial}: {r['error']}")
            row[kind], row[kind + "_tokens"] = r["times"][0], r["cached"]
        out.append(row)
    return out


def print_prefix(rows: list[dict]) -> None:
    print()
    print("| trial | prompt tokens | TTFT uncached | cached tokens | TTFT cached | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(rows):
        print(
            f"| {i + 1} | 528 | {1000 * r['uncached']:.0f} ms | {r['cached_tokens']} | {1000 * r['cached']:.0f} ms "
            f"| {r['uncached'] / r['cached']:.1f}x |"
        )
    un, ca = statistics.median(r["uncached"] for r in rows), statistics.median(r["cached"] for r in rows)
    print(
        f"\nmedian: {1000 * un:.0f} ms uncached, {1000 * ca:.0f} ms cached: {un / ca:.1f}x lower with the prefix cached"
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--prompt-words", type=int, default=16, help="random words per prompt (1-3 tokens each)")
    ap.add_argument("--round-timeout", type=float, default=240, help="seconds a round may take at most")
    ap.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time comparison")
    ap.add_argument("--prefix-trials", type=int, default=0, help="measure the prefix cache this many times (0: not)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    rng = random.Random(1)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
    prompts = [" ".join(word() for _ in range(args.prompt_words)) for _ in range(8)]

    print(
        f"# bench_serve: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    rows, prefix = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        make_model(folder)
        modes = [("batched", max(levels))] + ([] if args.no_sequential else [("one at a time", 1)])
        for mode, max_batch in modes:
            server = ServerProcess(folder, max_batch)
            try:
                asyncio.run(run_round(server, 1, prompts, 4, args.round_timeout))  # warm-up: packed weights, caches
                for clients in levels:
                    if mode != "batched" and clients == 1:
                        continue  # one client is one at a time already
                    before = server.health()
                    r = asyncio.run(run_round(server, clients, prompts, args.max_tokens, args.round_timeout))
                    after = server.health()
                    steps = after["steps"] - before["steps"]
                    r["mode"] = mode
                    r["batch"] = (
                        1.0 if max_batch == 1 else (clients * args.max_tokens / steps if steps else float("nan"))
                    )
                    rows.append(r)
                    print(
                        f"  {mode:13s} {clients:3d} clients: {r['tok_s']:6.1f} tok/s, {r['errors']} errors "
                        f"({r['wall']:.1f} s)" + (f"  first error: {r['first_error']}" if r["errors"] else ""),
                        flush=True,
                    )
                if mode == "batched" and args.prefix_trials:
                    prefix = prefix_rounds(server, args.prefix_trials, args.round_timeout)
            finally:
                server.stop()

    print()
    prompt = statistics.mean(r["prompt"] for r in rows) if rows else 0
    print(
        f"gpt2 shape (124M parameters, random weights), prompts of {prompt:.0f} tokens on average, {args.max_tokens} "
        "new "
        "tokens per request, sampling (temperature 0.8, top-k 50); each client sends one streaming request"
    )
    print()
    print(
        "| clients | serving | tokens/s (aggregate) | TTFT p50 | TTFT p95 | per-token p50 | per-token p95 | errors "
        "| mean batch | wall |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clients']} | {r['mode']} | {r['tok_s']:.1f} | {pct(r['ttft'], 0.5):.2f} s | "
            f"{pct(r['ttft'], 0.95):.2f} s"
            f" | {1000 * pct(r['gaps'], 0.5):.0f} ms | {1000 * pct(r['gaps'], 0.95):.0f} ms | {r['errors']}"
            f" | {r['batch']:.1f} | {r['wall']:.1f} s |"
        )
    one = next((r for r in rows if r["mode"] == "batched" and r["clients"] == 1), None)
    if one:
        print()
        for r in rows:
            if r["mode"] == "batched" and r["clients"] > 1:
                seq = next((s for s in rows if s["mode"] != "batched" and s["clients"] == r["clients"]), None)
                extra = f", {r['tok_s'] / seq['tok_s']:.1f}x one-at-a-time" if seq else ""
                print(
                    f"{r['clients']} clients batched: {r['tok_s'] / one['tok_s']:.1f}x one client's throughput{extra}"
                )
    if prefix:
        print_prefix(prefix)


if __name__ == "__main__":
    main()

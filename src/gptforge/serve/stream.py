"""Server-sent events: a streaming request's events in OpenAI's shape, and the response that sends them while
watching for the client to leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from .engine import Event, Sequence
from .protocol import chat_logprobs, completion_logprobs, error_body, token_namer

if TYPE_CHECKING:
    from .requests import Job


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()) + b"\n\n"


async def stream_events(
    job: Job, seqs: list[Sequence], q: asyncio.Queue, head: dict, chat: bool, tokenizer
) -> AsyncIterator[bytes]:
    """The server-sent events of one request, in OpenAI's shape, ending with `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    decode = token_namer(tokenizer, job.token_ids)
    offsets = [len(job.echo[i // job.n]) if job.echo and not job.prompt_logprobs else 0 for i in range(len(seqs))]

    def scores(i: int, entries: list | None) -> dict | None:
        if job.logprobs is None or not entries:
            return None
        if chat:
            return chat_logprobs(entries, decode)
        lp = completion_logprobs(entries, decode, offsets[i])
        offsets[i] += sum(map(len, lp["tokens"]))
        return lp

    def chunk(i: int, text: str | None, finish: str | None, entries: list | None = None) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": scores(i, entries), "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": scores(i, entries), "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    for i in range(len(seqs)):
        if chat:
            yield _sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        elif job.echo:
            yield chunk(i, job.echo[i // job.n], None)
    left, tokens = len(seqs), 0
    while left:
        ev: Event = await q.get()
        if ev.finish == "error":
            yield _sse(error_body(ev.error or "generation failed", "server_error"))
            yield _sse(b"[DONE]")
            return
        if ev.text or (ev.logprobs and not ev.finish):
            yield chunk(ev.choice, ev.text, None, ev.logprobs)
        if ev.finish:
            left -= 1
            tokens += ev.completion_tokens
            yield chunk(ev.choice, None if chat else "", ev.finish, None if ev.text else ev.logprobs)
    if job.include_usage:
        yield _sse({**head, "choices": [], "usage": usage(job, tokens, seqs)})
    yield _sse(b"[DONE]")


def usage(job: Job, completion_tokens: int, seqs: list[Sequence]) -> dict:
    """OpenAI's token counts (each prompt once, whatever n: its first choice's cached tokens), plus how many prompt
    tokens were cut off."""
    prompt = sum(map(len, job.prompts))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(seqs[i * job.n].cached for i in range(len(job.prompts)))},
    }
    if job.truncated:
        usage["truncated_prompt_tokens"] = job.truncated
    return usage


class EventStream(Response):
    """A server-sent event stream that watches for the client leaving and then frees its sequences at once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], None], headers: dict):
        """`close()` frees the request's sequences and queue once the stream ends or the client leaves."""
        self.status_code, self.background, self.body = 200, None, None  # no Content-Length: it streams
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.events, self.close = events, close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() and not isinstance(t.exception(), OSError):
                    raise t.exception()
        finally:
            for t in tasks:
                t.cancel()
            self.close()

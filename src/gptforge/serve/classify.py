"""Serving a classification folder: `POST /v1/classifications` answers labels and probabilities.

A folder written by `gptforge classify train` (or transformers' GPT2ForSequenceClassification) has no text
to generate, so it gets its own small app: the same authentication, body limits and error objects as the
generation routes, and one route that classifies a text or a list of texts.
"""

from __future__ import annotations

import asyncio
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..classify import GPTClassifier, encode_texts, probabilities
from ..reward import LABEL, encode_scored, is_reward_model, scores
from .app import Routes, ServeOptions, build_app
from .protocol import ApiError, check_fields

MAX_INPUTS = 256  # texts per request


class ClassifierServer:
    """The state behind the routes: the classifier, its tokenizer and the options."""

    def __init__(self, model: GPTClassifier, tokenizer, options: ServeOptions, model_name: str = "model"):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.name = options.model_name or model_name
        self.n_params, self.n_ctx, self.created = model.num_params(), model.config.n_positions, int(time.time())
        self.lock = threading.Lock()  # one forward pass at a time; requests queue on it

    def classify(self, texts: list[str]) -> tuple[list[dict], int]:
        if is_reward_model(self.model):  # one output: its score, of the text and the end-of-text token
            seqs = encode_scored(self.tokenizer, texts, self.n_ctx)
            with self.lock:
                values = scores(self.model, seqs).tolist()
            return [{"index": i, "label": LABEL, "score": v} for i, v in enumerate(values)], sum(map(len, seqs))
        seqs = encode_texts(
            self.tokenizer, texts, self.n_ctx, "right"
        )  # as `classify predict`: a long text keeps its start
        with self.lock:
            probs = probabilities(self.model, seqs).tolist()
        labels = self.model.labels
        data = [
            {
                "index": i,
                "label": labels[max(range(len(row)), key=row.__getitem__)],
                "score": max(row),
                "probs": dict(zip(labels, row)),
            }
            for i, row in enumerate(probs)
        ]
        return data, sum(len(s) for s in seqs)


class ClassifierRoutes(Routes):
    def model_card(self) -> dict:
        s = self.server
        return {
            "id": s.name,
            "object": "model",
            "created": s.created,
            "owned_by": "gptforge",
            "n_params": s.n_params,
            "n_ctx": s.n_ctx,
            "labels": list(s.model.labels),
            "auth": bool(self.options.api_key),
        }

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.server.name, "task": "classification"})

    async def classifications(self, request: Request) -> Response:
        body = await self.read_json(request)
        check_fields(body, {"input"})
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'input' must be a string or a non-empty list of strings", "input", "invalid_type")
        if len(texts) > MAX_INPUTS:
            raise ApiError(
                400, f"'input' holds {len(texts)} texts; at most {MAX_INPUTS} per request", "input", "invalid_value"
            )
        try:
            data, tokens = await asyncio.to_thread(self.server.classify, texts)
        except ValueError as e:  # a text with no tokens at all
            raise ApiError(400, str(e).splitlines()[0], "input", "invalid_value") from None
        return JSONResponse(
            {
                "object": "list",
                "model": self.server.name,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def create_classifier_app(server: ClassifierServer) -> Starlette:
    r = ClassifierRoutes(server)
    return build_app(r, [Route("/v1/classifications", r.classifications, methods=["POST"])])


__all__ = ["ClassifierServer", "create_classifier_app"]

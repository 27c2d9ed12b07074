"""Chat templates: the Jinja `chat_template` of a tokenizer folder, rendered the way transformers'
`apply_chat_template` renders it (a sandboxed environment, `raise_exception` available to templates)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from .errors import DataError, GPTForgeError

MAX_TEMPLATE_CHARS = 1 << 24  # no string or list a template builds with * or + may be longer (16M items)
_bounds = threading.local()  # the output bound of the render running in this thread


class TemplateLimitError(DataError):
    """A chat template that ran past its time or size bound (a loop that does not end, a huge string)."""


class _OverLimit(Exception):
    pass


def _check_binop(operator: str, left, right) -> None:
    """Refuse `*`, `+` and `**` whose result would be larger than the bound, before it is built."""
    limit = getattr(_bounds, "max_chars", MAX_TEMPLATE_CHARS)
    seqs = (str, list, tuple)
    if operator == "*" and isinstance(right, seqs) and isinstance(left, int):
        left, right = right, left
    if operator == "*" and isinstance(left, seqs) and isinstance(right, int):
        size = len(left) * right
    elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        size = len(left) + len(right)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        size = right * abs(left).bit_length() // 8  # bytes of the result
    else:
        return
    if size > limit:
        raise _OverLimit(f"builds a value of {size} items with '{operator}' (more than the limit of {limit})")


def compile_template(source: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GPTForgeError(
            "the model folder has a chat template, and rendering it needs jinja2: "
            "pip install jinja2 (or 'gptforge[serve]')"
        ) from None

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str):
        raise ValueError(message)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@contextlib.contextmanager
def _bounded(seconds: float | None, max_chars: int | None):
    """Within: this thread's template code stops after `seconds` (checked at each line the template runs, so
    a loop that never ends stops too), and `*`/`+` build nothing longer than `max_chars`."""
    _bounds.max_chars = max_chars or MAX_TEMPLATE_CHARS
    previous = sys.gettrace()
    if seconds is not None:
        deadline = time.monotonic() + seconds

        def line(frame, event, arg):
            if time.monotonic() > deadline:
                raise _OverLimit(f"did not finish within {seconds:g} s")
            return line

        sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename == "<template>" else None)
    try:
        yield
    finally:
        if seconds is not None:
            sys.settrace(previous)
        del _bounds.max_chars


def chat_template_file(folder: Path) -> Path:
    """The file of a model folder that holds its chat template: chat_template.jinja, else tokenizer_config.json."""
    jinja = Path(folder) / "chat_template.jinja"
    return jinja if jinja.is_file() else Path(folder) / "tokenizer_config.json"


def read_chat_template(folder: Path) -> str | None:
    """The `chat_template` of a model folder's tokenizer_config.json (or chat_template.jinja), if any."""
    path = chat_template_file(folder)
    if path.suffix == ".jinja":
        return path.read_text(encoding="utf-8")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


# gptforge's template for GPT-2, which has no chat tokens of its own: plain-text role headers, and the
# end-of-text token after each answer, so that generation stops where an answer ends.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


def load_template_file(path) -> str:
    """The Jinja source of a `--chat-template FILE`, checked to compile."""
    from .errors import NotFoundError

    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"--chat-template {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GPTForgeError(f"--chat-template {path}: cannot be read ({e})") from None
    if not source.strip():
        raise GPTForgeError(f"--chat-template {path}: the file is empty")
    try:
        compile_template(source)
    except GPTForgeError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
        raise GPTForgeError(f"--chat-template {path}: not a valid Jinja template ({e})") from None
    return source


def template_of(tokenizer) -> str:
    """The tokenizer's chat template (from its folder's tokenizer_config.json), else gptforge's GPT-2 default."""
    return (getattr(tokenizer, "meta", None) or {}).get("chat_template") or DEFAULT_CHAT_TEMPLATE


def special_tokens(tokenizer) -> dict:
    """The special-token strings transformers passes to a template (bos_token, eos_token, pad_token, unk_token)."""
    eos = tokenizer.decode([tokenizer.eos_id]) if hasattr(tokenizer, "decode") else "<|endoftext|>"
    return {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": getattr(tokenizer, "pad_token", eos)}


def _text_of(content):
    """A message's content as a string: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(
        isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content
    ):
        return "".join(c["text"] for c in content)
    return content


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as a list of {role, content} with known roles and string contents (OpenAI's text parts are
    joined); else a DataError at `where`. Training data, `generate --chat` and the server check them here."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} objects')
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has the unknown role {m['role']!r}; use {', '.join(ROLES)}")
        content = _text_of(m["content"])
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    return clean


class ChatTemplate:
    """A compiled chat template with the tokenizer's special tokens, rendering as transformers' apply_chat_template."""

    def __init__(self, source: str, tokenizer, name: str = "the chat template"):
        self.source, self.name = source, name
        self.template = compile_template(source)
        self.tokens = special_tokens(tokenizer)

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        where: str = "",
        seconds: float | None = None,
        max_chars: int | None = None,
    ) -> str:
        """The conversation as text; with `seconds` or `max_chars`, a TemplateLimitError once the template runs
        longer or writes more (a server renders templates that came with a model, so it bounds both)."""
        prefix = f"{where}: " if where else ""
        try:
            with _bounded(seconds, max_chars):
                parts, size = [], 0
                for part in self.template.generate(
                    messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
                ):
                    size += len(part)
                    if max_chars is not None and size > max_chars:
                        raise _OverLimit(f"writes more than {max_chars} characters")
                    parts.append(part)
                return "".join(parts)
        except _OverLimit as e:
            raise TemplateLimitError(f"{prefix}{self.name} {e}; fix the template") from None
        except Exception as e:  # noqa: BLE001 - the template's raise_exception, or any bug in the template
            raise DataError(f"{prefix}{self.name} failed to render ({type(e).__name__}: {e})") from None

    def answer_spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant answers in it: the text each
        assistant message adds after the prompt that asks for it (add_generation_prompt)."""
        text = self.render(messages, where=where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            asked = self.render(messages[:i], add_generation_prompt=True, where=where) if i else ""
            upto = self.render(messages[: i + 1], where=where)
            if not (text.startswith(upto) and upto.startswith(asked)):
                raise DataError(
                    f"{where}: {self.name} does not render a conversation as its turns one after another, "
                    "so the answers cannot be found; use a template that does, or --train-on-prompt"
                )
            spans.append((len(asked), len(upto)))
        return text, spans


class Conversation:
    """`gptforge generate --chat`: each prompt is a user message put through the model's chat template (gptforge's
    GPT-2 default when it has none); an interactive chat keeps the turns so far."""

    def __init__(self, tokenizer, keep_history: bool = False):
        self.template = ChatTemplate(template_of(tokenizer), tokenizer)
        self.keep, self.messages = keep_history, []

    def ask(self, text: str) -> str:
        """The model's input for the next user message."""
        turns = (self.messages if self.keep else []) + [{"role": "user", "content": text}]
        if self.keep:
            self.messages = turns
        return self.template.render(turns, add_generation_prompt=True, where="--chat")

    def answer(self, text: str) -> None:
        if self.keep:
            self.messages.append({"role": "assistant", "content": text.strip()})


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "MAX_TEMPLATE_CHARS",
    "ROLES",
    "ChatTemplate",
    "Conversation",
    "TemplateLimitError",
    "chat_template_file",
    "check_messages",
    "compile_template",
    "load_template_file",
    "read_chat_template",
    "special_tokens",
    "template_of",
]

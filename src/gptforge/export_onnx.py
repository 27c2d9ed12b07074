"""`gptforge export RUN OUT --format onnx`: the decoder with its key/value cache, for ONNX Runtime.

One graph serves the prompt and every later step, as transformers' exports do: inputs `input_ids`,
`attention_mask` (1 for each real token, past ones included), `position_ids` and `past_key_values.N.key` /
`.value` (batch, heads, past, head size; past 0 for the prompt); outputs `logits` and `present.N.key` /
`.value`, the past of the next step. It is traced from gptforge's own network (`GPT.hidden` with a cache
that concatenates), by torch.onnx's exporter. `--type int8` adds ONNX Runtime's dynamic quantization of the
matrix products (int8 weights, activations quantized per call) as `model_int8.onnx`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from .errors import OptionError

TYPES = ("f32", "int8")
FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
OPSET = 18


def _need(*names: str) -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise OptionError(f"--format onnx needs the {name} package: pip install 'gptforge[onnx]'") from None


class _Past:
    """The cache `GPT.hidden` writes to, as the graph needs it: each layer's past keys/values with the new ones
    concatenated (a traced graph cannot write into a preallocated buffer)."""

    def __init__(self, keys, values):
        self.keys, self.values = list(keys), list(values)
        self.length = keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


class DecoderStep(torch.nn.Module):
    """One decoding step of `model` with the cache as inputs and outputs: what the ONNX graph computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = _Past(past[0::2], past[1::2])
        x = self.model.hidden(input_ids, cache=cache, position_ids=position_ids, attention_mask=attention_mask)
        out = [self.model.lm_head(x)]
        for k, v in zip(cache.keys, cache.values):
            out += [k, v]
        return tuple(out)


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantizer's notes on their own internals (missing torchvision, pre-processing advice)
    kept off the user's terminal; errors still show."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "onnx_ir", "onnxscript", "onnxruntime")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def past_names(n_layer: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def write_onnx(folder: str | Path, path: str | Path) -> Path:
    """Trace the model of `folder` into the ONNX file `path` (weights inside it)."""
    _need("onnx", "onnxscript", "onnxruntime")
    from .checkpoint import load_model

    model = load_model(folder).eval()
    c = model.config
    B, T, P = 1, 3, 2  # an example step with a past: every length stays a dimension of the graph
    past = [torch.zeros(B, c.n_head, P, c.head_dim) for _ in range(2 * c.n_layer)]
    args = (
        torch.zeros(B, T, dtype=torch.long),
        torch.ones(B, P + T, dtype=torch.long),
        torch.arange(P, P + T).unsqueeze(0),
        *past,
    )
    dyn = torch.export.Dim.DYNAMIC
    shapes = {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "position_ids": {0: dyn, 1: dyn},
        "past": tuple({0: dyn, 2: dyn} for _ in past),
    }
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            DecoderStep(model).eval(),
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=OPSET,
            verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(c.n_layer)],
            output_names=["logits", *past_names(c.n_layer, "present")],
        )
    program.save(str(path))  # weights inside the file, or beside it (model.onnx.data) past 2 GB
    return Path(path)


def quantize_int8(path: str | Path, out: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of the matrix products of the ONNX file `path`."""
    _need("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return Path(out)


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU for the ONNX file `path` (`threads`: intra-op threads, default ORT's)."""
    _need("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding in ONNX Runtime with `model` (an ONNX file or a `session`), one cached step per token:
    the check that an export decodes as gptforge does, and the loop a user writes (see the model card)."""
    import numpy as np

    sess = session(model) if isinstance(model, (str, Path)) else model
    past = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    ids, new = list(prompt), list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        start = len(ids) - len(new)
        logits, *present = sess.run(
            None,
            {
                "input_ids": np.array([new], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(start, len(ids), dtype=np.int64)[None],
                **past,
            },
        )
        token = int(logits[0, -1].argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
        new = [token]
        past = dict(zip(past, present))
    return out


def card_lines(type: str, n_head: int, head_dim: int) -> tuple[str, list[str]]:
    """What the export is and how to run it, for the model card."""
    file = INT8_FILE if type == "int8" else FILE
    what = (
        f"`{FILE}`: the decoder with its key/value cache as an ONNX graph (opset {OPSET}) for ONNX Runtime: inputs "
        "`input_ids`, `attention_mask`, `position_ids` and `past_key_values.N.key`/`.value` per layer; outputs "
        "`logits` and `present.N.key`/`.value`"
    )
    what += (
        f"; `{INT8_FILE}`: the same with int8 matrix products (ONNX Runtime's dynamic quantization)"
        if type == "int8"
        else ""
    ) + f". Exported with `gptforge export RUN OUT --format onnx --type {type}`."
    use = [
        "Greedy decoding, one cached step per token (`pip install onnxruntime tokenizers`):",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "",
        'tok = Tokenizer.from_file("tokenizer.json")',
        f'session = ort.InferenceSession("{file}")',
        "past = {i.name: np.zeros((1, %d, 0, %d), np.float32)" % (n_head, head_dim),
        '        for i in session.get_inputs() if i.name.startswith("past")}',
        'ids = tok.encode("Once upon a time").ids',
        "new = ids",
        "for _ in range(50):",
        '    logits, *present = session.run(None, {"input_ids": np.array([new]),',
        '        "attention_mask": np.ones((1, len(ids)), np.int64),',
        '        "position_ids": np.arange(len(ids) - len(new), len(ids))[None], **past})',
        "    new = [int(logits[0, -1].argmax())]",
        "    ids += new",
        "    past = dict(zip(past, present))",
        "print(tok.decode(ids))",
        "```",
    ]
    return what, use


__all__ = [
    "FILE",
    "INT8_FILE",
    "TYPES",
    "DecoderStep",
    "card_lines",
    "greedy",
    "past_names",
    "quantize_int8",
    "session",
    "write_onnx",
]

"""Is the model copying its training text? Verbatim overlap of sampled text with the training tokens.

The model writes `samples` continuations of prompts taken from the validation split. For every position of a
continuation, a suffix array over the training tokens (pydivsufsort) gives the longest run of tokens starting there
that also appears, token for token, somewhere in the training text. A generated token counts as copied at length k
when it lies inside such a run of at least k tokens. The same figures for the validation text that followed the
same prompts are the baseline: how much text of this kind overlaps its training text anyway (a Bible repeats its
phrases, a list of jokes does not). Copying well above the baseline while the gap between validation and training
loss widens is memorisation.

The suffix array is built once per prepared dataset and cached in its folder (`suffix_array-<fingerprint>.npy`):
4 bytes per training token (8 beyond 2**31 tokens), read back memory-mapped.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, OptionError
from .fsio import atomic_write, read_json_lines
from .tokenizer import EOS

KS = (8, 16, 32, 64)  # copy lengths reported, in tokens
WIDTH = 16  # tokens compared per step of the first binary search; rows that match that many are searched again


# --- the index ------------------------------------------------------------------------------------------------


class SuffixIndex:
    """The sorted suffixes of a token array, for longest-match queries."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray):
        self.tokens, self.suffixes = tokens, suffixes

    @classmethod
    def build(cls, tokens: np.ndarray, cache: Path | None = None) -> SuffixIndex:
        """Sort the suffixes of `tokens` (pydivsufsort), or read them from `cache` when it was built for them."""
        if cache is not None and cache.is_file():
            suffixes = np.load(cache, mmap_mode="r")
            if len(suffixes) == len(tokens):
                return cls(tokens, suffixes)
        try:
            from pydivsufsort import divsufsort
        except ImportError:
            raise OptionError("the memorization report needs pydivsufsort: pip install pydivsufsort") from None
        dtype = np.uint16 if tokens.dtype.itemsize <= 2 else np.uint32
        suffixes = divsufsort(np.ascontiguousarray(tokens, dtype=dtype))
        if cache is not None:

            def save(path: Path) -> None:
                with open(path, "wb") as f:  # a file object: np.save would add .npy to the temporary name
                    np.save(f, suffixes)

            atomic_write(cache, save)
        return cls(tokens, suffixes)

    def _window(self, starts: np.ndarray, offset: int, width: int) -> np.ndarray:
        """tokens[start + offset : ... + width] for each start, -1 past the end."""
        pos = starts[:, None].astype(np.int64) + offset + np.arange(width)
        inside = pos < len(self.tokens)
        found = np.asarray(self.tokens)[np.minimum(pos, len(self.tokens) - 1)].astype(np.int64)
        return np.where(inside, found, -1)  # in int64: -1 sorts before every token, as the end of a text should

    def _first_not_below(self, q: np.ndarray) -> np.ndarray:
        """For each query row: the first suffix (in sorted order) not below it, comparing its first columns."""
        n, width, rows = len(self.suffixes), q.shape[1], np.arange(len(q))
        lo, hi = np.zeros(len(q), dtype=np.int64), np.full(len(q), n, dtype=np.int64)
        while (active := lo < hi).any():
            mid = (lo + hi) // 2
            key = self._window(np.asarray(self.suffixes)[np.minimum(mid, n - 1)], 0, width)
            differ = key != q
            first = differ.argmax(axis=1)
            below = differ.any(axis=1) & (key[rows, first] < q[rows, first])
            lo = np.where(active & below, mid + 1, lo)
            hi = np.where(active & ~below, mid, hi)
        return lo

    def longest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of `queries` (a token window, -1 after its end): the length of its longest prefix found in
        the tokens, and a position where that prefix starts. The search compares WIDTH tokens; rows that match
        that many are searched again on their whole width."""
        q = queries.astype(np.int64)
        best_len, best_pos = self._neighbours(q, self._first_not_below(q[:, :WIDTH]))
        long = np.flatnonzero(best_len >= WIDTH)
        if len(long) and q.shape[1] > WIDTH:
            best_len[long], best_pos[long] = self._neighbours(q[long], self._first_not_below(q[long]))
        return best_len, best_pos

    def _neighbours(self, q: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The longest match of each row is with one of the two suffixes around its place in sorted order."""
        n = len(self.suffixes)
        best_len = np.zeros(len(q), dtype=np.int64)
        best_pos = np.zeros(len(q), dtype=np.int64)
        for cand in (lo - 1, lo):
            ok = (cand >= 0) & (cand < n)
            starts = np.asarray(self.suffixes)[np.clip(cand, 0, n - 1)].astype(np.int64)
            length = self._match_length(starts, q) * ok
            better = length > best_len
            best_len, best_pos = np.where(better, length, best_len), np.where(better, starts, best_pos)
        return best_len, best_pos

    def _match_length(self, starts: np.ndarray, q: np.ndarray) -> np.ndarray:
        """How many leading tokens of each query row equal the tokens from `starts`."""
        length = np.zeros(len(q), dtype=np.int64)
        going = np.ones(len(q), dtype=bool)
        for offset in range(0, q.shape[1], WIDTH):
            chunk = q[:, offset : offset + WIDTH]
            same = (self._window(starts, offset, chunk.shape[1]) == chunk) & (chunk >= 0)
            run = np.where(same.all(axis=1), chunk.shape[1], (~same).argmax(axis=1))
            length += np.where(going, run, 0)
            going &= run == chunk.shape[1]
            if not going.any():
                break
        return length


def index_for(data_dir: str | Path, tokens: np.ndarray) -> SuffixIndex:
    """The suffix index of a prepared dataset's training tokens, cached in its folder."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
    return SuffixIndex.build(tokens, Path(data_dir) / f"suffix_array-{meta.get('fingerprint', 'x')}.npy")


# --- shares and the report -----------------------------------------------------------------------------------


def copied_shares(windows: list[np.ndarray], index: SuffixIndex) -> tuple[dict[int, float], list[tuple]]:
    """The share of tokens of `windows` that lie inside a copy of at least k training tokens, for each k in KS,
    and each window's longest copy as (length, window, start, training position)."""
    if not windows:
        return dict.fromkeys(KS, 0.0), []
    width = max(len(w) for w in windows)
    rows = []
    for w in windows:  # one query per start position, window after window
        padded = np.full(len(w) + width, -1, dtype=np.int64)
        padded[: len(w)] = w
        rows += [padded[s : s + width] for s in range(len(w))]
    lengths, where = index.longest(np.stack(rows))
    total = sum(len(w) for w in windows)
    covered, longest, at = dict.fromkeys(KS, 0), [], 0
    for i, w in enumerate(windows):
        n = len(w)
        mine, found = lengths[at : at + n], where[at : at + n]  # the match starting at each position of window i
        at += n
        for k in KS:  # a token is covered by a match of k+ tokens that starts at or before it and reaches it
            starts = np.flatnonzero(mine >= k)
            marks = np.zeros(n + 1, dtype=np.int64)
            np.add.at(marks, starts, 1)
            np.add.at(marks, np.minimum(starts + mine[starts], n), -1)
            covered[k] += int((np.cumsum(marks)[:n] > 0).sum())
        if n:
            j = int(mine.argmax())
            longest.append((int(mine[j]), i, j, int(found[j])))
    return {k: c / total if total else 0.0 for k, c in covered.items()}, longest


@dataclass
class Copy:
    """One of the longest copies: its length in tokens, its text, and where the training text holds it."""

    tokens: int
    text: str
    sample: int
    source: str  # "file:line", or the training document's number where no input file holds the text


@dataclass
class MemorizationReport:
    samples: int
    generated_tokens: int
    copied: dict[int, float]  # k -> share of generated tokens inside a copy of >= k training tokens
    baseline: dict[int, float]  # the same for the validation text that followed the same prompts
    longest: list[Copy] = field(default_factory=list)
    warning: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = "  ".join(f"{k:>3d}+" for k in KS)
        lines = [
            f"memorization: {self.samples} samples, {self.generated_tokens:,} generated tokens",
            f"  share of tokens inside a verbatim copy of k+ training tokens:  k = {head}",
            "    generated text:  " + "  ".join(f"{self.copied[k]:6.1%}" for k in KS),
            "    validation text: " + "  ".join(f"{self.baseline[k]:6.1%}" for k in KS) + "  (baseline)",
        ]
        for c in self.longest:
            text = c.text if len(c.text) <= 80 else c.text[:77] + "..."
            lines.append(
                f"  {c.tokens} tokens, sample {c.sample}, from {c.source}: {json.dumps(text, ensure_ascii=False)}"
            )
        if self.warning:
            lines.append("warning: " + self.warning)
        return "\n".join(lines)


def _source_of(text: str, train: np.ndarray, position: int, eos_id: int, inputs: list[Path]) -> str:
    """Where a copied text lies: the first input file holding it (its longest part between end-of-text marks, with
    the line that part starts on), else the number of the training document it starts in."""
    needle = max(text.split(EOS), key=len).strip().encode("utf-8")
    for path in inputs if needle else []:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                at = m.find(needle)
                if at >= 0:
                    line = m[:at].count(b"\n") + 1
                    return f"{path}:{line}"
        except (OSError, ValueError):  # gone, unreadable or empty: the next one
            continue
    return f"training document {int(np.count_nonzero(np.asarray(train[:position]) == eos_id))}"


def overfit_warning(copied: dict, baseline: dict, history: list[dict]) -> str | None:
    """A warning when copies of 16+ tokens are well above the baseline (twice it, and 5 points more) while the gap
    between validation and training loss widened by 0.1 or more since the first evaluation."""
    if copied[16] < max(2 * baseline[16], baseline[16] + 0.05):
        return None
    gaps = []
    for row in history:
        if "val_loss" in row:
            train = [r["loss"] for r in history if "loss" in r and r.get("step", 0) <= row.get("step", 0)]
            if train:
                gaps.append(row["val_loss"] - train[-1])
    if len(gaps) < 2 or gaps[-1] - gaps[0] < 0.1:
        return None
    return (
        f"the model copies its training text far more than the validation text overlaps it ({copied[16]:.0%} of "
        f"generated tokens lie in copies of 16+ tokens, against {baseline[16]:.0%}) while the gap between "
        f"validation and training loss widened from {gaps[0]:.2f} to {gaps[-1]:.2f}: it is memorising. Use the "
        "run's best/ folder (the best validation score) or train for fewer steps"
    )


def memorization_report(
    model,
    tokenizer,
    train: np.ndarray,
    val: np.ndarray,
    index: SuffixIndex,
    options=None,
    sampling: dict | None = None,
    inputs: list[Path] | None = None,
    history: list[dict] | None = None,
) -> MemorizationReport:
    """Sample continuations of validation prompts (with the `sampling` options, e.g. the model folder's) and
    measure how much of them copies the training tokens; `inputs` are the text files to find copies in, `history`
    the run's metrics rows (for the warning)."""
    from .generate import generate_ids
    from .options import MemorizationOptions

    opts = options or MemorizationOptions()
    eos = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    n_ctx = model.config.n_positions
    prompt_len = min(opts.mem_prompt_tokens, max(1, n_ctx // 4))
    span = prompt_len + opts.mem_tokens
    if len(val) <= prompt_len:
        raise DataError(f"the validation text ({len(val)} tokens) is too short for {prompt_len}-token prompts")
    rng = np.random.default_rng(opts.mem_seed)
    starts = rng.integers(0, max(1, len(val) - span), size=opts.mem_samples)
    prompts = [np.asarray(val[s : s + prompt_len]).astype(np.int64).tolist() for s in starts]
    following = [np.asarray(val[s + prompt_len : s + span]).astype(np.int64) for s in starts]
    sampling = {k: v for k, v in (sampling or {}).items() if k not in ("max_new_tokens", "num_samples", "seed")}
    generated = generate_ids(
        model,
        prompts,
        max_new_tokens=opts.mem_tokens,
        seed=opts.mem_seed,
        batch_size=opts.mem_batch_size,
        eos_id=eos,
        **sampling,
    )
    windows = [np.asarray(g, dtype=np.int64) for g in generated if g]
    copied, longest = copied_shares(windows, index)
    baseline, _ = copied_shares([f for f in following if len(f)], index)
    copies = []
    for length, i, s, where in [c for c in sorted(longest, reverse=True) if c[0] >= KS[0]][: opts.mem_show]:
        text = tokenizer.decode(windows[i][s : s + length].tolist()) if tokenizer is not None else ""
        copies.append(Copy(length, text, i, _source_of(text, train, where, eos, inputs or [])))
    return MemorizationReport(
        len(windows), sum(map(len, windows)), copied, baseline, copies, overfit_warning(copied, baseline, history or [])
    )


def run_summary(model, tokenizer, data, history: list[dict]) -> MemorizationReport:
    """The short report a training run ends with: 16 samples of 64 tokens against its training tokens (`data`, the
    run's RunData; the index is cached in its dataset folder), with the run's own sampling defaults."""
    from .checkpoint import sampling_defaults
    from .options import MemorizationOptions

    train, val = data.train[:], data.val[:]
    opts = MemorizationOptions(mem_samples=16, mem_tokens=64, mem_prompt_tokens=16, mem_batch_size=16, mem_show=1)
    return memorization_report(
        model, tokenizer, train, val, index_for(data.source, train), opts, sampling_defaults(model), history=history
    )


def _run_files(model_dir: Path) -> tuple[Path | None, list[dict]]:
    """The prepared data and the metrics rows of the run a model folder belongs to (the run itself, or its best/ or
    a checkpoint inside it)."""
    for run in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (run / "data" / "meta.json").is_file() or (run / "metrics.jsonl").is_file():
            data = run / "data"
            return (data if (data / "meta.json").is_file() else None), read_json_lines(run / "metrics.jsonl")
    return None, []


def report(model_path: str | Path, train_data=None, options=None, device: str = "auto") -> MemorizationReport:
    """The memorization report of a model folder: against its run's training data (`RUN/data`), or against
    `train_data` (a folder written by `gptforge prepare`, or text files, prepared here with the model's
    tokenizer and cached)."""
    from .checkpoint import load_model_and_tokenizer, sampling_defaults
    from .data.dataset import TokenDataset
    from .data.shards import load_meta, load_split

    model, tokenizer = load_model_and_tokenizer(model_path, device=device)
    data_dir, history = _run_files(Path(model_path))
    if train_data is not None:
        files = [train_data] if isinstance(train_data, (str, Path)) else list(train_data)
        if len(files) == 1 and (Path(files[0]) / "meta.json").is_file():
            data_dir = Path(files[0])
        else:
            data_dir = TokenDataset(files, tokenizer=tokenizer, val_fraction=0.1).data_dir
        history = []  # another text than the run's: its losses say nothing about this one
    if data_dir is None:
        raise DataError(
            f"{model_path}: not a run folder (no data/ with meta.json beside it); name the training text "
            "with --train-data (text files or a folder written by `gptforge prepare`)"
        )
    meta = load_meta(data_dir)
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise DataError(f"{data_dir}: prepared with another tokenizer than {model_path}'s; give the text files instead")
    train, val = load_split(data_dir, "train")[:], load_split(data_dir, "val")[:]  # shards as one array
    if len(val) == 0:
        raise DataError(f"{data_dir}: has no validation split to take prompts and the baseline from")
    inputs = []
    for f in meta.get("inputs", []):
        path = Path(f["path"])
        inputs.append(path if path.is_absolute() or path.exists() else Path(data_dir).parent.parent / path)
    return memorization_report(
        model, tokenizer, train, val, index_for(data_dir, train), options, sampling_defaults(model), inputs, history
    )


__all__ = [
    "KS",
    "Copy",
    "MemorizationReport",
    "SuffixIndex",
    "copied_shares",
    "index_for",
    "memorization_report",
    "overfit_warning",
    "report",
    "run_summary",
]

"""A prepared dataset whose training tokens are K BPE-dropout tokenisations of another's training documents.

Screening data for docs/benchmarks.md ("Seventh round"): subword regularisation (BPE dropout, each merge
skipped with probability p while encoding) gives every pass over a small text a different segmentation,
a remedy tried against the memorising of runs that see their text ten times. The validation tokens are
copied unchanged, so a model trained on the result is scored on the usual segmentation.

    python benchmarks/bpe_dropout_data.py RUN/data OUT --passes 12 --dropout 0.1
    gptforge train --data OUT --size tiny --max-time 10m --out RUN2

The tokenizers library draws the skipped merges from its own unseeded generator: two runs of this script
give different tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from gptforge.data import load_meta, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a dataset folder written by `gptforge prepare` (BPE tokenizer)")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--passes", type=int, default=12, help="tokenisations of the training text (default 12)")
    parser.add_argument("--dropout", type=float, default=0.1, help="probability of skipping a merge (default 0.1)")
    args = parser.parse_args()

    meta = load_meta(args.data)
    if meta["tokenizer"]["kind"] != "bpe" or len(meta["train"]["shards"]) != 1:
        raise SystemExit(f"{args.data}: needs a BPE dataset of one training shard")
    tok = Tokenizer.from_file(str(args.data / "tokenizer" / "tokenizer.json"))
    train, eos = np.asarray(load_split(args.data, "train")), meta["eos_id"]
    cuts = [*np.flatnonzero(train == eos), len(train)]
    docs = [tok.decode(train[a + 1 : b].tolist(), skip_special_tokens=False) for a, b in zip(cuts, cuts[1:])]
    tok.model.dropout = args.dropout
    parts = [np.array([eos], dtype=meta["dtype"])]
    for _ in range(args.passes):
        parts += [np.array([*e.ids, eos], dtype=meta["dtype"]) for e in tok.encode_batch(docs)]
    tokens = np.concatenate(parts)

    args.out.mkdir(parents=True)
    shutil.copytree(args.data / "tokenizer", args.out / "tokenizer")
    for shard in meta["val"]["shards"]:
        shutil.copy(args.data / shard["file"], args.out / shard["file"])
    name = meta["train"]["shards"][0]["file"]
    tokens.tofile(args.out / name)
    meta["train"].update(tokens=len(tokens), shards=[{"file": name, "tokens": len(tokens)}])
    meta["fingerprint"] = f"{meta['fingerprint'][:8]}bpe-drop"
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(
        f"{args.out}: {len(train):,} training tokens -> {len(tokens):,} in {args.passes} passes "
        f"({len(tokens) / len(train) / args.passes:.3f} times the tokens per pass)"
    )


if __name__ == "__main__":
    main()

"""Data: reading inputs (`reading`), a tokenizer trained on them (`vocabulary`), token shards (`shards`),
training batches (`batches`), datasets (`dataset`).

Names are imported on first use, so that reading text does not import numpy's or torch's users.
"""

from importlib import import_module

_EXPORTS = {
    "reading": [
        "ReadOptions",
        "TEXT_EXTENSIONS",
        "clean",
        "fingerprint_file",
        "iter_pieces",
        "iter_texts",
        "resolve_inputs",
    ],
    "textfile": ["read_lines", "read_text_file"],
    "formats": ["HFDataset"],
    "shards": ["FORMAT", "ShardedTokens", "load_meta", "load_split", "prepare", "token_dtype"],
    "batches": ["Batches", "Prefetcher"],
    "dataset": ["RunData", "TokenDataset", "default_cache_dir", "load_run_data"],
    "vocabulary": ["train_tokenizer"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["DataError"]


def __getattr__(name: str):
    if name == "DataError":
        from ..errors import DataError

        return DataError
    if name not in _WHERE:
        raise AttributeError(f"module 'gptforge.data' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)

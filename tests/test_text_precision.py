"""Precision on a text-only bundle: calibration data from a text file, and int4's block-size choice."""

from __future__ import annotations

import json

import pytest

from focalrt.calibration.record import prompt_requests, read_prompts

PROMPTS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?",
           "Write a haiku about rain.", "How many legs does a spider have?", "What is two plus two?"]


def test_prompts_from_paragraphs_or_lines_split_seeded(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS) + "\n")
    a = read_prompts(lines, samples=4, holdout=2, seed=0)
    assert len(a.calibration) == 4 and len(a.holdout) == 2
    assert not set(a.calibration) & set(a.holdout) and set(a.calibration) | set(a.holdout) == set(PROMPTS)
    assert read_prompts(lines, 4, 2, 0).holdout_sha256 == a.holdout_sha256
    prose = tmp_path / "prose.txt"
    prose.write_text("First paragraph,\nwrapped over lines.\n\nSecond one.\n\nThird.\n")
    b = read_prompts(prose, samples=2, holdout=1, seed=0)
    assert sorted(b.calibration + b.holdout) == sorted(["First paragraph, wrapped over lines.", "Second one.",
                                                        "Third."])
    requests = prompt_requests(b.holdout, first_index=2)
    assert requests[0].image is None and requests[0].prompt == b.holdout[0] and requests[0].frame_index == 2
    with pytest.raises(ValueError, match="held-out"):
        read_prompts(prose, samples=2, holdout=3, seed=0)


def _convert_args(bundle, data, out, *extra: str) -> list[str]:
    return ["convert", str(bundle), "--precision", "int4", "--data", str(data), "--out", str(out),
            "--holdout", "2", "--samples", "2", "--max-new-tokens", "8", "--quiet", *extra]


def test_int4_block_choice_takes_the_coarsest_block_that_passes(monkeypatch, tmp_path, capsys):
    """The order and the message, with a gate that passes at block 32 and finer only."""
    import focalrt.calibration.make_bundle as mb
    from focalrt.cli import main

    tried = []

    def fake_make_bundle(bundle, out, data, opts):
        tried.append((opts.int4_block_size, opts.fallback))
        if opts.int4_block_size > 32:
            raise mb.GateFailed({"gate": {"failures": [f"logit_cosine_mean 0.9 < 0.98 at {opts.int4_block_size}"]}})
        return {}

    monkeypatch.setattr(mb, "make_bundle", fake_make_bundle)
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    assert main(_convert_args(bundle, data, tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert tried == [(128, False), (64, False), (32, False)]  # coarsest first, no fallback while choosing
    assert "int4: chose block size 32" in captured.out
    assert "int4 block 128: gate failed (logit_cosine_mean 0.9 < 0.98 at 128)" in captured.err
    assert "int4 block 64: gate failed" in captured.err


@pytest.mark.slow
def test_int4_convert_of_a_text_bundle_chooses_the_block_and_says_which(smollm2, tmp_path, capsys):
    """On the trained model, through the real quantizer and gate: with the gate open the coarsest block (128)
    is chosen at once, written into the manifest, and the bundle answers."""
    from focalrt.cli import main
    from focalrt.runtime.pipeline import Pipeline

    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "int4"
    code = main(_convert_args(smollm2[0], data, out, "--min-logit-cosine", "0", "--min-top1", "0",
                              "--min-greedy-agreement", "0"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int4: chose block size 128," in captured.out and "gate failed" not in captured.err
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["components"]) == {"decoder"}
    assert "blocks of 128 " in m["components"]["decoder"]["quantization"]["weights"]
    report = json.loads((out / "calibration" / "report.json").read_text())
    assert report["gate"]["passed"] and report["gate"]["metrics"]["vision_cosine_min"] is None
    assert report["gate"]["metrics"]["requests"] == 2  # the held-out prompts were scored
    d = Pipeline.from_bundle(out, provider="cpu").describe_text("What is the capital of France?", max_new_tokens=16)
    assert d.token_ids


def test_text_family_is_chosen_by_the_top_level_architecture(tmp_path):
    from focalrt.export.text import is_text_source

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                                    "text_config": {"architectures": ["LlamaForCausalLM"]}}))
    assert is_text_source(str(llama), None) and not is_text_source(str(llava), None)
    assert is_text_source("x.GGUF", None) and is_text_source(None, "smollm2-135m")
    assert not is_text_source(None, "tiny-random")


@pytest.mark.slow
def test_int8_weight_only_convert_of_the_trained_model_passes_the_default_gate(smollm2, tmp_path, capsys):
    """`convert --precision int8` (int8 weights, float activations) keeps a trained model's answers: the
    default gate passes without keeping any node in float, and the bundle answers."""
    from focalrt.cli import main
    from focalrt.runtime.pipeline import Pipeline

    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "int8"
    code = main(["convert", str(smollm2[0]), "--precision", "int8", "--data", str(data), "--out", str(out),
                 "--holdout", "2", "--samples", "2", "--max-new-tokens", "16", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    decoder = json.loads((out / "manifest.json").read_text())["components"]["decoder"]
    assert decoder["precision"] == "int8-weights" and "int8 weight-only" in decoder["quantization"]["weights"]
    report = json.loads((out / "calibration" / "report.json").read_text())
    assert report["gate"]["passed"] and not (report.get("fallback") or {}).get("steps")
    import onnx

    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    levels = [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in graph.node
              if n.op_type == "MatMulNBits"]
    assert len(levels) == decoder["quantization"]["quantized_nodes"] > 0 and set(levels) == {4}  # integer kernels
    # Not "Paris": fp32's first token there is a near-tie ("The" 0.152 against "L" 0.140), which int8 flips.
    d = Pipeline.from_bundle(out, provider="cpu").describe_text("Why is the sky blue?", max_new_tokens=16)
    assert len(d.token_ids) == 16 and d.text.strip()

"""Our bundle + torch-free runtime against transformers' Qwen2.5-VL, token by token."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from focalrt.export.qwen2_5_vl import build_random_model  # noqa: E402
from focalrt.runtime.models.rope import mrope_positions  # noqa: E402
from focalrt.runtime.pipeline import Pipeline  # noqa: E402

NEW_TOKENS = 32
LOGIT_ATOL = 2e-3  # fp32 ONNX vs eager PyTorch; observed differences are ~1e-5


def _hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


def _reference(model, pipe: Pipeline, model_rgb: np.ndarray, prompt_ids: list[int], max_new: int):
    """transformers generate() on the same encoder image and prompt ids."""
    proc = _hf_processor()(images=[model_rgb], return_tensors="pt")
    ids = torch.tensor([prompt_ids])
    mm_types = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=proc["pixel_values"],
                             image_grid_thw=proc["image_grid_thw"], mm_token_type_ids=mm_types,
                             do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=0)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [step[0].numpy() for step in out.logits], proc


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-b"])
def case(request, tiny_bundle, tiny_bundle_b):
    bundle = tiny_bundle if request.param == "tiny-random" else tiny_bundle_b
    return build_random_model(request.param), Pipeline.from_bundle(bundle)


@pytest.mark.parametrize("box,prompt", [((170, 80, 280, 200), None), (None, "What emotion does this face show?")])
def test_greedy_tokens_and_logits_match_transformers(case, astronaut_bgr, box, prompt):
    model, pipe = case
    ours = pipe.describe(astronaut_bgr, box=box, prompt=prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
    # A random model must not stop early, or later steps (and the KV cache) would go untested.
    assert ours.finish_reason == "length" and len(ours.token_ids) == NEW_TOKENS
    assert len(set(ours.token_ids)) > 8, "degenerate repetition would hide KV-cache errors"

    from focalrt.runtime.models.preprocess import to_model_image

    rgb = to_model_image(astronaut_bgr, pipe.image_size)
    ref_tokens, ref_logits, _ = _reference(model, pipe, rgb, ours.prompt_token_ids, NEW_TOKENS)
    assert ours.token_ids == ref_tokens
    for step, (a, b) in enumerate(zip(ours.logits, ref_logits, strict=True)):
        np.testing.assert_allclose(a, b, atol=LOGIT_ATOL, rtol=0, err_msg=f"logits differ at step {step}")


def test_prompt_carries_box_in_encoder_pixels(case, astronaut_bgr):
    _, pipe = case
    d = pipe.describe(astronaut_bgr, box=(170, 80, 280, 200), max_new_tokens=1)
    s = pipe.image_size / 512
    assert d.model_box == (round(170 * s), round(80 * s), round(280 * s), round(200 * s))
    text = pipe.tokenizer.decode(d.prompt_token_ids, skip_special_tokens=False)
    x1, y1, x2, y2 = d.model_box
    assert f"[{x1}, {y1}, {x2}, {y2}]" in text
    n_pad = d.prompt_token_ids.count(pipe.image_token_id)
    assert n_pad == (pipe.image_size // 28) ** 2


def test_preprocessing_equals_hf_image_processor(case, astronaut_bgr):
    _, pipe = case
    from focalrt.runtime.models.preprocess import to_model_image

    rgb = to_model_image(astronaut_bgr, pipe.image_size)
    ref = _hf_processor()(images=[rgb], return_tensors="np")
    assert ref["image_grid_thw"].tolist() == [[1, pipe.image_size // 14, pipe.image_size // 14]]
    ours = pipe.adapter.vision_inputs(astronaut_bgr)["pixel_values"]
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)


def test_vision_embeddings_equal_reference(case, astronaut_bgr):
    model, pipe = case
    from focalrt.runtime.models.preprocess import to_model_image

    rgb = to_model_image(astronaut_bgr, pipe.image_size)
    ref = _hf_processor()(images=[rgb], return_tensors="pt")
    with torch.no_grad():
        want = model.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output[0]
    got = pipe.encode_image(astronaut_bgr).numpy()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_position_ids_equal_get_rope_index(case, astronaut_bgr):
    model, pipe = case
    d = pipe.describe(astronaut_bgr, box=(100, 100, 300, 300), max_new_tokens=1)
    ids = torch.tensor([d.prompt_token_ids])
    g = pipe.image_size // 14
    want, want_delta = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
        image_grid_thw=torch.tensor([[1, g, g]]))
    got, delta = mrope_positions(np.array(d.prompt_token_ids), pipe.image_token_id, pipe.adapter.grid_hw)
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert delta == int(want_delta[0, 0])


def test_decoder_graph_is_fused_with_no_per_layer_shape_arithmetic(tiny_bundle, tiny_bundle_b):
    """RoPE, residual+norm and attention are one contrib node each, so a decode step's kernel count grows
    by a fixed ~16 per layer: everything else in the graph is the same for 2 and 3 layers."""
    import json
    from collections import Counter

    import onnx

    per_layer = {"MatMul", "Add", "Mul", "Sigmoid", "GroupQueryAttention", "MRotaryEmbedding",
                 "SkipSimplifiedLayerNormalization", "Identity", "Constant", "Split"}
    rest = []
    for bundle in (tiny_bundle, tiny_bundle_b):
        manifest = json.loads((bundle / "manifest.json").read_text())
        layers = manifest["text"]["num_layers"]
        ops = Counter(n.op_type for n in onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph.node)
        assert ops["GroupQueryAttention"] == layers
        assert ops["MRotaryEmbedding"] == 2 * layers
        assert ops["MatMul"] == 5 * layers and ops["Split"] == layers  # q/k/v one projection, split for M-RoPE
        assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
        assert ops["Transpose"] == 0 and ops["Slice"] == 0 and ops["Neg"] == 0
        assert manifest["components"]["decoder"]["rotary_table_positions"] == manifest["text"]["max_context"]
        rest.append(sum(c for op, c in ops.items() if op not in per_layer))
    assert rest[0] == rest[1], f"non-layer ops differ between 2 and 3 layers: {rest}"


def test_decoder_wrapper_refuses_what_a_fixed_table_cannot_represent():
    """Sequence-length-dependent RoPE and non-RMSNorm layers get a clear error at export, not a wrong graph."""
    from focalrt.export.gqa import KVCachedDecoder, rope_tables

    model = build_random_model("tiny-random")
    lm = model.model.language_model
    lm.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="'dynamic' changes with the sequence length"):
        rope_tables(lm.rotary_emb, 16, 16, 3)
    lm.rotary_emb.rope_type = "default"
    lm.norm = torch.nn.LayerNorm(lm.config.hidden_size)
    with pytest.raises(ValueError, match="not an RMSNorm"):
        KVCachedDecoder(lm, model.lm_head, 64)


def test_rotary_table_matches_the_models_rotary_module():
    """The export-time cos/sin table, looked up per M-RoPE section, equals what transformers applies."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from focalrt.export.gqa import rope_tables, rotary_reference

    model = build_random_model("tiny-random-b")
    lm = model.model.language_model
    cfg = lm.config
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    pos = torch.stack([torch.arange(9), torch.tensor([0, 1, 2, 2, 2, 3, 3, 3, 4]),
                       torch.tensor([0, 1, 2, 3, 4, 2, 3, 4, 5])]).view(3, 1, 9)
    x = torch.randn(1, 9, heads * dim)
    cos, sin = lm.rotary_emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x.view(1, 9, heads, dim).transpose(1, 2), x.view(1, 9, heads, dim).transpose(1, 2),
                                  cos, sin)
    table_cos, table_sin = rope_tables(lm.rotary_emb, 32, dim, 3)
    got = rotary_reference(x, pos, table_cos, table_sin, heads, tuple(cfg.rope_parameters["mrope_section"]))
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(1, 9, -1), atol=1e-6, rtol=1e-5)

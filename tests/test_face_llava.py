"""Face-LLaVA: our bundle + torch-free runtime against the eager PyTorch reference (transformers' Llava plus
our landmark pathway), the checkpoint-name mapping, and CLIP preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
cv2 = pytest.importorskip("cv2")

from face_llava_fixtures import tokenizer_image_token as _tokenizer_image_token  # noqa: E402
from face_llava_fixtures import write_checkpoint as _write_checkpoint  # noqa: E402
from face_llava_fixtures import write_llama_style_tokenizer  # noqa: E402

from focalrt.export.build import export_bundle  # noqa: E402
from focalrt.export.face_llava import (  # noqa: E402
    IMAGE_TOKEN,
    LLAVA_V1_SYSTEM,
    build_random_model,
    convert_face_llava_state_dict,
    export_vision,
    load_face_llava_checkpoint,
    to_original_face_llava_state_dict,
)
from focalrt.runtime.models.face_llava import FaceLlavaAdapter, clip_pixels  # noqa: E402
from focalrt.runtime.pipeline import Pipeline  # noqa: E402

PRESET = "tiny-random-face-llava"
NEW_TOKENS = 32
LOGIT_ATOL = 2e-3  # fp32 ONNX vs eager PyTorch; observed differences are ~2e-5
# Face-LLaVA's crop tool makes 256x256 crops; a 224-px crop needs no resampling, so CLIPImageProcessor gives
# the reference exactly the pixels our preprocessing gives (resampling is tested on its own below).
CROP = 224


@pytest.fixture(scope="module")
def model():
    return build_random_model(PRESET)


@pytest.fixture(scope="module")
def linear_model():
    """The authors' default landmark projector (`landmarks_projector_type='linear'`): one landmark token."""
    return build_random_model(PRESET, landmark_projector="linear")


@pytest.fixture(scope="module")
def models(model, linear_model):
    return {"landmarks_region_projector": model, "linear": linear_model}


@pytest.fixture(scope="module")
def face_crop(astronaut_bgr):
    """A square crop around the astronaut's face, as Face-LLaVA's crop tool makes them."""
    return cv2.resize(astronaut_bgr[60:190, 160:290], (CROP, CROP), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def landmarks68():
    return np.random.default_rng(0).uniform(30, CROP - 30, (68, 2)).astype(np.float32)


def _clip_reference(rgb: np.ndarray) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil()(images=[rgb], return_tensors="np")["pixel_values"]


@pytest.fixture(scope="module")
def runs(face_llava_pipe, model, face_crop, landmarks68):
    """Ours and the reference's greedy tokens and logits, with and without landmarks."""
    pixels = torch.from_numpy(_clip_reference(cv2.cvtColor(face_crop, cv2.COLOR_BGR2RGB)))
    out = {}
    for name, lm in (("with", landmarks68), ("without", None)):
        ours = face_llava_pipe.describe(face_crop, landmarks68=lm, max_new_tokens=NEW_TOKENS, return_logits=True)
        ref_lm = None if lm is None else torch.from_numpy(lm / CROP)[None]
        ref_tokens, ref_logits = model.generate(torch.tensor([ours.prompt_token_ids]), pixels, ref_lm, NEW_TOKENS)
        out[name] = ours, ref_tokens, ref_logits
    return out


@pytest.mark.parametrize("landmarks", ["with", "without"])
def test_greedy_tokens_and_logits_match_reference(runs, landmarks):
    ours, ref_tokens, ref_logits = runs[landmarks]
    # A random model must not stop early, or later steps (and the KV cache) would go untested.
    assert ours.finish_reason == "length" and len(ours.token_ids) == NEW_TOKENS
    assert len(set(ours.token_ids)) > 8, "degenerate repetition would hide KV-cache errors"
    assert ours.token_ids == ref_tokens
    for step, (a, b) in enumerate(zip(ours.logits, ref_logits, strict=True)):
        np.testing.assert_allclose(a, b, atol=LOGIT_ATOL, rtol=0, err_msg=f"logits differ at step {step}")


def test_landmarks_change_the_answer(runs):
    assert runs["with"][0].token_ids != runs["without"][0].token_ids


def test_vision_embeddings_equal_reference(face_llava_pipe, model, face_crop, landmarks68):
    pixels = torch.from_numpy(_clip_reference(cv2.cvtColor(face_crop, cv2.COLOR_BGR2RGB)))
    with torch.no_grad():
        want = model.image_features(pixels, torch.from_numpy(landmarks68 / CROP)[None])[0].numpy()
        want_plain = model.image_features(pixels)[0].numpy()
    got = face_llava_pipe.encode_image(face_crop, landmarks68).numpy()
    assert got.shape == (256, model.config.text_config.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(face_llava_pipe.encode_image(face_crop).numpy(), want_plain, atol=1e-4, rtol=1e-4)
    # The same face at twice the size, with its landmarks scaled alike, normalises to the same input.
    big = cv2.resize(face_crop, (2 * CROP, 2 * CROP), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(face_llava_pipe.adapter.vision_inputs(big, landmarks68 * 2)["landmarks"],
                               face_llava_pipe.adapter.vision_inputs(face_crop, landmarks68)["landmarks"], rtol=1e-6)


def test_prompt_is_llava_v1_with_256_image_tokens(face_llava_pipe, face_crop):
    d = face_llava_pipe.describe(face_crop, prompt="Which action units are active?", max_new_tokens=1)
    ids = d.prompt_token_ids
    assert ids.count(face_llava_pipe.image_token_id) == 256
    first = ids.index(face_llava_pipe.image_token_id)
    assert ids[first:first + 256] == [face_llava_pipe.image_token_id] * 256
    text = face_llava_pipe.tokenizer.decode(ids, skip_special_tokens=False).replace(IMAGE_TOKEN * 256, "<IMG>")
    assert text == f"<s>{LLAVA_V1_SYSTEM} USER: <IMG>\nWhich action units are active? ASSISTANT:"
    assert face_llava_pipe.adapter.rope_axes == 1 and face_llava_pipe.adapter.uses_landmarks
    positions, delta = face_llava_pipe.adapter.positions(np.array(ids))
    np.testing.assert_array_equal(positions, np.arange(len(ids))[None])
    assert delta == 0


@pytest.mark.parametrize("hw", [(224, 224), (224, 301), (301, 224)])
def test_preprocessing_equals_clip_image_processor_without_resampling(face_llava_pipe, astronaut_bgr, hw):
    """Shorter side already 224: only the centre crop and normalisation act, and they must be exact."""
    h, w = hw
    image = np.ascontiguousarray(astronaut_bgr[100:100 + h, 50:50 + w])
    got = face_llava_pipe.adapter.vision_inputs(image)["pixel_values"]
    np.testing.assert_allclose(got, _clip_reference(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)), atol=1e-5, rtol=0)


def test_preprocessing_close_to_clip_image_processor_when_resizing(face_llava_pipe, face_crop, astronaut_bgr):
    """Float antialiased bicubic vs PIL's on uint8 (rounded): within one grey level on average."""
    crop256 = cv2.resize(face_crop, (256, 256), interpolation=cv2.INTER_CUBIC)
    for image in (crop256, astronaut_bgr, astronaut_bgr[:, :400]):
        got = face_llava_pipe.adapter.vision_inputs(image)["pixel_values"]
        want = _clip_reference(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        assert got.shape == want.shape == (1, 3, 224, 224)
        assert np.abs(got - want).mean() < 0.02  # ~1.3 grey levels in CLIP-normalised units


def _authors_transform_via_torch(image_bgr: np.ndarray, antialias: bool = True) -> np.ndarray:
    """The authors' transform as torchvision runs it on a float tensor (torchvision 0.28 source: Resize(int)
    keeps the aspect with int(size * long / short), then interpolate(bicubic, align_corners=False,
    antialias) with no rounding or clamping for floats; CenterCrop's offsets are int(round((h - 224) / 2)))."""
    from focalrt.export.face_llava import IMAGE_MEAN, IMAGE_STD

    t = torch.from_numpy(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255
    h, w = t.shape[1:]
    nh, nw = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
    r = torch.nn.functional.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False,
                                        antialias=antialias)[0]
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    r = r[:, top:top + 224, left:left + 224]
    return ((r - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None])[None].numpy()


@pytest.fixture(scope="module")
def face256(astronaut_bgr):
    """The shipped face image cropped around the face and brought to 256 px, as crop_face.py's crops are."""
    return cv2.resize(astronaut_bgr[40:210, 140:310], (256, 256), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("shape", ["face256", "full", "portrait", "landscape_odd", "upsample"])
def test_preprocessing_equals_the_authors_float_bicubic(face_llava_pipe, astronaut_bgr, face256, shape):
    """Ours (numpy) against the resize torchvision performs on the float tensor: shrinking, enlarging, and
    centre crops with odd margins (torchvision rounds them)."""
    image = {"face256": face256, "full": astronaut_bgr, "portrait": astronaut_bgr[:, 50:351],
             "landscape_odd": astronaut_bgr[10:309], "upsample": cv2.resize(face256, (150, 170))}[shape]
    got = face_llava_pipe.adapter.vision_inputs(np.ascontiguousarray(image))["pixel_values"]
    want = _authors_transform_via_torch(np.ascontiguousarray(image))
    assert got.shape == want.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if shape == "face256":  # antialias matters: torchvision < 0.17 resized tensors without it
        assert np.abs(_authors_transform_via_torch(image, antialias=False) - want).max() > 0.05


def test_preprocessing_equals_torchvision(face_llava_pipe, face256):
    """The authors' Compose itself, when torchvision can be imported (it is not a dependency: the PyPI wheel
    is a CUDA build whose ops need CUDA libraries)."""
    try:
        import torchvision
        from PIL import Image
        from torchvision import transforms
    except Exception as exc:  # an ImportError, or a RuntimeError from a wheel built for another torch
        pytest.skip(f"torchvision not importable here: {type(exc).__name__}: {exc}")
    from focalrt.export.face_llava import IMAGE_MEAN, IMAGE_STD

    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(224), transforms.Normalize(IMAGE_MEAN, IMAGE_STD)])
    want = tf(Image.fromarray(cv2.cvtColor(face256, cv2.COLOR_BGR2RGB)))[None].numpy()
    got = face_llava_pipe.adapter.vision_inputs(face256)["pixel_values"]
    assert np.abs(got - want).max() < 1e-3, f"torchvision {torchvision.__version__}"


@pytest.mark.parametrize("task", ["age", "action_units", "facial_attributes"])
def test_prompt_ids_equal_their_tokenizer_image_token(face_llava_pipe, face_crop, task):
    """Our prompt, with its 256 image ids counted as their one -200, is what their inference builds: the
    llava_v1 conversation ("<image>\n" + question) through tokenizer_image_token. Checked on the preset's
    tokenizer (Qwen2 BPE with <s>); docs/face-llava.md says what a Vicuna tokenizer.model changes."""
    from focalrt.runtime.models.face_llava import task_instruction

    question = task_instruction(face_llava_pipe.profile, task)
    ours = face_llava_pipe.describe(face_crop, prompt=question, max_new_tokens=1).prompt_token_ids
    image_id = face_llava_pipe.image_token_id
    collapsed = [t for i, t in enumerate(ours) if t != image_id or i == 0 or ours[i - 1] != image_id]
    collapsed = [-200 if t == image_id else t for t in collapsed]
    # conv_templates["llava_v1"]: system, sep " ", "USER: " + message, sep " ", "ASSISTANT:"
    text = f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    bos = face_llava_pipe.tokenizer.token_to_id("<s>")
    tokenizer = face_llava_pipe.tokenizer
    chunks = [[bos] + tokenizer.encode(c, add_special_tokens=False).ids for c in text.split(IMAGE_TOKEN)]
    assert collapsed == _tokenizer_image_token(chunks)
    assert ours.count(image_id) == 256


def test_face_llava_profile_has_no_region_text_and_crops_like_their_tool(face_llava_bundle, astronaut_bgr):
    """No words about the region; with region_mode face_crop (export --region-mode face_crop) a box is shown
    as their crop tool shows a face: from the box's corner a square of side (w + h) / 2, resized to 256 px;
    landmarks follow the face into the crop."""
    from focalrt.runtime.faces.crops import crop_face_square

    pipe = Pipeline.from_bundle(face_llava_bundle)
    assert pipe.profile["region_mode"] == "text" and pipe.profile["region_template"] == ""
    pipe.profile = {**pipe.profile, "region_mode": "face_crop"}  # as `export --region-mode face_crop` writes it
    assert set(pipe.profile["tasks"]) == {"action_units", "age", "facial_attributes", "emotion", "deepfake"}
    box = (170, 60, 290, 196)  # w 120, h 136: side 128, so the crop is scaled by exactly 2
    crop, crop_box = crop_face_square(astronaut_bgr, box)
    np.testing.assert_array_equal(crop, cv2.resize(astronaut_bgr[60:188, 170:298], (256, 256)))
    assert crop_box == (0, 0, 240, 272)
    lm = np.random.default_rng(1).uniform(0, 120, (68, 2)).astype(np.float32) + np.float32([170, 60])
    whole = pipe.describe(astronaut_bgr, box=box, landmarks68=lm, max_new_tokens=8)
    direct = pipe.describe(crop, landmarks68=(lm - np.float32([170, 60])) * 2, max_new_tokens=8)
    assert whole.prompt_token_ids == direct.prompt_token_ids and whole.token_ids == direct.token_ids
    text = pipe.tokenizer.decode(whole.prompt_token_ids, skip_special_tokens=False)
    assert text.replace(IMAGE_TOKEN * 256, "<IMG>") == \
        f"<s>{LLAVA_V1_SYSTEM} USER: <IMG>\n{pipe.profile['default_instruction']} ASSISTANT:"


def test_bad_landmarks_are_rejected_with_the_fix(face_llava_pipe, face_crop):
    with pytest.raises(ValueError, match=r"\[68, 2\].*to_68"):
        face_llava_pipe.adapter.vision_inputs(face_crop, np.zeros((468, 2)))
    with pytest.raises(ValueError, match="NaN"):
        face_llava_pipe.adapter.vision_inputs(face_crop, np.full((68, 2), np.nan))


# --- checkpoint names ------------------------------------------------------------------------------------

def test_checkpoint_names_round_trip(model):
    ours = model.state_dict()
    original = to_original_face_llava_state_dict(ours)
    hidden = model.config.text_config.hidden_size
    # Face-LLaVA's own names (LLaVA layout, LanguageBind tower, landmark modules).
    assert original["model.mm_projector.0.weight"].shape == (hidden, model.config.vision_config.hidden_size)
    assert "model.mm_projector.2.bias" in original
    assert "model.image_tower.image_tower.encoder.layers.0.self_attn.q_proj.weight" in original
    assert "model.layers.1.mlp.down_proj.weight" in original and "lm_head.weight" in original
    assert original["model.landmarks_projector.region_layers.teeth.weight"].shape == (hidden, 16)
    assert original["model.landmarks_projector.region_layers.face.weight"].shape == (hidden, 34)
    assert original["model.global_landmarks_projector.weight"].shape == (hidden, 136)
    assert original["model.landmarks_cross_attn.cross_attn.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert not any(k.startswith("llava.") or k.startswith("landmarks.") for k in original)

    back = convert_face_llava_state_dict(original)
    assert set(back) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name

    # LLaVA-1.5's tower spelling is read too; unused checkpoint entries are dropped; unknown ones fail. The
    # video tower is placed under video_tower. (test_face_llava_video_export.py covers it in full).
    renamed = {k.replace("model.image_tower.image_tower.", "model.vision_tower.vision_tower.vision_model."): v
               for k, v in original.items()}
    renamed["model.landmarks_cross_attn.ln.weight"] = torch.ones(hidden)
    assert set(convert_face_llava_state_dict(renamed)) == set(ours)
    video = convert_face_llava_state_dict({"model.video_tower.video_tower.embeddings.class_embedding": torch.zeros(4)})
    assert set(video) == {"video_tower.embeddings.class_embedding"}
    with pytest.raises(ValueError, match="no place"):
        convert_face_llava_state_dict({**original, "model.some_new_adapter.weight": torch.zeros(1)})


@pytest.mark.parametrize("projector", ["landmarks_region_projector", "linear"])
def test_pathway_equals_the_repository_formulation(models, projector):
    """Our modules, loaded from checkpoint names, compute what Face-LLaVA's code computes: region Linears
    over iBUG slices (or one Linear over all 136 values) plus the global Linear, then nn.MultiheadAttention
    (packed q/k/v), residual, LayerNorm, linear_proj and the scaled residual at their default 0.1."""
    model = models[projector]
    original = to_original_face_llava_state_dict(model.state_dict())
    hidden = model.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(1, 256, hidden, generator=gen)
    landmarks = torch.rand(1, 68, 2, generator=gen)

    p = "model.landmarks_cross_attn."
    mha = torch.nn.MultiheadAttention(hidden, 8, batch_first=True).eval()
    mha.load_state_dict({"in_proj_weight": original[p + "cross_attn.attn.in_proj_weight"],
                         "in_proj_bias": original[p + "cross_attn.attn.in_proj_bias"],
                         "out_proj.weight": original[p + "cross_attn.attn.out_proj.weight"],
                         "out_proj.bias": original[p + "cross_attn.attn.out_proj.bias"]})
    slices = {"face": (0, 17), "eyebrow1": (17, 22), "eyebrow2": (22, 27), "nose": (27, 31),
              "nostril": (31, 36), "eye1": (36, 42), "eye2": (42, 48), "lips": (48, 60), "teeth": (60, 68)}
    lin = torch.nn.functional.linear
    flat = landmarks.view(1, 136)
    if projector == "linear":  # build_landmark_projector: nn.Linear(landmarks_hidden_size=136, hidden)
        assert original["model.landmarks_projector.weight"].shape == (hidden, 136)
        regions = lin(flat, original["model.landmarks_projector.weight"],
                      original["model.landmarks_projector.bias"]).unsqueeze(1)  # encode_images: unsqueeze(-2)
    else:
        regions = torch.stack([lin(flat.view(1, 68, 2)[:, a:b].flatten(1),
                                   original[f"model.landmarks_projector.region_layers.{n}.weight"],
                                   original[f"model.landmarks_projector.region_layers.{n}.bias"])
                               for n, (a, b) in slices.items()], dim=1)
    tokens = regions + lin(flat, original["model.global_landmarks_projector.weight"],
                           original["model.global_landmarks_projector.bias"]).unsqueeze(1)
    with torch.no_grad():
        attended = mha(image, tokens, tokens, need_weights=False)[0]
        x = torch.nn.functional.layer_norm(image + attended, (hidden,), original[p + "cross_attn.ln.weight"],
                                           original[p + "cross_attn.ln.bias"])
        want = 0.1 * lin(x, original[p + "linear_proj.weight"], original[p + "linear_proj.bias"]) + image
        got = model.landmarks(image, landmarks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projector,tower_in_checkpoint",
                         [("landmarks_region_projector", True), ("landmarks_region_projector", False),
                          ("linear", True)])
def test_load_checkpoint_directory(tmp_path, models, projector, tower_in_checkpoint):
    model = models[projector]
    _write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", tower_in_checkpoint)
    if projector == "linear":  # the authors' names: one Linear(136 -> hidden)
        from safetensors import safe_open

        with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert {"model.landmarks_projector.weight", "model.landmarks_projector.bias"} <= names
        assert not any(".region_layers." in n for n in names)
    loaded = load_face_llava_checkpoint(tmp_path / "ckpt")
    assert loaded.landmarks.projector == projector
    # No branch scale in the config: the authors' module default, 0.1, applies.
    assert loaded.landmarks is not None and loaded.landmarks.cross_attn.branch_scale == 0.1
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_projector_type_must_match_the_weights(tmp_path, linear_model):
    """Their config reader defaults landmarks_projector_type to 'linear'; a config naming the other type
    than the weights hold is refused, not silently loaded."""
    _write_checkpoint(tmp_path / "ckpt", linear_model, tmp_path / "tower", True,
                      landmarks_projector_type="landmarks_region_projector")
    with pytest.raises(ValueError, match="landmarks_projector_type='landmarks_region_projector'.*'linear'"):
        load_face_llava_checkpoint(tmp_path / "ckpt")


def test_linear_projector_checkpoint_exports_and_matches_reference(tmp_path, linear_model, face_llava_bundle, face_crop,
                                                                   landmarks68):
    """The authors' default projector, from a checkpoint in their layout (config without the projector key,
    as their reader defaults it to 'linear'): the bundle gives the reference's greedy tokens."""
    _write_checkpoint(tmp_path / "ckpt", linear_model, tmp_path / "tower", True)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["landmarks_projector_type"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    write_llama_style_tokenizer(tmp_path / "ckpt", (face_llava_bundle / "tokenizer.json").read_text())
    out = export_bundle(tmp_path / "bundle", model_id=str(tmp_path / "ckpt"), family="face_llava", face_models=False)
    facts = json.loads((out / "manifest.json").read_text())["components"]["vision"]["landmarks"]
    assert facts["projector"] == "linear" and facts["branch_scale"] == 0.1
    pipe = Pipeline.from_bundle(out)
    pixels = torch.from_numpy(_clip_reference(cv2.cvtColor(face_crop, cv2.COLOR_BGR2RGB)))
    tokens = {}
    for name, lm in (("with", landmarks68), ("without", None)):
        ours = pipe.describe(face_crop, landmarks68=lm, max_new_tokens=NEW_TOKENS, return_logits=True)
        ref_lm = None if lm is None else torch.from_numpy(lm / CROP)[None]
        ref_tokens, ref_logits = linear_model.generate(torch.tensor([ours.prompt_token_ids]), pixels, ref_lm,
                                                       NEW_TOKENS)
        assert ours.token_ids == ref_tokens
        np.testing.assert_allclose(ours.logits[0], ref_logits[0], atol=LOGIT_ATOL, rtol=0)
        tokens[name] = ref_tokens
    assert tokens["with"] != tokens["without"]


def test_unknown_tower_activation_is_refused(tmp_path, model):
    """No vision_config and no tower config: the activation is unknown, and guessing CLIP's quick_gelu would
    give plausible, wrong features. The refusal names the fix."""
    _write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", True)
    (tmp_path / "tower" / "config.json").unlink()
    with pytest.raises(ValueError, match="activation cannot be known.*LanguageBind_Image"):
        load_face_llava_checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["mm_image_tower"] = "LanguageBind/LanguageBind_Image"  # their config's hub name, not local here
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation cannot be known"):
        load_face_llava_checkpoint(tmp_path / "ckpt")
    # With the activation given (here in config.json's vision_config), it loads.
    v = model.config.vision_config
    config["vision_config"] = {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "image_size", "patch_size",
                                                          "hidden_act")}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert load_face_llava_checkpoint(tmp_path / "ckpt").config.vision_config.hidden_act == v.hidden_act


def test_branch_scale_from_the_config_wins(tmp_path, model):
    _write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", True, landmarks_branch_scale=0.001)
    assert load_face_llava_checkpoint(tmp_path / "ckpt").landmarks.cross_attn.branch_scale == 0.001


def test_export_from_checkpoint_directory_runs_like_the_preset(tmp_path, model, face_llava_bundle, runs, face_crop,
                                                              landmarks68):
    """End to end from original names: a checkpoint whose tokenizer lacks <image> gets it added, and the
    bundle describes the face exactly as the preset bundle with the same weights does."""
    _write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", tower_in_checkpoint=True)
    tok = json.loads((face_llava_bundle / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != IMAGE_TOKEN]
    write_llama_style_tokenizer(tmp_path / "ckpt", json.dumps(tok))
    out = export_bundle(tmp_path / "bundle", model_id=str(tmp_path / "ckpt"), family="face_llava", face_models=False)
    manifest = json.loads((out / "manifest.json").read_text())
    preset_manifest = json.loads((face_llava_bundle / "manifest.json").read_text())
    assert manifest["source"]["weights_fingerprint"] == preset_manifest["source"]["weights_fingerprint"]
    assert manifest["tokenizer"]["special_tokens"][IMAGE_TOKEN] == manifest["text"]["image_token_id"]
    assert manifest["components"]["vision"]["landmarks"]["branch_scale"] == 0.1  # the authors' default
    d = Pipeline.from_bundle(out).describe(face_crop, landmarks68=landmarks68, max_new_tokens=NEW_TOKENS)
    # The preset's answer equals the reference's at branch_scale 0.1 (test_greedy_tokens_and_logits_...).
    assert d.token_ids == runs["with"][0].token_ids
    assert d.token_ids != runs["without"][0].token_ids


def test_vision_without_landmark_modules_has_only_pixel_input(tmp_path):
    """A checkpoint without the landmark pathway exports a pixels-only vision encoder, and the adapter
    then feeds pixels only."""
    plain = build_random_model(PRESET, landmarks=False)
    vision = export_vision(plain, tmp_path)
    assert [i["name"] for i in vision["inputs"]] == ["pixel_values"]
    manifest = {"preprocess": {"image_size": 224, "image_tokens": 256, "mean": [0.5] * 3, "std": [0.5] * 3,
                               "rescale": 1 / 255},
                "components": {"vision": {"inputs": vision["inputs"]}}}
    adapter = FaceLlavaAdapter(manifest)
    assert not adapter.uses_landmarks
    feeds = adapter.vision_inputs(np.zeros((224, 224, 3), np.uint8), np.zeros((68, 2)))
    assert list(feeds) == ["pixel_values"]
    np.testing.assert_allclose(feeds["pixel_values"], -1.0)
    assert clip_pixels(np.zeros((224, 224, 3), np.uint8), 224, 224, [0.5] * 3, [0.5] * 3, 1 / 255).shape == \
        (1, 3, 224, 224)


def test_image_only_preset_exports_no_video(face_llava_bundle, model):
    """The image preset has no video tower, so its bundle has no video component and no video preprocessing."""
    manifest = json.loads((face_llava_bundle / "manifest.json").read_text())
    assert model.video_tower is None
    assert "video" not in manifest["components"] and "video" not in manifest["preprocess"]
    assert not (face_llava_bundle / "video.onnx").exists()

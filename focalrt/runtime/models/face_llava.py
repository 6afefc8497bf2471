"""Face-LLaVA's runtime adapter: the authors' image transform, the landmark input and 1D position ids.

Preprocessing is the authors' LanguageBind image transform, done without torch: ToTensor (RGB, /255, float),
Resize(224, BICUBIC) of the shorter side *on the float tensor*, CenterCrop(224), Normalize (CLIP mean/std).
torchvision resizes a float tensor with `torch.nn.functional.interpolate(mode="bicubic", antialias=True,
align_corners=False)` (antialias is the default since torchvision 0.17; the authors' README installs
torch 2.5.1, whose torchvision is 0.20), with no rounding or clamping. That resampler is PIL's: a separable
cubic filter (a = -0.5) stretched by the shrink factor, weights normalised per output pixel. We build
its weight matrices in numpy and apply only the rows and columns the centre crop keeps.

Landmarks: 68 iBUG points (`focalrt.runtime.faces.landmarks68.to_68`) in pixels of the image given, divided by
its width and height. Face-LLaVA was trained on 256x256 face crops with landmarks divided by 256, which
this equals for such a crop; give the model a tight square face crop and its landmarks. Without landmarks
(None) a landmark model runs its no-landmark path, exactly what the Face-LLaVA code does when none are
given (its image inference script passes none). A model without the landmark pathway ignores them.
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.frames import check_frame

NUM_LANDMARKS = 68
# The tasks the authors recommend prompts for (assets/good_prompts, inference.py), each with one short prompt
# of ours in their style, and the input they recommend for it: emotion and deepfake detection on video,
# the rest on images. The bundle's manifest carries these as `prompt.tasks`; see `task_instruction`.
FACE_LLAVA_TASKS: dict[str, str] = {
    "action_units": "Which facial action units are active in this image?",
    "age": "Estimate the age of the person in the image, and explain why.",
    "facial_attributes": "Describe the facial attributes of the person in the image.",
    "emotion": "Which emotion does the person in the video show?",
    "deepfake": "Has this video been manipulated?",
}
FACE_LLAVA_TASK_INPUT = {"action_units": "image", "age": "image", "facial_attributes": "image",
                         "emotion": "video", "deepfake": "video"}


def task_instruction(profile: dict[str, Any], task: str) -> str:
    """The instruction for one of the bundle's named tasks (manifest `prompt.tasks`), e.g. "age"."""
    tasks = profile.get("tasks") or {}
    if task not in tasks:
        raise ValueError(f"task {task!r} is not one of this bundle's prompt tasks {sorted(tasks)}; "
                         f"pass the prompt text instead")
    return tasks[task]


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The antialiasing bicubic kernel (PIL's and torch's `_upsample_bicubic2d_aa`, a = -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=32)
def aa_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of an antialiased bicubic resize along one axis (align_corners=False).

    Output pixel i is centred at scale * (i + 0.5) in input pixels; when shrinking the kernel's support and
    argument are stretched by the scale, so every input pixel contributes (the antialiasing)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    lo = np.maximum(np.trunc(center - support + 0.5), 0)[:, None]
    hi = np.minimum(np.trunc(center + support + 0.5), in_size)[:, None]
    j = np.arange(in_size, dtype=np.float64)[None]
    w = np.where((j >= lo) & (j < hi), _cubic((j - center[:, None] + 0.5) * invscale), 0.0)
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    w.flags.writeable = False  # cached and shared between calls
    return w


def resized_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shortest_edge`, the longer int(size * long / short)."""
    if h <= w:
        return shortest_edge, int(shortest_edge * w / h)
    return int(shortest_edge * h / w), shortest_edge


def _resample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [len(rows), len(cols), 3] through separable weights [out, in], reading only the band of
    input rows and columns the weights touch (a centre crop keeps few of them)."""
    used_r, used_c = np.flatnonzero(rows.any(0)), np.flatnonzero(cols.any(0))
    r0, r1, c0, c1 = used_r[0], used_r[-1] + 1, used_c[0], used_c[-1] + 1
    out_h, out_w = rows.shape[0], cols.shape[0]
    part = x[r0:r1, c0:c1]
    part = (rows[:, r0:r1] @ part.reshape(r1 - r0, -1)).reshape(out_h, c1 - c0, 3)  # vertical pass
    part = np.ascontiguousarray(part.transpose(1, 0, 2)).reshape(c1 - c0, -1)  # [cols, out_h * 3]
    return (cols[:, c0:c1] @ part).reshape(out_w, out_h, 3).transpose(1, 0, 2)  # horizontal pass


def _centre_crop(new_h: int, new_w: int, crop: int) -> tuple[int, int]:
    """torchvision's CenterCrop (and CenterCropVideo) offsets: int(round(margin / 2))."""
    if new_h < crop or new_w < crop:
        raise ValueError(f"resized image {new_h}x{new_w} is smaller than the {crop}x{crop} crop; the manifest's "
                         f"resize_shortest_edge must be >= image_size")
    return int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))


def clip_pixels(image_bgr: np.ndarray, shortest_edge: int, crop: int, mean: list[float], std: list[float],
                rescale: float) -> np.ndarray:
    """BGR frame -> [1, 3, crop, crop] float32: ToTensor, Resize(shortest_edge, BICUBIC, antialias) on floats,
    CenterCrop(crop), Normalize, as the authors' torchvision transform makes them."""
    check_frame(image_bgr)
    h, w = image_bgr.shape[:2]
    new_h, new_w = resized_size(h, w, shortest_edge)
    top, left = _centre_crop(new_h, new_w, crop)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB).astype(np.float32) * np.float32(rescale)
    if (new_h, new_w) != (h, w):
        x = _resample(rgb, aa_bicubic_weights(h, new_h)[top:top + crop], aa_bicubic_weights(w, new_w)[left:left + crop])
    else:
        x = rgb[top:top + crop, left:left + crop]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


@functools.lru_cache(maxsize=32)
def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's bilinear interpolate along one axis (align_corners=False, no
    antialias): output i samples input (i + 0.5) * in / out - 0.5, clamped at 0, from its two neighbours."""
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    w = np.zeros((out_size, in_size), np.float64)
    np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(w, (np.arange(out_size), hi), frac)
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """pytorchvideo's ShortSideScale: the shorter side becomes `size`, the longer floor(size * long / short)."""
    if w < h:
        return int(np.floor(h / w * size)), size
    return size, int(np.floor(w / h * size))


def video_pixels(frames_bgr: list[np.ndarray], pre: dict[str, Any]) -> np.ndarray:
    """BGR frames -> [F, 3, S, S] float32 as the authors' LanguageBind video transform makes them: x / 255,
    NormalizeVideo (CLIP mean/std), ShortSideScale (bilinear, no antialias), CenterCropVideo.

    Normalising before the bilinear resize, as theirs does, equals normalising after it up to float rounding
    (both are per-channel affine and the weights sum to one); the order is kept anyway."""
    frames = list(frames_bgr)
    if len(frames) != int(pre["frames"]):
        raise ValueError(f"a video window holds {pre['frames']} frames (the video tower's), got {len(frames)}")
    for f in frames:
        check_frame(f)
    shapes = {f.shape[:2] for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"the frames of one window must share one size, got {sorted(shapes)}; crop or resize "
                         f"them alike (`run` does)")
    (h, w), crop = shapes.pop(), int(pre["image_size"])
    new_h, new_w = short_side_size(h, w, int(pre.get("resize_shortest_edge", crop)))
    top, left = _centre_crop(new_h, new_w, crop)
    rows = bilinear_weights(h, new_h)[top:top + crop] if (new_h, new_w) != (h, w) else None
    cols = bilinear_weights(w, new_w)[left:left + crop] if rows is not None else None
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    out = np.empty((len(frames), 3, crop, crop), np.float32)
    for i, frame in enumerate(frames):
        x = (cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32) * np.float32(pre["rescale"]) - mean) / std
        x = _resample(x, rows, cols) if rows is not None else x[top:top + crop, left:left + crop]
        out[i] = x.transpose(2, 0, 1)
    return out


def normalise_landmarks(landmarks68: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """[68, 2] pixel points of an image of size (h, w) -> [1, 68, 2] float32 in 0..1 (x / w, y / h)."""
    points = np.asarray(landmarks68, dtype=np.float32)
    if points.ndim != 2 or points.shape[0] != NUM_LANDMARKS or points.shape[1] < 2:
        raise ValueError(f"landmarks68 must be [68, 2] (x, y pixels in iBUG order), got shape {points.shape}; "
                         f"convert FaceMesh points with focalrt.runtime.faces.landmarks68.to_68")
    if not np.isfinite(points[:, :2]).all():
        raise ValueError("landmarks68 holds NaN or infinite values; pass None when no landmarks were found")
    h, w = image_hw
    return (points[:, :2] / np.array([w, h], np.float32))[None]


class FaceLlavaAdapter:
    rope_axes = 1

    def __init__(self, manifest: dict[str, Any]):
        self.pre = manifest["preprocess"]
        self.image_size = int(self.pre["image_size"])
        self.shortest_edge = int(self.pre.get("resize_shortest_edge", self.image_size))
        self.image_tokens = int(self.pre["image_tokens"])
        names = {i["name"] for i in manifest["components"]["vision"]["inputs"]}
        self.uses_landmarks = "landmarks" in names
        # Video windows (a bundle whose checkpoint had a video tower): manifest preprocess.video
        self.video = self.pre.get("video") if "video" in manifest["components"] else None
        self.video_frames = int(self.video["frames"]) if self.video else 0
        self.video_tokens_per_frame = int(self.video["tokens_per_frame"]) if self.video else 0

    def vision_inputs(self, image_bgr: np.ndarray, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
        p = self.pre
        feeds = {"pixel_values": clip_pixels(image_bgr, self.shortest_edge, self.image_size, p["mean"], p["std"],
                                             p["rescale"])}
        if self.uses_landmarks:
            if landmarks68 is None:
                feeds["landmarks"] = np.zeros((1, NUM_LANDMARKS, 2), np.float32)
                feeds["use_landmarks"] = np.array([False])
            else:
                feeds["landmarks"] = normalise_landmarks(landmarks68, image_bgr.shape[:2])
                feeds["use_landmarks"] = np.array([True])
        return feeds

    def video_inputs(self, frames_bgr: list[np.ndarray],
                     landmarks68: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The video encoder's inputs for one window: [F, 3, S, S] pixels and, for a landmark model, each
        frame's 68 points normalised by its size (all frames or none, as their loader gives them)."""
        if self.video is None:
            raise ValueError("this bundle has no video encoder (components.video); export a Face-LLaVA checkpoint "
                             "whose mm_video_tower is a local LanguageBind_Video_merge directory, or the "
                             "tiny-random-face-llava-video preset")
        feeds = {"pixel_values": video_pixels(frames_bgr, self.video)}
        if self.uses_landmarks:
            if landmarks68 is None:
                feeds["landmarks"] = np.zeros((self.video_frames, NUM_LANDMARKS, 2), np.float32)
                feeds["use_landmarks"] = np.array([False])
            else:
                if len(landmarks68) != self.video_frames or any(lm is None for lm in landmarks68):
                    raise ValueError(f"give landmarks for all {self.video_frames} frames of a window or none "
                                     f"(got {len(landmarks68)}, {sum(lm is None for lm in landmarks68)} missing)")
                feeds["landmarks"] = np.concatenate([normalise_landmarks(lm, f.shape[:2])
                                                     for lm, f in zip(landmarks68, frames_bgr, strict=True)])
                feeds["use_landmarks"] = np.array([True])
        return feeds

    def positions(self, prompt_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Llama counts positions 0..S-1 along the prompt; generated tokens continue from S."""
        return np.arange(len(prompt_ids), dtype=np.int64)[None], 0

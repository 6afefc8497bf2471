"""Per-frame face state: trained emotion and age heads plus FaceMesh geometry, for every tracked face.

This is the fast path beside the vision-language model: small models and arithmetic that run on every
frame, so a robot reading face state never waits for the decoder. Every value carries the name of what
produced it (`source`), so nobody mistakes a FER2013 classifier for the VLM's judgement:

- `emotion`: fer's mini-Xception trained on FER2013 ("fer2013-mini-xception"), on a 64x64 grayscale square
  around the detector box, as fer crops it.
- `age`: dlib-models' age predictor ("age-v1 (dlib-models)"), on a 64x64 RGB chip aligned exactly as
  dlib's `get_face_chip_details` aligns its 5 landmarks (taken here from FaceMesh), padding 0.2.
- `geometry` ("facemesh-geometry"): distances between FaceMesh landmarks (3-D, the mesh's own depth),
  divided by the inter-ocular distance (outer eye corners 33-263). They are measurements, not FACS action
  units: a wide mouth opening is not AU 26 without a trained judgement of intensity and context.
- `head_pose` ("facemesh-3d-axes"): yaw, pitch and roll in degrees of a head frame spanned by FaceMesh's
  3-D landmarks: the outer eye corners give the left-right axis, nasion (168) to chin (152) the down axis.
  Signs: yaw > 0 when the face turns toward the image's right, pitch > 0 when the chin rises, roll > 0 when
  the face tilts clockwise in the image. Zero pitch means the nasion-chin line is parallel to the image
  plane, which for most faces is a level head (within a few degrees); FaceMesh's depth is a learned
  estimate, so these are estimates good to a few degrees, not calibrated measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.backends.sessions import create_session

GEOMETRY_SOURCE = "facemesh-geometry"
POSE_SOURCE = "facemesh-3d-axes"

# FaceMesh indices. Right and left are the subject's (the right eye is at the smaller x for a frontal face).
OUTER_EYE_CORNERS = (33, 263)
EYE_LIDS = {"right": [(159, 145), (160, 144), (158, 153)], "left": [(386, 374), (387, 373), (385, 380)]}
INNER_LIPS = (13, 14)
LIP_CORNERS = (61, 291)
BROW_OVER_EYE = {"right": (105, 159), "left": (334, 386)}  # mid-brow above the upper-lid centre
# dlib's 5 points, in its order: subject's left eye outer and inner corner, right eye outer and inner, base
# of the nose (dlib interpolation.h get_face_chip_details), and their FaceMesh equivalents.
DLIB5_TEMPLATE = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                           [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                           [0.4901123135679, 0.6277975316475]])
DLIB5_FROM_FACEMESH = (263, 362, 33, 133, 2)
NASION_CHIN = (168, 152)


def _softmax_ok(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64).reshape(-1)
    return p / p.sum() if p.sum() > 0 else p


class EmotionHead:
    """FER2013 mini-Xception on onnxruntime; crop as fer does it (square on the face box, 10 % margin)."""

    def __init__(self, path: str | Path, config: dict[str, Any], providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool = True):
        self.session = create_session(path, providers, threads, spinning=spinning)
        self.input_name = config.get("input_name", self.session.get_inputs()[0].name)
        self.size = int(config.get("input_size", 64))
        self.labels = list(config["labels"])
        self.crop_scale = float(config.get("crop_scale", 1.2))
        self.source = config.get("model", "fer2013-mini-xception")

    def crop(self, frame_bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Grayscale square around the box, edge pixels repeated where it leaves the frame."""
        x1, y1, x2, y2 = (float(v) for v in box)
        side = max(x2 - x1, y2 - y1) * self.crop_scale
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
        n = max(2, int(round(side)))
        h, w = frame_bgr.shape[:2]
        pad = max(0, -left, -top, left + n - w, top + n - h)
        gray = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
        if pad:
            gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        return gray[top + pad:top + pad + n, left + pad:left + pad + n]

    def inputs(self, gray_face: np.ndarray) -> np.ndarray:
        """fer's arithmetic: bilinear resize to 64x64, /255, -0.5, *2."""
        x = cv2.resize(gray_face, (self.size, self.size)).astype(np.float32) / 255.0
        return ((x - 0.5) * 2.0)[None, None]

    def probabilities(self, frame_bgr: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
        """[N, 7] probabilities in `labels` order, one row per box (the graph takes one face at a time)."""
        rows = [self.session.run(None, {self.input_name: self.inputs(self.crop(frame_bgr, b))})[0][0]
                for b in boxes]
        return np.asarray(rows, np.float32).reshape(len(boxes), len(self.labels))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation taking src points to dst (Umeyama), as 2x3."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    r = u @ d @ vt
    scale = np.trace(np.diag(sig) @ d) / (s0 ** 2).sum(1).mean()
    a = scale * r
    return np.concatenate([a, (md - a @ ms)[:, None]], axis=1)


def dlib_chip(frame_rgb: np.ndarray, landmarks: np.ndarray, size: int, padding: float) -> np.ndarray:
    """The size x size chip dlib's get_face_chip_details + extract_image_chip cut for these landmarks.

    dlib puts pixel centres at integer coordinates; FaceMesh's are at i + 0.5, hence the -0.5. Like
    extract_image_chip, the image is first halved (a Gaussian pyramid level) while the chip would sample
    it more than 2x sparser than its pixels, then sampled bilinearly.
    """
    template = (padding + DLIB5_TEMPLATE) / (2 * padding + 1) * size
    points = landmarks[list(DLIB5_FROM_FACEMESH), :2].astype(np.float64) - 0.5
    m = similarity_transform(template, points)  # chip -> frame
    image = frame_rgb
    scale = math.hypot(m[0, 0], m[1, 0])
    if scale > 2.0:
        corners = m[:, :2] @ np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64).T + m[:, 2:]
        x0 = max(0, int(corners[0].min()) - 4)
        y0 = max(0, int(corners[1].min()) - 4)
        x1, y1 = int(corners[0].max()) + 5, int(corners[1].max()) + 5
        image = frame_rgb[y0:y1, x0:x1]
        m = m.copy()
        m[:, 2] -= (x0, y0)
        while scale > 2.0 and min(image.shape[:2]) > 2:
            image = cv2.pyrDown(image)
            m = m / 2.0
            scale /= 2.0
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class AgeHead:
    """dlib-models' age-v1: aligned 64x64 RGB chip, (pixel - mean) / 256, 81 classes -> expected age."""

    def __init__(self, path: str | Path, config: dict[str, Any], providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool = True):
        self.session = create_session(path, providers, threads, spinning=spinning)
        self.input_name = config.get("input_name", self.session.get_inputs()[0].name)
        self.size = int(config.get("input_size", 64))
        self.mean = np.asarray(config["mean"], np.float32)
        self.scale = np.float32(config.get("scale", 1 / 256))
        self.padding = float(config.get("chip", {}).get("padding", 0.2))
        self.weights = np.asarray(config["age_weights"], np.float32)
        self.source = config.get("model", "age-v1 (dlib-models)")

    def inputs(self, chips_rgb: list[np.ndarray]) -> np.ndarray:
        """The package's own order of arithmetic: float32, minus the means, divided by 256, NHWC -> NCHW."""
        x = np.stack(chips_rgb).astype(np.float32)
        x -= self.mean
        x *= self.scale  # 1/256 is a power of two: the same bits as dividing by 256
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def expected_ages(self, frame_bgr: np.ndarray, landmarks: list[np.ndarray]) -> np.ndarray:
        if not landmarks:
            return np.zeros(0, np.float32)
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        chips = [dlib_chip(rgb, lm, self.size, self.padding) for lm in landmarks]
        probs = self.session.run(None, {self.input_name: self.inputs(chips)})[0]
        return (probs.astype(np.float32) * self.weights).sum(axis=1)


def _dist(points: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(points[a] - points[b]))


def face_geometry(landmarks: np.ndarray) -> dict[str, float]:
    """Landmark distances over the inter-ocular distance (outer eye corners), in 3-D FaceMesh coordinates."""
    p = np.asarray(landmarks, np.float64)[:, :3]
    iod = max(_dist(p, *OUTER_EYE_CORNERS), 1e-6)
    out = {f"eye_openness_{side}": float(np.mean([_dist(p, a, b) for a, b in pairs])) / iod
           for side, pairs in EYE_LIDS.items()}
    out["mouth_opening"] = _dist(p, *INNER_LIPS) / iod
    out["lip_corner_spread"] = _dist(p, *LIP_CORNERS) / iod
    for side, (brow, lid) in BROW_OVER_EYE.items():
        out[f"brow_height_{side}"] = _dist(p, brow, lid) / iod
    out["inter_ocular_px"] = iod
    return out


def head_pose(landmarks: np.ndarray) -> dict[str, float]:
    """Yaw, pitch, roll in degrees from a head frame built on FaceMesh's 3-D landmarks (module docstring).

    X runs from the right to the left outer eye corner, Y from the nasion to the chin made orthogonal to X,
    Z = X x Y; R = [X Y Z] in camera axes (x right, y down, z away) is decomposed as Ry(yaw) Rx(pitch) Rz(roll).
    """
    p = np.asarray(landmarks, np.float64)[:, :3]
    x = p[OUTER_EYE_CORNERS[1]] - p[OUTER_EYE_CORNERS[0]]
    x /= max(np.linalg.norm(x), 1e-9)
    y = p[NASION_CHIN[1]] - p[NASION_CHIN[0]]
    y -= (y @ x) * x
    y /= max(np.linalg.norm(y), 1e-9)
    r = np.stack([x, y, np.cross(x, y)], axis=1)
    pitch = math.asin(float(np.clip(-r[1, 2], -1.0, 1.0)))
    yaw = math.atan2(r[0, 2], r[2, 2])
    roll = math.atan2(r[1, 0], r[1, 1])
    return {"yaw_deg": -math.degrees(yaw), "pitch_deg": -math.degrees(pitch), "roll_deg": math.degrees(roll)}


@dataclass
class FaceStateEstimator:
    """Emotion, age, geometry and pose for the faces of one frame; optional EMA smoothing per face id.

    `smooth` is the weight of the previous smoothed value (0 = off, 0.6 = a time constant of ~2 frames).
    """

    emotion: EmotionHead | None = None
    age: AgeHead | None = None
    smooth: float = 0.0
    _last: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_bundle_entry(cls, faces_dir: str | Path, entry: dict[str, Any], providers: list[str] | None = None,
                          smooth: float = 0.0, threads: int | None = None,
                          spinning: bool = True) -> FaceStateEstimator:
        """Heads named in a bundle's face_models entry (file names relative to `faces_dir`); missing heads
        (bundles exported before them, or with --no-face-heads) leave those fields out of the state.
        `threads` and `spinning` set the heads' intra-op pools (`sessions.create_session`)."""
        faces_dir = Path(faces_dir)
        emotion = EmotionHead(faces_dir / entry["emotion"]["file"], entry["emotion"], providers, threads, spinning) \
            if "emotion" in entry else None
        age = AgeHead(faces_dir / entry["age"]["file"], entry["age"], providers, threads, spinning) \
            if "age" in entry else None
        if not 0.0 <= smooth < 1.0:
            raise ValueError(f"--smooth must be in [0, 1), got {smooth}")
        return cls(emotion, age, smooth)

    def sibling(self) -> FaceStateEstimator:
        """The same heads (sessions shared, not reloaded) with a smoothing history of its own: one per camera,
        since face ids and their EMA belong to one source."""
        return FaceStateEstimator(self.emotion, self.age, self.smooth)

    def estimate(self, frame_bgr: np.ndarray, boxes: list[np.ndarray], landmarks: list[np.ndarray],
                 face_ids: list[int]) -> list[dict[str, Any]]:
        """One state dict per face: emotion, age, geometry, head_pose, each with its source."""
        probs = self.emotion.probabilities(frame_bgr, boxes) if self.emotion and boxes else None
        ages = self.age.expected_ages(frame_bgr, landmarks) if self.age and landmarks else None
        states = []
        for i, (lm, face_id) in enumerate(zip(landmarks, face_ids, strict=True)):
            values: dict[str, Any] = {}
            if probs is not None:
                values["emotion"] = dict(zip(self.emotion.labels, _softmax_ok(probs[i]).tolist(), strict=True))
            if ages is not None:
                values["age"] = float(ages[i])
            values["geometry"] = face_geometry(lm)
            values["head_pose"] = head_pose(lm)
            states.append(self._with_sources(self._smoothed(face_id, values)))
        for gone in set(self._last) - set(face_ids):
            del self._last[gone]
        return states

    def _smoothed(self, face_id: int, values: dict[str, Any]) -> dict[str, Any]:
        if self.smooth <= 0.0:
            return values
        last = self._last.get(face_id)
        if last is not None:
            values = _ema(last, values, self.smooth)
        self._last[face_id] = values
        return values

    def _with_sources(self, v: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if "emotion" in v:
            label = max(v["emotion"], key=v["emotion"].get)
            state["emotion"] = {"label": label, "probabilities": {k: round(p, 4) for k, p in v["emotion"].items()},
                                "source": self.emotion.source}
        if "age" in v:
            state["age"] = {"expected": round(v["age"], 1), "source": self.age.source}
        state["geometry"] = {**{k: round(x, 4) for k, x in v["geometry"].items()}, "source": GEOMETRY_SOURCE}
        state["head_pose"] = {**{k: round(x, 2) for k, x in v["head_pose"].items()}, "source": POSE_SOURCE}
        if self.smooth > 0:
            state["smoothing"] = {"ema": self.smooth}
        return state


def _ema(old: Any, new: Any, keep: float) -> Any:
    if isinstance(new, dict):
        return {k: _ema(old.get(k, v), v, keep) if isinstance(old, dict) else v for k, v in new.items()}
    if isinstance(new, float) and isinstance(old, float):
        return keep * old + (1.0 - keep) * new
    return new

"""Face front end on onnxruntime: BlazeFace detection, then the 468-point FaceMesh on a rotated crop.

This follows MediaPipe's face detection and face mesh graphs (anchors, box coder, ROI rule, input ranges)
so the converted models see the inputs they were trained on. Coordinates are continuous frame pixels:
x=0 is the left edge of the frame and x=W its right edge, so a pixel's centre is at i + 0.5.

Keypoint order of a Detection (MediaPipe's): 0 right eye, 1 left eye, 2 nose tip, 3 mouth centre,
4 right ear tragion, 5 left ear tragion. Right and left are the subject's: for a person facing the
camera the right eye is at the smaller x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from focalrt.runtime.backends.sessions import create_session
from focalrt.runtime.frames import check_frame

KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion",
                  "left_ear_tragion")


@dataclass
class Detection:
    box: np.ndarray        # [4] float32 x1, y1, x2, y2 in frame pixels
    score: float           # sigmoid confidence
    keypoints: np.ndarray  # [6, 2] float32 frame pixels, order KEYPOINT_NAMES


@dataclass
class Face:
    box: np.ndarray        # [4] x1, y1, x2, y2 from the detector
    score: float           # detector confidence
    keypoints: np.ndarray  # [6, 2], order KEYPOINT_NAMES
    landmarks: np.ndarray  # [468, 3] x, y in frame pixels, z (depth, smaller = closer) in the same scale
    presence: float        # FaceMesh's own face-presence probability for the crop


def ssd_anchors(options: dict[str, Any], input_size: int) -> np.ndarray:
    """Anchor centres [N, 2] (x, y, normalised), in the order the model's outputs use.

    MediaPipe's rule: consecutive layers with the same stride share one feature map of
    ceil(input / stride) cells; every layer adds one anchor per aspect ratio to each cell, plus one more
    when interpolated_scale_aspect_ratio > 0. With fixed_anchor_size all anchors are 1x1, so only the
    centres matter. Short range: 16x16x2 + 8x8x6 = 896; full range: 48x48x1 = 2304.
    """
    strides = list(options["strides"])
    if len(strides) != options["num_layers"]:
        raise ValueError(f"anchor options: {len(strides)} strides for {options['num_layers']} layers")
    if not options.get("fixed_anchor_size", True):
        raise ValueError("anchor options: only fixed_anchor_size=true is supported (all face models use it)")
    per_layer = len(options.get("aspect_ratios", [1.0])) + (
        1 if options.get("interpolated_scale_aspect_ratio", 0.0) > 0 else 0)
    off_x, off_y = options.get("anchor_offset_x", 0.5), options.get("anchor_offset_y", 0.5)
    centres = []
    layer = 0
    while layer < len(strides):
        stride = strides[layer]
        same = 0
        while layer + same < len(strides) and strides[layer + same] == stride:
            same += 1
        cells = math.ceil(input_size / stride)
        ys, xs = np.meshgrid((np.arange(cells) + off_y) / cells, (np.arange(cells) + off_x) / cells,
                             indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, same * per_layer, axis=0))
        layer += same
    return np.concatenate(centres).astype(np.float32)


def _to_input(rgb: np.ndarray, layout: str, low: float, high: float) -> np.ndarray:
    x = rgb.astype(np.float32) * ((high - low) / 255.0) + low
    return (x.transpose(2, 0, 1) if layout == "NCHW" else x)[None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))  # clip: exp overflows float32 past ~88


def _iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


class FaceDetector:
    """BlazeFace: letterbox to SxS, decode the SSD outputs, weighted NMS, undo the letterbox.

    NMS: cv2.dnn.NMSBoxes picks the survivors; each survivor's box and keypoints are then replaced by the
    score-weighted mean of all candidates overlapping it above the IoU threshold, as MediaPipe's WEIGHTED
    overlap mode does. Averaging the overlapping anchors (8 on the astronaut photo) steadies boxes between
    video frames.
    """

    def __init__(self, path: str | Path, config: dict[str, Any], providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool = True):
        self.session = create_session(path, providers, threads, spinning=spinning)
        self.size = int(config["input_size"])
        self.layout = config.get("input_layout", "NCHW")
        self.input_name = config.get("input_name", self.session.get_inputs()[0].name)
        self.output_names = [config["outputs"]["boxes"], config["outputs"]["scores"]]
        self.box_scale = float(config.get("box_scale", self.size))
        self.score_threshold = float(config.get("score_threshold", 0.5))
        self.iou_threshold = float(config.get("nms_iou_threshold", 0.3))
        self.score_clip = float(config.get("score_clip", 100.0))
        self.low, self.high = config.get("input_range", [-1.0, 1.0])
        self.anchors = ssd_anchors(config["anchors"], self.size)
        expected = config.get("num_anchors", len(self.anchors))
        if len(self.anchors) != expected:
            raise ValueError(f"{path}: anchor options give {len(self.anchors)} anchors, the manifest says "
                             f"{expected}; the manifest's detector.anchors do not match this model")

    def letterbox(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, float, float, int, int]:
        """RGB SxS image with the frame centred; returns it with x/y scales and the x/y padding."""
        h, w = frame_bgr.shape[:2]
        scale = min(self.size / w, self.size / h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR  # area: no aliasing when shrinking
        resized = cv2.resize(frame_bgr, (new_w, new_h), interpolation=interp)
        pad_x, pad_y = (self.size - new_w) // 2, (self.size - new_h) // 2
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
        return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), new_w / w, new_h / h, pad_x, pad_y

    def raw_outputs(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model outputs for one SxS RGB uint8 image: regressors [N, 16] and logits [N]."""
        boxes, scores = self.session.run(self.output_names,
                                         {self.input_name: _to_input(image_rgb, self.layout, self.low,
                                                                     self.high)})
        return boxes.reshape(len(self.anchors), -1), scores.reshape(-1)

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        frame_bgr = check_frame(frame_bgr, "frame")
        image, sx, sy, pad_x, pad_y = self.letterbox(frame_bgr)
        raw, logits = self.raw_outputs(image)
        scores = _sigmoid(np.clip(logits, -self.score_clip, self.score_clip))
        keep = np.flatnonzero(scores >= self.score_threshold)
        if keep.size == 0:
            return []
        # Box coder: offsets are in input pixels relative to the anchor centre; anchors are 1x1.
        raw, scores = raw[keep] / self.box_scale, scores[keep]
        points = raw.reshape(len(keep), -1, 2)  # [cx,cy], [w,h], then 6 keypoints
        centre = points[:, 0] + self.anchors[keep]
        half = points[:, 1] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1) * self.size
        keypoints = (points[:, 2:] + self.anchors[keep][:, None]) * self.size
        valid = np.flatnonzero((half > 0).all(axis=1))
        boxes, keypoints, scores = boxes[valid], keypoints[valid], scores[valid]
        if len(valid) == 0:
            return []
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        chosen = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.score_threshold, self.iou_threshold)
        detections = []
        for i in np.asarray(chosen, dtype=np.int64).reshape(-1):
            members = np.flatnonzero(_iou_with(boxes[i], boxes) > self.iou_threshold)
            members = np.union1d(members, [i])
            weight = scores[members] / scores[members].sum()
            box = (boxes[members] * weight[:, None]).sum(axis=0)
            kps = (keypoints[members] * weight[:, None, None]).sum(axis=0)
            # Undo the letterbox: input pixels -> frame pixels.
            box = (box - [pad_x, pad_y, pad_x, pad_y]) / [sx, sy, sx, sy]
            kps = (kps - [pad_x, pad_y]) / [sx, sy]
            detections.append(Detection(box.astype(np.float32), float(scores[i]), kps.astype(np.float32)))
        return detections


def roi_transform(detection: Detection, size: int, scale: float) -> np.ndarray:
    """2x3 affine from crop pixel indices to frame pixel indices, for a square crop of `size` pixels.

    MediaPipe's ROI: centred on the detection box, side = scale * max(box w, box h), rotated by the
    angle of the line from the right eye to the left eye so that the eyes are level in the crop.
    """
    x1, y1, x2, y2 = (float(v) for v in detection.box)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    side = scale * max(x2 - x1, y2 - y1)
    dx, dy = detection.keypoints[1] - detection.keypoints[0]
    angle = math.atan2(float(dy), float(dx))
    k = side / size
    a = k * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    # continuous frame point = centre + a @ (u - size/2) for continuous crop point u; pixel index = u - 0.5.
    b = centre - 0.5 + a @ np.full(2, 0.5 - size / 2)
    return np.concatenate([a, b[:, None]], axis=1)


class FaceLandmarker:
    """FaceMesh on a rotated square crop around a detection; landmarks mapped back to the frame."""

    def __init__(self, path: str | Path, config: dict[str, Any], providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool = True):
        self.session = create_session(path, providers, threads, spinning=spinning)
        self.size = int(config.get("input_size", 192))
        self.layout = config.get("input_layout", "NCHW")
        self.input_name = config.get("input_name", self.session.get_inputs()[0].name)
        self.output_names = [config["outputs"]["landmarks"], config["outputs"]["presence"]]
        self.low, self.high = config.get("input_range", [0.0, 1.0])
        self.roi_scale = float(config.get("roi_scale", 1.5))
        self.num_landmarks = int(config.get("num_landmarks", 468))

    def crop(self, frame_bgr: np.ndarray, detection: Detection) -> tuple[np.ndarray, np.ndarray]:
        """The RGB crop the model sees and the crop->frame affine."""
        m = roi_transform(detection, self.size, self.roi_scale)
        patch = cv2.warpAffine(frame_bgr, m, (self.size, self.size),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
        return cv2.cvtColor(patch, cv2.COLOR_BGR2RGB), m

    def raw_outputs(self, crop_rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """Landmarks [468, 3] in crop pixels and the presence logit, for one SxS RGB uint8 crop."""
        coords, logit = self.session.run(self.output_names,
                                         {self.input_name: _to_input(crop_rgb, self.layout, self.low,
                                                                     self.high)})
        return coords.reshape(self.num_landmarks, 3), float(np.asarray(logit).reshape(-1)[0])

    def landmarks_and_presence(self, frame_bgr: np.ndarray, detection: Detection) -> tuple[np.ndarray, float]:
        frame_bgr = check_frame(frame_bgr, "frame")
        crop, m = self.crop(frame_bgr, detection)
        coords, logit = self.raw_outputs(crop)
        a, b = m[:, :2], m[:, 2]
        # Crop coordinates are continuous (0..S); shift to pixel indices, map, shift back.
        xy = (coords[:, :2] - 0.5) @ a.T + b + 0.5
        z = coords[:, 2:] * (a[0, 0] ** 2 + a[1, 0] ** 2) ** 0.5  # crop pixels -> frame pixels
        return np.concatenate([xy, z], axis=1).astype(np.float32), float(_sigmoid(np.float64(logit)))

    def landmarks(self, frame_bgr: np.ndarray, detection: Detection) -> np.ndarray:
        """[468, 3] landmarks in frame pixels; see landmarks_and_presence for the presence score."""
        return self.landmarks_and_presence(frame_bgr, detection)[0]


class FaceAnalyzer:
    """Detector + landmarker. Faces the FaceMesh itself rejects (presence < threshold) are dropped."""

    def __init__(self, detector: FaceDetector, landmarker: FaceLandmarker, presence_threshold: float = 0.5):
        self.detector = detector
        self.landmarker = landmarker
        self.presence_threshold = presence_threshold

    @classmethod
    def from_dir(cls, faces_dir: str | Path, manifest_entry: dict[str, Any],
                 providers: list[str] | None = None, full_range: bool = False, threads: int | None = None,
                 spinning: bool = True) -> FaceAnalyzer:
        """Load the models named in `manifest_entry`, whose file names are relative to `faces_dir`.

        For a bundle (whose manifest names them "faces/...") pass the bundle directory and
        manifest["face_models"]; for export_face_models(out), pass `out` and the entry it returned.
        `threads` and `spinning` set the sessions' intra-op pools (`sessions.create_session`).
        """
        faces_dir = Path(faces_dir)
        key = "detector_full_range" if full_range else "detector"
        for needed in (key, "landmarks"):
            if needed not in manifest_entry:
                raise ValueError(f"face manifest entry has no {needed!r} (has {sorted(manifest_entry)}); "
                                 f"re-export the face models"
                                 + (" or drop full_range" if needed == "detector_full_range" else ""))
        det, lm = manifest_entry[key], manifest_entry["landmarks"]
        return cls(FaceDetector(faces_dir / det["file"], det, providers, threads, spinning),
                   FaceLandmarker(faces_dir / lm["file"], lm, providers, threads, spinning),
                   float(lm.get("presence_threshold", 0.5)))

    def analyze(self, frame_bgr: np.ndarray) -> list[Face]:
        frame_bgr = check_frame(frame_bgr, "frame")
        faces = []
        for det in self.detector.detect(frame_bgr):
            points, presence = self.landmarker.landmarks_and_presence(frame_bgr, det)
            if presence >= self.presence_threshold:
                faces.append(Face(det.box, det.score, det.keypoints, points, presence))
        return faces

"""Shared fixtures for the face tests: the face models converted once per session and the astronaut's
face found with them. The photo itself is tests/conftest.py's `astronaut_bgr`.

Import them into a test module with `from faces_fixtures import fixture_...  # noqa: F401`; the
functions carry a `fixture_` prefix so that a test's argument does not shadow the imported name.
"""

from __future__ import annotations

import pytest

from focalrt.export.face_models import export_face_models
from focalrt.runtime.faces.detection import FaceAnalyzer

# Hand-checked on a 3x enlargement with a 10 px grid: hairline (y 73) to chin (y 178), skin edge of the
# left cheek in the image (x 180) to the right one (x 275), ears and hair excluded.
ASTRONAUT_FACE = (180.0, 73.0, 275.0, 178.0)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="session", name="face_models")
def fixture_face_models(tmp_path_factory):
    """(directory, manifest entry) of the converted detector(s) and FaceMesh."""
    out = tmp_path_factory.mktemp("faces")
    return out, export_face_models(out)


@pytest.fixture(scope="session", name="analyzer")
def fixture_analyzer(face_models) -> FaceAnalyzer:
    out, entry = face_models
    return FaceAnalyzer.from_dir(out, entry, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session", name="astronaut_face")
def fixture_astronaut_face(analyzer, astronaut_bgr):
    faces = analyzer.analyze(astronaut_bgr)
    assert len(faces) == 1, f"expected one face on the astronaut photo, got {len(faces)}"
    return faces[0]

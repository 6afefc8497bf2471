"""`focalrt serve` on Triton (PyTriton) with the tiny-random bundle: answers, errors, disconnects, SIGTERM, and
`focalrt run --server` against a local run.

One server is shared by the module (Triton takes seconds to start); the SIGTERM test stops it and runs last.
The server runs under FOCALRT_SERVE_PYTHON when set (CI: a venv with numpy<2, which PyTriton 0.7 needs), else
under this interpreter. Without the serve extra the Triton tests skip; with FOCALRT_SERVE_PYTHON set they
fail instead, so CI cannot skip them by accident.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from focalrt.serve.requests import Limits, RequestError, decode_describe

FRAMES = 4


# ---- request checks, no server needed ----

def _image_req(frame: np.ndarray, **more):
    base = {"image": np.array([[frame.tobytes()]], dtype=object),
            "image_shape": np.array([frame.shape[:2]], np.int64)}
    if "image" in more:  # encoded bytes instead of raw pixels
        del base["image_shape"]
    base.update(more)
    return base


@pytest.mark.parametrize("bad, message", [
    ({"image": np.array([[b"GIF89a not really"]], dtype=object), "boxes": np.array([[[1, 1, 5, 5]]])},
     "not a decodable image"),
    ({"boxes": np.array([[[500, 500, 600, 600]]])}, "lies outside the 64x48 image"),
    ({"boxes": np.array([[[10, 10, 5, 20]]])}, "is empty"),
    ({"regions": np.array([[b"mouthh"]], dtype=object)}, "unknown region 'mouthh'"),
    ({"boxes": np.array([[[1, 1, 5, 5]]]), "schema": np.array([[b"{not json"]], dtype=object)},
     "schema does not compile"),
    ({"boxes": np.array([[[1, 1, 5, 5]]]), "prompt": np.array([[b"x" * 3000]], dtype=object)},
     "at most 2000"),
    ({"boxes": np.array([[[1, 1, 5, 5]]]), "max_new_tokens": np.array([[100000]])}, "max_new_tokens=100000"),
    ({}, "nothing to describe"),
])
def test_malformed_request_is_refused_with_its_reason(bad, message):
    image = np.zeros((48, 64, 3), np.uint8)
    request = _image_req(image, **bad)
    with pytest.raises(RequestError, match=message):
        decode_describe(request, Limits())


def test_raw_image_of_wrong_size_and_schema_not_supported_are_explained():
    image = np.zeros((48, 64, 3), np.uint8)
    short = _image_req(image, boxes=np.array([[[1, 1, 5, 5]]]))
    short["image"] = np.array([[image.tobytes()[:-3]]], dtype=object)
    with pytest.raises(RequestError, match="needs 9216 bytes, got 9213"):
        decode_describe(short, Limits())
    schema = _image_req(image, boxes=np.array([[[1, 1, 5, 5]]]), schema=np.array([[b'{"type": "object"}']],
                                                                                 dtype=object))
    with pytest.raises(RequestError, match="not supported by this server's runtime yet"):
        decode_describe(schema, Limits(), schema_supported=False)
    ok = decode_describe(_image_req(image, boxes=np.array([[[-5, 1, 5, 5]]])), Limits())
    assert ok.boxes == [(-5, 1, 5, 5)] and ok.image.shape == (48, 64, 3)  # partly outside: clipped later


def test_client_without_tritonclient_names_the_extra(monkeypatch):
    from focalrt.serve.client import ServerClient

    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)
    hint = (r'pip install "tritonclient\[http\]>=2.50" '
            r'\(the \[client\] extra; in a focalrt checkout: pip install -e "\.\[client\]"\)')
    with pytest.raises(RuntimeError, match=r"needs tritonclient: " + hint):
        ServerClient("http://127.0.0.1:9")


def test_serve_under_an_unusable_environment_says_why_in_one_line(tmp_path):
    """Under numpy 2 (PyTriton 0.7's stub returns empty outputs) or without PyTriton: exit 2, one line."""
    from focalrt.serve.process import serve_python_problem

    if serve_python_problem(sys.executable) is None:
        pytest.skip("this interpreter can serve; the refusal is for numpy 2 or a missing serve extra")
    done = subprocess.run([sys.executable, "-m", "focalrt.cli", "serve", str(tmp_path / "no-bundle")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("focalrt serve: ")
    assert 'pip install -e ".[serve]"' in lines[0]


def test_run_with_no_server_at_the_url_says_so_in_one_line(tiny_bundle, tmp_path):
    pytest.importorskip("tritonclient.http")
    from focalrt.serve.process import free_ports

    url = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source",
                           str(tmp_path), "--box", "1,1,50,50", "--server", url, "--server-timeout", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"focalrt run: error: no focalrt server is ready at {url} (GET /v2/models/describe/ready failed); "
        f"start one with `focalrt serve BUNDLE` or fix --server")


def test_run_refuses_threads_with_server_in_one_line(tiny_bundle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(tmp_path),
                           "--box", "1,1,50,50", "--server", "http://127.0.0.1:9", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "with --server the VLM runs on the server; drop --threads" in lines[0]


def _window_req(frames: list[np.ndarray], **more):
    base = {"video_frames": np.array([[f.tobytes() for f in frames]], dtype=object),
            "image_shape": np.array([frames[0].shape[:2]], np.int64)}
    base.update(more)
    return base


def test_video_window_requests_are_bounded_before_any_pixel_is_read():
    from focalrt.serve.requests import decode_window

    frames = [np.full((32, 32, 3), i, np.uint8) for i in range(8)]
    ok = decode_window(_window_req(frames, video_landmarks68=np.zeros((1, 8, 68, 2), np.float32)), Limits(), 8)
    assert ok.image is None and len(ok.window.frames) == 8 and len(ok.window.landmarks68) == 8
    np.testing.assert_array_equal(ok.window.frames[3], frames[3])
    for request, frames_expected, limits, message in [
        (_window_req(frames[:7]), 8, Limits(), "has 7 frames; this bundle's video encoder takes exactly 8"),
        (_window_req(frames), 0, Limits(), "this bundle has no video encoder"),
        (_window_req(frames), 8, Limits(max_image_bytes=8 * 32 * 32 * 3 - 1), "accepts at most 24575"),
        (_window_req(frames, image=np.array([[b"x"]], dtype=object)), 8, Limits(), "not both"),
        (_window_req(frames, video_landmarks68=np.zeros((1, 7, 68, 2), np.float32)), 8, Limits(),
         "must be 8 x 68 finite"),
        ({**_window_req(frames), "image_shape": np.array([[32, 31]], np.int64)}, 8, Limits(), "frame 0: a raw BGR"),
    ]:
        with pytest.raises(RequestError, match=message):
            decode_window(request, limits, frames_expected)
    # a window of 1000 frames is refused by its count, before its bytes are summed or read
    many = {"video_frames": np.array([[b""] * 1000], dtype=object), "image_shape": np.array([[32, 32]], np.int64)}
    with pytest.raises(RequestError, match="has 1000 frames"):
        decode_window(many, Limits(), 8)


class _AwayClient:
    """A ServerClient whose server is ready at start, then answers nothing for `outage` calls."""

    def __init__(self, url: str, outage: int):
        self.url, self.outage, self.calls = url, outage, 0

    def is_ready(self) -> bool:
        return True

    def describe_many(self, requests):
        self.calls += 1
        if self.calls <= self.outage:
            raise ConnectionRefusedError(111, "Connection refused")
        from focalrt.serve.client import Result

        return [[Result("box", -1, (0, 0, 4, 4), "hi", [1, 2], "stop", {})] for _ in requests]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("outage, lost", [(2, False), (99, True)])
def test_a_server_that_goes_away_is_retried_with_the_cameras_backoff_then_lost(tiny_bundle, monkeypatch, outage, lost,
                                                                              capsys):
    import focalrt.serve.client as client_module

    fake = _AwayClient("127.0.0.1:9", outage)
    monkeypatch.setattr(client_module, "ServerClient", lambda url: fake)
    remote = client_module.RemotePipeline(tiny_bundle, "http://127.0.0.1:9", reconnect_attempts=3, backoff_s=0.0)
    views = [(np.zeros((8, 8, 3), np.uint8), [(0, 0, 4, 4), (1, 1, 5, 5)], None)]
    if lost:
        with pytest.raises(client_module.ServerLost, match="after 3 reconnect attempts"):
            remote.describe_images(views)
        assert remote.stats | {"waited_for_server_s": 0} == {"requests": 0, "outages": 1, "retries": 3,
                                                              "reconnects": 0, "undescribed": 2,
                                                              "waited_for_server_s": 0}
    else:
        assert [d.text for d in remote.describe_images(views)[0]] == ["hi"]
        assert remote.stats | {"waited_for_server_s": 0} == {"requests": 1, "outages": 1, "retries": 2,
                                                              "reconnects": 1, "undescribed": 0,
                                                              "waited_for_server_s": 0}
    assert capsys.readouterr().err.count("is not answering (ConnectionRefusedError); retrying up to 3") == 1


# ---- the server ----

@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory, serve_usable):
    from focalrt.serve.process import start_server

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # batches of at most 4 leave as soon as they are full; a long queue delay makes merging certain, not timed
    srv = start_server(tiny_bundle, log, ["--max-batch", "4", "--queue-delay-us", "1000000",
                                          "--max-prompt-chars", "100000", "--exit-timeout", "60"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from focalrt.serve.client import ServerClient

    with ServerClient(server.url, timeout_s=300, concurrency=16) as c:
        yield c


def test_startup_puts_this_interpreters_libpython_first(server):
    """The pyenv trap: the stub must load the serving interpreter's libpython, and the server says so."""
    from focalrt.serve.process import serve_python

    code = ("import json, os, sys\nfrom focalrt.serve.environment import fix_libpython\n"
            "env = {k: v for k, v in os.environ.items() if k != 'LD_LIBRARY_PATH'}\n"
            "c = fix_libpython(env)\n"
            "print(json.dumps({'own': str(c.own), 'after': str(c.after), 'ok': c.ok, 'fixed': c.fixed, "
            "'ld': env.get('LD_LIBRARY_PATH', '')}))\n")
    done = subprocess.run([serve_python(), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check = json.loads(done.stdout)
    assert check["ok"], check
    assert os.path.realpath(check["own"]) == os.path.realpath(check["after"])
    if check["fixed"]:  # under pyenv (CI, here) the system libpython would have been picked
        assert check["ld"].split(os.pathsep)[0] == os.path.dirname(check["own"])
    assert "Triton Python stub loads this interpreter's" in server.log()


def test_every_request_gets_exactly_one_answer_with_the_local_tokens(client, pipe, astronaut_bgr):
    boxes = [(40 + 12 * i, 60 + 9 * i, 200 + 12 * i, 230 + 9 * i) for i in range(10)]
    answers = client.describe_many([dict(image=astronaut_bgr, boxes=[b], max_new_tokens=6) for b in boxes])
    assert len(answers) == len(boxes)
    for box, results in zip(boxes, answers, strict=True):
        assert len(results) == 1
        r = results[0]
        assert r.box == box and r.region == "box" and r.face_id == -1
        local = pipe.describe_images([(astronaut_bgr, [box], None)], max_new_tokens=6)[0][0]
        assert r.token_ids == local.token_ids and r.text == local.text and r.finish_reason == local.finish_reason
    # Triton merged requests into batches that went through one describe_images call
    assert max(r[0].timings_ms["batch_requests"] for r in answers) > 1


def test_named_regions_and_faces_model_find_the_face(client, astronaut_bgr):
    import cv2

    jpeg = cv2.imencode(".jpg", astronaut_bgr)[1].tobytes()
    results = client.describe(jpeg, regions=["mouth", "left_eye"], max_new_tokens=3)
    assert [r.region for r in results] == ["mouth", "left_eye"] and {r.face_id for r in results} == {0}
    mouth, eye = results[0].box, results[1].box
    assert 170 <= mouth[0] < mouth[2] <= 285 and eye[3] < mouth[1]  # on the astronaut's face, eye above mouth
    faces = client.faces(astronaut_bgr, regions=["mouth"])
    assert len(faces) == 1 and faces[0]["landmarks"].shape == (468, 3)
    assert faces[0]["regions"]["mouth"] == mouth
    blank = np.zeros((120, 160, 3), np.uint8)  # no face: no results, and no error
    assert client.faces(blank) == [] and client.describe(blank, regions=["mouth"]) == []


def test_malformed_requests_get_clear_errors_and_the_rest_are_served(client, astronaut_bgr):
    from focalrt.serve.client import ServeError

    good = dict(image=astronaut_bgr, boxes=[(100, 100, 220, 220)], max_new_tokens=4)
    bad = [(dict(image=b"\x89PNG broken", boxes=[(1, 1, 5, 5)]), "not a decodable image"),
           (dict(image=astronaut_bgr, boxes=[(900, 900, 1000, 1000)]), "lies outside the 512x512 image"),
           (dict(image=astronaut_bgr, regions=["mouht"]), "unknown region 'mouht'"),
           (dict(image=astronaut_bgr, boxes=[(1, 1, 50, 50)], schema="{nope"), "schema does not compile"),
           (dict(image=astronaut_bgr, boxes=[(1, 1, 50, 50)], prompt="word " * 5000), "context holds")]
    requests = [good, *[b for b, _ in bad], good]
    answers = client.describe_many(requests, raise_errors=False)
    assert len(answers) == len(requests)
    assert not isinstance(answers[0], Exception) and not isinstance(answers[-1], Exception)
    assert answers[0][0].token_ids == answers[-1][0].token_ids
    for (_, message), answer in zip(bad, answers[1:-1], strict=True):
        assert isinstance(answer, ServeError) and message in str(answer), (message, answer)
        assert "Traceback" not in str(answer)
    assert client.describe(**good)[0].token_ids == answers[0][0].token_ids  # still serving


def test_client_that_disconnects_mid_request_does_not_wedge_the_server(server, client, astronaut_bgr):
    import tritonclient.http as httpclient

    from focalrt.serve.client import ServerClient

    # 1. a whole request, then the client gives up (network timeout) and closes while the model works on it
    impatient = ServerClient(server.url, timeout_s=0.2)
    impatient.client = httpclient.InferenceServerClient(impatient.url, network_timeout=0.2)
    with pytest.raises(Exception):  # noqa: B017 - a timeout of whichever kind geventhttpclient raises
        impatient.describe(astronaut_bgr, boxes=[(40, 40, 300, 300)], max_new_tokens=48)
    impatient.close()
    # 2. half a request body, then the connection is gone
    body = b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["' + b"A" * 4096
    head = (f"POST /v2/models/describe/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) * 4}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(head + body)
    for _ in range(3):
        assert client.describe(astronaut_bgr, boxes=[(50, 50, 150, 150)], max_new_tokens=3)[0].finish_reason
    assert server.ready() and server.process.poll() is None


def test_metrics_and_health_endpoints_are_on(server):
    metrics = server.metrics()
    assert 'nv_inference_request_success{model="describe"' in metrics
    assert server.ready()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr):
    from focalrt.demo import pan_zoom_frames, write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", pan_zoom_frames(astronaut_bgr, FRAMES))


def test_run_through_the_server_writes_the_local_events_token_for_token(server, tiny_bundle, clip, tmp_path):
    outs = {}
    for name, extra in (("local", []), ("server", ["--server", server.url])):
        outs[name] = tmp_path / f"{name}.jsonl"
        done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(clip),
                               "--regions", "mouth,left_eye", "--box", "300,300,400,400", "--max-new-tokens", "5",
                               "--out", str(outs[name]), "--quiet", *extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr

    def events(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row.pop("timings_ms")
        return rows

    local, remote = events(outs["local"]), events(outs["server"])
    described = [e for e in local if e["type"] == "description"]  # beside them: the faces' state events
    assert len(described) == FRAMES * 3 and {e["region"] for e in described} == {"mouth", "left_eye", "box"}
    assert remote == local


BLINK = {"type": "object", "properties": {"blink": {"type": "boolean"},
                                          "count": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["blink", "count"], "additionalProperties": False}


def _events(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.pop("timings_ms", None)
    return rows


@pytest.mark.parametrize("how", ["schema-file", "format-json"])
def test_run_schema_through_the_server_writes_the_local_events(server, tiny_bundle, clip, tmp_path, how):
    """--schema FILE and --format json are sent to the server; the events, their parsed `state` (or the
    `state_error` of an answer cut off at --max-new-tokens) included, equal a local run's."""
    schema = tmp_path / "blink.json"
    schema.write_text(json.dumps(BLINK))
    choice = ["--schema", str(schema)] if how == "schema-file" else ["--format", "json"]
    outs = {}
    for name, extra in (("local", []), ("server", ["--server", server.url])):
        outs[name] = tmp_path / f"{name}.jsonl"
        done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(clip),
                               "--regions", "mouth", "--box", "300,300,400,400", "--max-new-tokens", "48",
                               "--state-every", "0", "--out", str(outs[name]), "--quiet", *choice, *extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    local, remote = _events(outs["local"]), _events(outs["server"])
    described = [e for e in local if e["type"] == "description"]
    assert len(described) == FRAMES * 2 and all("state" in e for e in described)
    if how == "schema-file":  # the small schema closes: every state parsed
        assert all(set(e["state"]) == {"blink", "count"} for e in described)
    assert remote == local


def test_rows_with_different_schemas_or_none_batch_together_each_as_locally(client, pipe, astronaut_bgr):
    count = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["n"], "additionalProperties": False}
    schemas = [BLINK, None, count, BLINK, None, count]
    boxes = [(40 + 20 * i, 60 + 10 * i, 220 + 20 * i, 240 + 10 * i) for i in range(len(schemas))]
    answers = client.describe_many([dict(image=astronaut_bgr, boxes=[b], max_new_tokens=40, schema=s)
                                    for b, s in zip(boxes, schemas, strict=True)])
    assert max(a[0].timings_ms["batch_requests"] for a in answers) > 1  # mixed schemas shared a call
    for box, schema, (r,) in zip(boxes, schemas, answers, strict=True):
        local = pipe.describe_images([(astronaut_bgr, [box], None)], max_new_tokens=40,
                                    **({"schema": schema} if schema else {}))[0][0]
        assert r.token_ids == local.token_ids and r.text == local.text
        assert r.state_fields == local.state_fields()
        if schema is not None:
            assert set(r.state_fields["state"]) == set(schema["required"])
        else:
            assert r.state_fields == {}


def test_schema_the_server_cannot_compile_is_refused_naming_the_problem(client, astronaut_bgr):
    from focalrt.serve.client import ServeError

    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    with pytest.raises(ServeError, match="input 'schema': schema does not compile: .*unclosed group"):
        client.describe(astronaut_bgr, boxes=[(10, 10, 90, 90)], max_new_tokens=2, schema=bad)
    assert client.describe(astronaut_bgr, boxes=[(10, 10, 90, 90)], max_new_tokens=2)[0].token_ids


def test_a_camera_started_before_its_server_waits_and_a_server_lost_mid_run_exits_6(tiny_bundle, clip, tmp_path,
                                                                                    serve_usable):
    """The usual compose/systemd start: the camera first. It says once that it waits, then writes its events.
    A second camera loses its server mid-run: the documented exit status 6, outputs whole, the summary's
    `server` counts the outage and the regions left undescribed."""
    from focalrt.serve.process import free_ports, start_server

    ports = tuple(free_ports(3))
    url = f"http://127.0.0.1:{ports[0]}"

    def run(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(clip),
                                 "--box", "300,300,400,400", "--max-new-tokens", "3", "--out", str(out), "--quiet",
                                 "--server", url, "--server-timeout", "600", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    early = run(tmp_path / "early.jsonl")
    time.sleep(1.0)  # it is waiting before the server process even exists (not an assertion on time)
    assert early.poll() is None
    srv = start_server(tiny_bundle, tmp_path / "serve.log", ["--exit-timeout", "10"], ports=ports, wait=False)
    try:
        _, err = early.communicate(timeout=600)
        assert early.returncode == 0, err
        assert err.count("waiting for the focalrt server at") == 1
        assert len([e for e in _events(tmp_path / "early.jsonl") if e["type"] == "description"]) == FRAMES
        summary = json.loads(err.strip().splitlines()[-1].removeprefix("summary "))
        assert summary["server"]["outages"] == 0 and summary["server"]["requests"] == FRAMES

        lost = run(tmp_path / "lost.jsonl", "--loop")
        deadline = time.monotonic() + 300
        out = tmp_path / "lost.jsonl"
        while time.monotonic() < deadline and not (out.exists() and '"description"' in out.read_text()):
            assert lost.poll() is None, lost.stderr.read()
            time.sleep(0.2)
    finally:
        srv.stop()
    _, err = lost.communicate(timeout=300)
    assert lost.returncode == 6, err
    lines = err.strip().splitlines()
    assert any(line.startswith("focalrt run: server lost: server 127.0.0.1:") and "after 5 reconnect attempts"
               in line for line in lines), err
    summary = json.loads(lines[-1].removeprefix("summary "))
    assert summary["server"]["outages"] == 1 and summary["server"]["retries"] == 5
    assert summary["server"]["undescribed"] == 1  # the frame in flight: its one box
    written = _events(tmp_path / "lost.jsonl")  # every line whole
    assert [e["frame"] for e in written if e["type"] == "description"] == list(range(summary["frames"] - 1))


def test_run_video_window_through_the_server_writes_the_local_events(face_llava_video_bundle, astronaut_bgr,
                                                                    tmp_path, serve_usable):
    """Each tracked face's window of crops and landmarks goes to the server, which runs the bundle's video
    encoder: the events (window frames, texts, tokens) equal a local --video-window run's."""
    from focalrt.demo import pan_zoom_frames, write_clip
    from focalrt.serve.process import start_server

    clip = write_clip(tmp_path / "clip.mp4", pan_zoom_frames(astronaut_bgr, 10))
    srv = start_server(face_llava_video_bundle, tmp_path / "serve.log", ["--exit-timeout", "10"])
    try:
        outs = {}
        for name, extra in (("local", []), ("server", ["--server", srv.url])):
            outs[name] = tmp_path / f"{name}.jsonl"
            done = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(face_llava_video_bundle),
                                   "--source", str(clip), "--video-window", "--regions", "mouth",
                                   "--max-new-tokens", "4", "--out", str(outs[name]), "--quiet", *extra],
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr
    finally:
        srv.stop()
    local, remote = _events(outs["local"]), _events(outs["server"])
    windows = [e for e in local if e.get("region") == "window"]
    assert [e["window_frames"] for e in windows] == [list(range(f - 7, f + 1)) for f in (7, 8, 9)]
    assert remote == local


def test_sigterm_drains_in_flight_requests_and_exits_0(server, astronaut_bgr):
    """Runs last: it stops the module's server. One OS thread per request: tritonclient's HTTP client sends
    from gevent greenlets, which would not run while this thread sleeps."""
    import threading

    from focalrt.serve.client import ServerClient

    answers: list = []

    def send(i: int) -> None:
        with ServerClient(server.url, timeout_s=300, concurrency=1) as c:
            try:
                answers.append(c.describe(astronaut_bgr, boxes=[(60 + i, 60, 260, 260)], max_new_tokens=48))
            except Exception as e:  # recorded, and fails the assertion below with its message
                answers.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # let them reach the server (loopback); not an assertion on time
    server.process.terminate()
    for t in threads:
        t.join(300)
    assert len(answers) == 6
    assert all(isinstance(a, list) and len(a) == 1 and a[0].token_ids for a in answers), answers
    assert server.process.wait(120) == 0, server.log()[-3000:]
    assert "stopped" in server.log()

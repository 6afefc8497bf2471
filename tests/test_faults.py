"""Fault suite (issue 12): hostile and unlucky inputs end in one clear line and a non-zero exit, never a
traceback, a clobbered file, an escaped path or a silently short output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from focalrt.bundle import BundleError, load

ASTRONAUT = Path(__file__).resolve().parents[1] / "focalrt" / "data" / "astronaut.jpg"


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "focalrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line_error(proc: subprocess.CompletedProcess, rc: int = 2) -> str:
    """The stderr of a refused command: exit code rc, one line, no traceback. Returns that line."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    # the test bundles have random weights by design; commands say so in one "note:" line of their own
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not (line.startswith("note: ") and "random weights" in line)]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def linked_copy(bundle: Path, dst: Path) -> Path:
    """A copy of the bundle whose files are hard links (cheap), so each test may edit its manifest."""
    def link(src, to):
        try:
            os.link(src, to)
        except OSError:
            shutil.copy2(src, to)
    shutil.copytree(bundle, dst, copy_function=link)
    (dst / "manifest.json").unlink()
    shutil.copy2(bundle / "manifest.json", dst / "manifest.json")
    return dst


def edit_manifest(bundle: Path, change) -> Path:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


# --- bundle containment -------------------------------------------------------------------------------------

def test_manifest_path_with_dotdot_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    outside = tmp_path / "outside_model"
    outside.mkdir()
    shutil.copy2(b / "vision.onnx", outside / "vision.onnx")
    edit_manifest(b, lambda m: m["components"]["vision"].update(file="../outside_model/vision.onnx"))
    with pytest.raises(BundleError, match=r"components\.vision\.file .*outside the bundle"):
        load(b)


def test_manifest_absolute_path_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    target = tmp_path / "abs_tokenizer.json"
    shutil.copy2(b / "tokenizer.json", target)
    edit_manifest(b, lambda m: m["tokenizer"].update(file=str(target)))
    with pytest.raises(BundleError, match=r"tokenizer\.file .*outside the bundle"):
        load(b)


def test_symlink_escaping_the_bundle_is_refused(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy2(b / "faces" / "face_landmark.onnx", outside)
    (b / "faces" / "face_landmark.onnx").unlink()
    (b / "faces" / "face_landmark.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match=r"face_models\.landmarks\.file .*outside the bundle"):
        load(b)
    # a symlink that stays inside the bundle is fine
    (b / "faces" / "face_landmark.onnx").unlink()
    shutil.move(outside, b / "real_landmark.onnx")
    (b / "faces" / "face_landmark.onnx").symlink_to(b / "real_landmark.onnx")
    assert load(b).family == "qwen2_5_vl"


def test_escaping_bundle_fails_on_the_command_line(tiny_bundle, tmp_path):
    b = linked_copy(tiny_bundle, tmp_path / "b")
    (tmp_path / "outside_model").mkdir()
    shutil.copy2(b / "vision.onnx", tmp_path / "outside_model" / "vision.onnx")
    edit_manifest(b, lambda m: m["components"]["vision"].update(file="../outside_model/vision.onnx"))
    line = one_line_error(cli("describe", b, "--image", ASTRONAUT))
    assert "components.vision.file" in line and "outside the bundle" in line


# --- strict manifest validation -----------------------------------------------------------------------------

def _drop(section: str, key: str):
    return lambda m: m[section].pop(key)


def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return change


MALFORMED = [  # (case, change, the key path the one-line error must name)
    ("missing num_layers", _drop("text", "num_layers"), "text.num_layers is missing"),
    ("missing stop_tokens", _drop("prompt", "stop_tokens"), "prompt.stop_tokens is missing"),
    ("missing num_kv_heads", _drop("text", "num_kv_heads"), "text.num_kv_heads is missing"),
    ("negative image_size", _set("preprocess.image_size", -28), "preprocess.image_size -28 is less than"),
    ("face_models yes", _set("face_models", "yes"), "face_models is \"yes\" (str)"),
    ("byte count as string", _set("components.vision.bytes", "1090152"), "components.vision.bytes is \"1090152\""),
    ("component is a string", _set("components.decoder", "decoder.onnx"), "components.decoder is \"decoder.onnx\""),
    ("rescale as string", _set("preprocess.rescale", "1/255"), "preprocess.rescale is \"1/255\""),
    ("max_context zero", _set("text.max_context", 0), "text.max_context 0 is less than"),
    ("stop_tokens not a list", _set("prompt.stop_tokens", "<|im_end|>"), "prompt.stop_tokens is"),
    ("image_size off the patch grid", _set("preprocess.image_size", 300), "multiple of"),
    ("detector anchors missing", lambda m: m["face_models"]["detector"].pop("anchors"),
     "face_models.detector.anchors is missing"),
    ("temperature negative", _set("generation.temperature", -1), "generation.temperature -1"),
    ("format_version string", _set("format_version", "1"), "format_version '1'"),
]


@pytest.fixture(scope="module")
def malformed_root(tiny_bundle, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("malformed")


@pytest.mark.parametrize("case,change,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_clear_line(tiny_bundle, malformed_root, case, change, expected):
    b = edit_manifest(linked_copy(tiny_bundle, malformed_root / case.replace(" ", "_")), change)
    with pytest.raises(BundleError, match="manifest.json") as err:
        load(b)
    assert expected in str(err.value)
    line = one_line_error(cli("describe", b, "--image", ASTRONAUT))
    assert expected in line and ("re-export" in line or "fix" in line)


def test_unknown_extra_keys_and_text_only_sections_are_accepted(tiny_bundle, tmp_path):
    """Exporters may add fields (random-weights flags, chat templates); old bundles keep loading."""
    b = edit_manifest(linked_copy(tiny_bundle, tmp_path / "b"),
                      lambda m: m.update(random_weights=True, prompt={**m["prompt"], "chat_template": "x"}))
    assert load(b).manifest["random_weights"] is True


def test_bundle_that_is_a_file_and_image_that_is_a_directory(tiny_bundle, tmp_path):
    line = one_line_error(cli("describe", tiny_bundle / "manifest.json", "--image", ASTRONAUT))
    assert "is a file, not a directory" in line and "does not exist" not in line
    line = one_line_error(cli("describe", tiny_bundle, "--image", tmp_path))
    assert "is a directory" in line and "does not exist" not in line


# --- outputs are never clobbered ----------------------------------------------------------------------------

BOX = ("--box", "10,10,100,100", "--max-new-tokens", "1")


def write_avi(path: Path, frames: int, size: tuple[int, int] = (160, 120)) -> Path:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    for i in range(frames):
        image = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        writer.write(image)
    writer.release()
    return path


@pytest.fixture(scope="module")
def avi_clip(tmp_path_factory) -> Path:
    return write_avi(tmp_path_factory.mktemp("clip") / "clip.avi", 12)


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the file ends in half a line"
    return [json.loads(line) for line in data.decode().splitlines()]


def test_existing_out_is_refused_then_overwritten_or_appended(tiny_bundle, avi_clip, tmp_path):
    out = tmp_path / "events.jsonl"
    out.write_text('{"old": 1}\n')
    line = one_line_error(cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", out, "--quiet"))
    assert "already exists" in line and "--overwrite" in line and "--append" in line
    assert out.read_text() == '{"old": 1}\n'
    assert cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", out, "--quiet", "--append").returncode == 0
    events = whole_lines(out)
    assert events[0] == {"old": 1} and len(events) == 1 + 12
    assert cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", out, "--quiet", "--overwrite").returncode == 0
    assert len(whole_lines(out)) == 12 and "old" not in out.read_text()
    video = tmp_path / "v.avi"
    video.write_bytes(b"precious")
    line = one_line_error(cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--write-video", video))
    assert "--write-video" in line and "already exists" in line and video.read_bytes() == b"precious"


def test_out_equal_to_write_video_or_source_is_refused(tiny_bundle, avi_clip, tmp_path):
    same = tmp_path / "same.avi"
    line = one_line_error(cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", same, "--write-video", same))
    assert "--out and --write-video name the same file" in line and not same.exists()
    before = avi_clip.read_bytes()
    line = one_line_error(cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--write-video", avi_clip,
                              "--overwrite"))
    assert "--source and --write-video name the same file" in line
    assert avi_clip.read_bytes() == before, "the input video was touched"


@pytest.mark.parametrize("bad", ["dir", "missing_parent", "mp4"])
def test_unusable_output_paths_fail_before_the_model_loads(tiny_bundle, avi_clip, tmp_path, bad):
    target = {"dir": tmp_path, "missing_parent": tmp_path / "nope" / "e.jsonl", "mp4": tmp_path / "v.mp4"}[bad]
    flag = "--write-video" if bad == "mp4" else "--out"
    line = one_line_error(cli("run", tiny_bundle / "no-such-bundle", "--source", avi_clip, *BOX, flag, target))
    # the bundle does not exist: an output error first proves outputs are checked before any model loads
    assert flag in line and "bundle" not in line
    assert {"dir": "is a directory", "missing_parent": "does not exist", "mp4": ".mkv or .avi"}[bad] in line


def test_second_writer_fails_at_once_naming_the_first(tiny_bundle, avi_clip, tmp_path):
    out = tmp_path / "events.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(avi_clip),
                              "--loop", *BOX, "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.2)
        second = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", out, "--overwrite", "--quiet")
        line = one_line_error(second)
        assert f"being written by another process (pid {first.pid})" in line
        assert first.poll() is None, "the first writer must keep running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert first.returncode == 143
    events = whole_lines(out)
    assert len(events) >= 2 and [e["frame"] for e in events] == sorted(e["frame"] for e in events)


# --- full disks and write errors ----------------------------------------------------------------------------

def _limit_file_size(limit: int):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past `limit` fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


def test_jsonl_on_dev_full_is_a_one_line_error(tiny_bundle, avi_clip):
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", "/dev/full", "--quiet")
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert "writing /dev/full failed (No space left on device); it keeps the 0 whole lines" in proc.stderr
    assert "summary " in proc.stderr


def test_jsonl_on_a_full_disk_keeps_whole_lines(tiny_bundle, avi_clip, tmp_path):
    out = tmp_path / "events.jsonl"
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", out, "--quiet",
               preexec_fn=_limit_file_size(1500))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    events = whole_lines(out)
    assert 0 < len(events) < 12 and f"it keeps the {len(events)} whole lines" in proc.stderr


def test_video_on_a_full_disk_is_an_error(tiny_bundle, avi_clip, tmp_path):
    video = tmp_path / "v.avi"
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--write-video", video, "--quiet", "--loop",
               "--max-frames", "120", preexec_fn=_limit_file_size(20_000))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert f"video {video}" in proc.stderr and "frames" in proc.stderr
    full = tmp_path / "full.avi"
    full.symlink_to("/dev/full")
    line = one_line_error(cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--write-video", full))
    assert "not a regular file" in line


# --- kill-safe video ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".mkv", ".avi"])
def test_video_is_playable_after_sigkill(tiny_bundle, avi_clip, tmp_path, suffix):
    import cv2

    video = tmp_path / f"v{suffix}"
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(avi_clip),
                             "--loop", *BOX, "--write-video", str(video), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (video.exists() and video.stat().st_size > 300_000):  # well past ffmpeg's 32 KiB buffer
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    cap = cv2.VideoCapture(str(video))
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (120, 160, 3)
        frames += 1
    cap.release()
    assert frames >= 5, f"only {frames} frames readable after SIGKILL"


# --- export cleans up after itself --------------------------------------------------------------------------

def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a `torch` that fails on import: proves a refusal came before any model was built."""
    fake = tmp_path / "fake_torch"
    fake.mkdir(exist_ok=True)
    (fake / "torch.py").write_text("raise ImportError('the model would have been built here')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}


def test_export_refuses_bad_out_and_model_before_building(tmp_path):
    env = _no_torch_env(tmp_path)
    existing = tmp_path / "existing"
    existing.mkdir()
    line = one_line_error(cli("export", "--preset", "tiny-random", "--out", existing, env=env))
    assert "--out" in line and "already exists" in line and "--overwrite" in line
    (tmp_path / "afile").write_text("x")
    line = one_line_error(cli("export", "--preset", "tiny-random", "--out", tmp_path / "afile", "--overwrite",
                              env=env))
    assert "is a file" in line
    line = one_line_error(cli("export", "--model", "/nonexistent", "--out", tmp_path / "b", env=env))
    assert "--model /nonexistent" in line and "no such checkpoint directory" in line


def _start_export(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "export", "--preset", "tiny-random",
                             "--no-face-models", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.is_dir() and any(p.iterdir()) for p in out.parent.glob(f".{out.name}.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    return proc


@pytest.mark.slow  # exports or loads a model
def test_killed_export_leftovers_are_removed_by_the_next_export(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "b"
    proc = _start_export(out)
    proc.kill()
    proc.wait()
    [partial] = tmp_path.glob(".b.partial-*")
    (tmp_path / "other").mkdir()
    second = cli("export", "--preset", "tiny-random", "--out", tmp_path / "other", env=_no_torch_env(tmp_path))
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"removed {partial}" in second.stderr and "MB" in second.stderr
    assert not partial.exists() and not out.exists()


@pytest.mark.slow  # exports or loads a model
def test_sigterm_during_export_leaves_nothing(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "b"
    proc = _start_export(out)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --- bench and calibrate check their outputs first ----------------------------------------------------------

def test_bench_json_is_checked_before_the_benchmark(tiny_bundle, tmp_path):
    line = one_line_error(cli("bench", tiny_bundle / "no-such-bundle", "--json", tmp_path / "nope" / "r.json"))
    assert "--json" in line and "does not exist" in line
    (tmp_path / "r.json").write_text("{}")
    line = one_line_error(cli("bench", tiny_bundle / "no-such-bundle", "--json", tmp_path / "r.json"))
    assert "already exists" in line and "--overwrite" in line
    line = one_line_error(cli("bench", tiny_bundle / "no-such-bundle", "--json", tmp_path))
    assert "is a directory" in line


def test_calibrate_out_is_checked_before_the_model_loads(tiny_bundle, tmp_path):
    pytest.importorskip("onnx")
    (tmp_path / "int8").mkdir()
    line = one_line_error(cli("calibrate", tiny_bundle / "no-such-bundle", "--data", ASTRONAUT, "--precision", "int8",
                              "--out", tmp_path / "int8"))
    assert "--out" in line and "already exists" in line


# --- corrupt media and --loop -------------------------------------------------------------------------------

def test_truncated_video_is_counted_and_exits_5(tiny_bundle, tmp_path):
    full = write_avi(tmp_path / "full.avi", 30)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 4 // 10])
    out = tmp_path / "e.jsonl"
    proc = cli("run", tiny_bundle, "--source", cut, *BOX, "--out", out, "--quiet")
    assert proc.returncode == 5, proc.stderr
    summary = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("summary "))[8:])
    missing = summary["source"]["frames_missing"] + summary["source"]["corrupt_frames"]
    assert missing > 0 and summary["frames"] + missing >= 29
    assert "warning: the input was incomplete" in proc.stderr and "Traceback" not in proc.stderr
    assert len(whole_lines(out)) == summary["frames"]


def test_loop_replays_a_file_with_increasing_frames(tiny_bundle, avi_clip, tmp_path):
    out = tmp_path / "e.jsonl"
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--loop", "--max-frames", "30", "--out", out,
               "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [e["frame"] for e in whole_lines(out)] == list(range(30))
    summary = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("summary "))[8:])
    assert summary["source"]["loops"] == 2
    line = one_line_error(cli("run", tiny_bundle, "--source", "rtsp://camera/stream", "--loop", *BOX))
    assert "--loop needs a video file" in line


def test_failed_start_leaves_no_empty_output(tiny_bundle, avi_clip, tmp_path):
    out, video = tmp_path / "e.jsonl", tmp_path / "v.mkv"
    line = one_line_error(cli("run", tiny_bundle / "no-such-bundle", "--source", avi_clip, *BOX, "--out", out,
                              "--write-video", video))
    assert "does not exist" in line
    assert not out.exists() and not video.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_directory_is_refused_first(tiny_bundle, avi_clip, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_line_error(cli("run", tiny_bundle / "no-such-bundle", "--source", avi_clip, *BOX,
                                  "--out", locked / "e.jsonl"))
        assert "is not writable" in line
    finally:
        locked.chmod(0o700)


def test_schema_accepts_a_text_only_manifest(tiny_bundle):
    """A bundle without a vision component (text-only) needs no preprocess, image token or image template."""
    from focalrt.bundle import validate_manifest

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    del m["components"]["vision"], m["preprocess"], m["prompt"]["image_token"], m["prompt"]["template"]
    del m["text"]["image_token_id"]
    validate_manifest(m, tiny_bundle / "manifest.json")
    m["prompt"].pop("stop_tokens")
    with pytest.raises(BundleError, match="prompt.stop_tokens is missing"):
        validate_manifest(m, tiny_bundle / "manifest.json")


# --- GGUF files are checked before transformers reads them (issue 26) ----------------------------------------

def small_gguf(path: Path) -> Path:
    """A whole, tiny GGUF (two float tensors, a string and a token list), written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((8, 16), np.float32))
    writer.add_tensor("output.weight", np.ones((8, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _damage(data: bytes, case: str) -> bytes:
    if case == "truncated in the weights":
        return data[:-300]
    if case == "truncated in the header":
        return data[:100]
    if case == "magic":
        return b"GGUX" + data[4:]
    if case == "version":
        return data[:4] + (9).to_bytes(4, "little") + data[8:]
    if case == "tensor count":
        return data[:8] + (10**12).to_bytes(8, "little") + data[16:]
    if case == "key not UTF-8":  # the first key, general.architecture, starts at byte 32
        return data[:32] + b"\xff\xfe" + data[34:]
    raise AssertionError(case)


GGUF_DAMAGE = [("truncated in the weights", "needs bytes up to"), ("truncated in the header", "truncated"),
               ("magic", "does not start with the GGUF magic"), ("version", "GGUF version 9 is not"),
               ("tensor count", "declares 1000000000000 tensors"), ("key not UTF-8", "is not UTF-8 text")]


@pytest.mark.parametrize("case,expected", GGUF_DAMAGE, ids=[c for c, _ in GGUF_DAMAGE])
def test_damaged_gguf_is_one_line_naming_the_file(tmp_path, case, expected):
    good = small_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_damage(good.read_bytes(), case))
    # a torch that fails on import: the check comes before transformers (and torch) are touched
    line = one_line_error(cli("export", "--model", bad, "--out", tmp_path / "b", env=_no_torch_env(tmp_path)))
    assert f"--model {bad}" in line and expected in line, line
    assert "damaged" in line or "truncated" in line or "not a GGUF file" in line
    assert not (tmp_path / "b").exists()


def test_gguf_directory_and_whole_files(tmp_path):
    from focalrt.export.gguf_check import check_gguf

    folder = tmp_path / "x.gguf"
    folder.mkdir()
    line = one_line_error(cli("export", "--model", folder, "--out", tmp_path / "b", env=_no_torch_env(tmp_path)))
    assert "is a directory, not a GGUF file" in line and "does not exist" not in line
    assert check_gguf(small_gguf(tmp_path / "good.gguf")) == tmp_path / "good.gguf"  # no false alarm


def test_real_gguf_cut_at_60_mb_is_called_truncated(tmp_path):
    from focalrt.export.gguf_check import GGUFError, check_gguf

    pytest.importorskip("gguf")
    try:
        from focalrt.export.text import locate_preset
        whole = locate_preset("smollm2-135m")
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    check_gguf(whole)
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(60_000_000))
    with pytest.raises(GGUFError, match=r"tensor 'blk\.\d+\.\w+\.weight' needs bytes up to \d+, but the file ends "
                                        r"at 60000000 \(truncated\)"):
        check_gguf(cut)


# --- schemas that cannot produce output are refused at load (issue 26) ---------------------------------------

@pytest.mark.parametrize("schema,reason", [
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "#/$defs/a -> #/$defs/a leads only back"),
    ({"$ref": "#"}, "# -> # leads only back"),
])
def test_schema_that_cannot_produce_output_is_refused(tiny_bundle, tmp_path, schema, reason):
    pytest.importorskip("llguidance")
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    line = one_line_error(cli("describe", tiny_bundle, "--image", ASTRONAUT, *BOX, "--schema", path))
    assert "cannot produce any output" in line and reason in line


# --- served requests: every malformed field is named (issue 26) ----------------------------------------------

def _served(**fields):
    import numpy as np

    base = {"image": np.array([[np.zeros((48, 64, 3), np.uint8).tobytes()]], dtype=object),
            "image_shape": np.array([[48, 64]], np.int64), "boxes": np.array([[[1, 1, 20, 20]]], np.int64)}
    base.update(fields)
    return base


def _malformed_fields():
    import numpy as np

    obj = lambda *v: np.array([list(v)], dtype=object)  # noqa: E731 - one BYTES row
    return [
        ("regions not UTF-8", {"regions": obj(b"mouth", b"\xff\xfe")}, "input 'regions' element 1"),
        ("boxes as floats", {"boxes": np.array([[[1.5, 2.0, 30.0, 40.0]]])}, "input 'boxes' must hold integers"),
        ("boxes as strings", {"boxes": np.array([[["1", "2", "30", "40"]]], dtype=object)}, "input 'boxes' must hold"),
        ("image_shape NaN", {"image_shape": np.array([[np.nan, 64.0]])}, "input 'image_shape' must hold integers"),
        ("landmarks68 as text", {"landmarks68": np.full((1, 68, 2), b"x", dtype=object)},
         "input 'landmarks68' must hold numbers"),
        ("max_new_tokens empty", {"max_new_tokens": np.zeros((1, 0), np.int64)},
         "input 'max_new_tokens' must hold one"),
        ("max_new_tokens float", {"max_new_tokens": np.array([[3.7]])}, "input 'max_new_tokens' must hold integers"),
        ("image not BYTES", {"image": np.array([[7]], np.int64)}, "input 'image' must be BYTES"),
        ("prompt not UTF-8", {"prompt": obj(b"\xc3\x28")}, "input 'prompt' is not UTF-8 text"),
        ("schema not UTF-8", {"schema": obj(b"\xff")}, "input 'schema' is not UTF-8 text"),
        ("box outside", {"boxes": np.array([[[500, 500, 600, 600]]])}, "input 'boxes': box 0"),
    ]


@pytest.mark.parametrize("case,fields,expected", _malformed_fields(), ids=[c[0] for c in _malformed_fields()])
def test_served_request_errors_name_the_input(case, fields, expected):
    from focalrt.serve.requests import Limits, RequestError, decode_describe

    with pytest.raises(RequestError) as err:
        decode_describe(_served(**fields), Limits(), schema_supported=True)
    assert expected in str(err.value), str(err.value)


# --- sources name the files they could not read (issue 26) ---------------------------------------------------

def test_folder_source_names_its_unreadable_files(tiny_bundle, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        shutil.copy2(ASTRONAUT, folder / f"good{i}.jpg")
    for name in ("bad_a.jpg", "bad_b.png", "bad_c.jpg", "bad_d.jpg", "bad_e.jpg", "bad_f.jpg", "bad_g.jpg"):
        (folder / name).write_bytes(b"not an image")
    out = tmp_path / "e.jsonl"
    proc = cli("run", tiny_bundle, "--source", folder, *BOX, "--out", out, "--quiet")
    assert proc.returncode == 5, proc.stderr
    summary = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("summary "))[8:])
    assert summary["source"]["unreadable_files"] == 7 and summary["source"]["corrupt_frames"] == 7
    assert summary["source"]["unreadable_named"] == ["bad_a.jpg", "bad_b.png", "bad_c.jpg", "bad_d.jpg", "bad_e.jpg"]
    assert "unreadable files: bad_a.jpg, bad_b.png, bad_c.jpg, bad_d.jpg, bad_e.jpg and 2 more" in proc.stderr
    assert len(whole_lines(out)) == 3


# --- outputs that cannot block: FIFOs and stdout (issue 26) --------------------------------------------------

def test_fifo_out_without_a_reader_fails_in_one_line(tiny_bundle, avi_clip, tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", fifo, "--quiet", timeout=120)  # no hang
    line = one_line_error(proc)
    assert f"--out {fifo} is a FIFO with no reader" in line and "start the reader first" in line


def test_fifo_out_with_a_reader_gets_every_line(tiny_bundle, avi_clip, tmp_path):
    import threading

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))  # opens once the run opens it
    reader.start()
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", fifo, "--quiet", timeout=300)
    reader.join(60)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["frame"] for line in got[0].decode().splitlines()] == list(range(12))


def test_out_dash_is_stdout(tiny_bundle, avi_clip, tmp_path):
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--out", "-", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["frame"] for e in events] == list(range(12)) and all(e["type"] == "description" for e in events)
    assert not (tmp_path / "-").exists()
    with open("/dev/full", "wb") as full:  # stdout on a full device: the JSONL rules, exit 4
        proc = subprocess.run([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source",
                               str(avi_clip), *BOX, "--out", "-", "--quiet"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert proc.returncode == 4 and "writing <stdout> failed (No space left on device)" in proc.stderr, proc.stderr


# --- a failed video write is an error that says what was kept (issue 26) -------------------------------------

def _readable_frames(path: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_mkv_on_a_full_disk_exits_4_saying_how_many_frames_were_kept(tiny_bundle, tmp_path):
    clip = write_avi(tmp_path / "clip20.avi", 20)
    video = tmp_path / "x.mkv"
    proc = cli("run", tiny_bundle, "--source", clip, *BOX, "--write-video", video, "--quiet",
               preexec_fn=_limit_file_size(60_000))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    kept = _readable_frames(video)
    assert 0 < kept < 20
    assert f"writing video {video} failed" in proc.stderr and f"it keeps {kept} of the " in proc.stderr


def test_video_sink_without_a_write_status_counts_what_the_file_holds(tmp_path):
    """OpenCV 4 (Jetson's system build) returns None from VideoWriter.write: the file is counted at close."""
    code = ("import resource, signal, sys\n"
            "import numpy as np\n"
            "import cv2\n"
            "from focalrt.runtime.stream.sinks import VideoSink, WriteError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "Real = cv2.VideoWriter\n"
            "class Silent:  # OpenCV 4: write() returns None whatever happens\n"
            "    def __init__(self, *a): self.real = Real(*a)\n"
            "    def isOpened(self): return self.real.isOpened()\n"
            "    def write(self, image): self.real.write(image)\n"
            "    def release(self): self.real.release()\n"
            "cv2.VideoWriter = Silent\n"
            "sink = VideoSink(sys.argv[1], 10.0, (160, 120))\n"
            "for i in range(12):\n"
            "    sink.write(np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8))\n"
            "try:\n"
            "    sink.close()\n"
            "except WriteError as e:\n"
            "    print(e)\n")
    video = tmp_path / "v.avi"
    done = subprocess.run([sys.executable, "-c", code, str(video)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept = _readable_frames(video)
    assert kept < 12 and f"it keeps {kept} of the 12 frames written" in done.stdout, done.stdout


# --- MCAP is as kill-safe as the JSONL (issue 26) ------------------------------------------------------------

def _mcap_messages(path: Path) -> list:
    """Every message, read with the mcap library's standard reader (it needs a whole file: no recovery)."""
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        return [(channel.topic, message.log_time) for _, channel, message in make_reader(f).iter_messages()]


def test_mcap_sink_killed_after_a_quiet_second_keeps_every_message(tmp_path):
    """Nothing is written for 1.5 s before the SIGKILL: the flusher thread, not the next message, ends the chunk."""
    pytest.importorskip("foxglove")
    code = ("import os, signal, sys, time\n"
            "import numpy as np\n"
            "from focalrt.runtime.stream.robotics import FoxgloveSink\n"
            "sink = FoxgloveSink(sys.argv[1], flush_interval_s=0.5)\n"
            "for i in range(30):\n"
            "    sink.write({'type': 'state', 'timestamp': i / 10, 'frame': i})\n"
            "    sink.write_frame(np.full((120, 160, 3), i, np.uint8), i / 10)\n"
            "time.sleep(1.5)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = tmp_path / "k.mcap"
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    messages = _mcap_messages(out)
    assert sorted(messages) == sorted([(t, round(i / 10 * 1e9)) for i in range(30)
                                       for t in ("/focalrt/state", "/focalrt/image")])


def test_run_mcap_is_readable_after_sigkill(tiny_bundle, avi_clip, tmp_path):
    pytest.importorskip("foxglove")
    out = tmp_path / "run.mcap"
    proc = subprocess.Popen([sys.executable, "-m", "focalrt.cli", "run", str(tiny_bundle), "--source", str(avi_clip),
                             "--loop", *BOX, "--out", str(out), "--mcap-flush", "0.2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.stat().st_size > 60_000):  # several chunks of frames
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        time.sleep(0.33)  # the kill lands anywhere in the flush cycle, not just after a chunk was written
    finally:
        proc.kill()
        proc.wait()
    messages = _mcap_messages(out)
    frames = [t for topic, t in messages if topic == "/focalrt/image"]
    assert len(frames) >= 3 and {topic for topic, _ in messages} >= {"/focalrt/image", "/focalrt/description"}


def test_mcap_on_a_full_disk_exits_4_and_stays_readable(tiny_bundle, avi_clip, tmp_path):
    pytest.importorskip("foxglove")
    out = tmp_path / "full.mcap"
    proc = cli("run", tiny_bundle, "--source", avi_clip, *BOX, "--loop", "--max-frames", "400", "--out", out,
               "--mcap-flush", "0.05", "--quiet", preexec_fn=_limit_file_size(60_000))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    kept = len(_mcap_messages(out))
    assert kept > 0 and f"writing {out} failed (File too large); it keeps the {kept} messages" in proc.stderr
    assert proc.stderr.count(f"writing {out} failed") == 1, proc.stderr


# --- the server survives any request: a loopback fuzz against the real Triton server (issue 26) --------------

@pytest.fixture(scope="module")
def fuzz_server(tiny_bundle, tmp_path_factory, serve_usable):
    from focalrt.serve.process import start_server

    srv = start_server(tiny_bundle, tmp_path_factory.mktemp("fuzz") / "serve.log", ["--max-batch", "4"])
    yield srv
    srv.stop()


def _infer(port: int, body: bytes, headers: dict[str, str] | None = None, model: str = "describe",
           declared_length: int | None = None) -> tuple[int, str]:
    """POST one raw request; (status, body text). status 0: the server closed without answering."""
    import http.client

    head = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        if declared_length is None:
            conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=head)
        else:  # a body shorter than its Content-Length, then the client is gone
            conn.putrequest("POST", f"/v2/models/{model}/infer")
            for k, v in {**head, "Content-Length": str(declared_length)}.items():
                conn.putheader(k, v)
            conn.endheaders(body)
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server answered (413) and closed already
                pass
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (ConnectionError, http.client.HTTPException):
        return 0, ""
    finally:
        conn.close()


def _binary_request(tensors: list[tuple[dict, bytes]], cut: int = 0) -> tuple[bytes, dict[str, str]]:
    """KServe v2 binary extension: a JSON header, then each input's bytes (the last `cut` bytes left off)."""
    header = json.dumps({"inputs": [t for t, _ in tensors]}).encode()
    blob = b"".join(data for _, data in tensors)
    body = header + blob[:len(blob) - cut]
    return body, {"Inference-Header-Content-Length": str(len(header))}


def _bytes_tensor(name: str, items: list[bytes], shape: list[int] | None = None) -> tuple[dict, bytes]:
    data = b"".join(len(i).to_bytes(4, "little") + i for i in items)
    return ({"name": name, "datatype": "BYTES", "shape": shape or [1, len(items)],
             "parameters": {"binary_data_size": len(data)}}, data)


def _malformed_requests(rng) -> list[tuple[str, bytes, dict, str | None, int | None]]:
    """(what, body, headers, the input the answer must name or None, declared Content-Length or None)."""
    image = {"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}
    huge = [int(rng.integers(10**6, 10**12)) for _ in range(3)]
    cases = [
        ("huge boxes shape", {"inputs": [image, {"name": "boxes", "shape": [1, huge[0], 4], "datatype": "INT64",
                                                  "data": [1, 2, 3, 4]}]}, "boxes"),
        ("huge landmarks shape", {"inputs": [image, {"name": "landmarks68", "shape": [1, huge[1], 2],
                                                      "datatype": "FP32", "data": [0.5, 0.5]}]}, "landmarks68"),
        ("huge image element count", {"inputs": [{"name": "image", "shape": [1, huge[2]], "datatype": "BYTES",
                                                  "data": ["a"]}]}, "image"),
        ("huge regions count", {"inputs": [image, {"name": "regions", "shape": [huge[0], huge[1]],
                                                    "datatype": "BYTES", "data": ["mouth"]}]}, "regions"),
        ("shape larger than data", {"inputs": [image, {"name": "boxes", "shape": [1, 3, 4], "datatype": "INT64",
                                                        "data": [1, 2, 3, 4]}]}, "boxes"),
        ("data larger than shape", {"inputs": [image, {"name": "boxes", "shape": [1, 1, 4], "datatype": "INT64",
                                                        "data": list(range(40))}]}, "boxes"),
        ("negative dim", {"inputs": [image, {"name": "boxes", "shape": [1, -5, 4], "datatype": "INT64",
                                              "data": [1, 2, 3, 4]}]}, "boxes"),
        ("float dim", {"inputs": [image, {"name": "boxes", "shape": [1, 1.5, 4], "datatype": "INT64",
                                           "data": [1, 2, 3, 4]}]}, "boxes"),
        ("string shape", {"inputs": [image, {"name": "boxes", "shape": "1,1,4", "datatype": "INT64",
                                              "data": [1, 2, 3, 4]}]}, "boxes"),
        ("unknown datatype", {"inputs": [image, {"name": "boxes", "shape": [1, 1, 4], "datatype": "INT65",
                                                  "data": [1, 2, 3, 4]}]}, "boxes"),
        ("boxes as floats", {"inputs": [image, {"name": "boxes", "shape": [1, 1, 4], "datatype": "FP32",
                                                 "data": [1.5, 2, 3, 4]}]}, "boxes"),
        ("boxes as strings", {"inputs": [image, {"name": "boxes", "shape": [1, 1, 4], "datatype": "BYTES",
                                                  "data": ["1", "2", "3", "4"]}]}, "boxes"),
        ("image as INT64", {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "INT64", "data": [7]}]},
         "image"),
        ("max_new_tokens as string", {"inputs": [image, {"name": "max_new_tokens", "shape": [1, 1],
                                                          "datatype": "BYTES", "data": ["many"]}]},
         "max_new_tokens"),
        ("no inputs", {"inputs": []}, None),
        ("inputs not a list", {"inputs": {"image": 1}}, None),
        ("nameless input", {"inputs": [{"shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}, None),
        ("shared memory input", {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters":
                                             {"shared_memory_region": "r", "shared_memory_byte_size": 10**10}}]},
         "image"),
        ("no data at all", {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES"}]}, "image"),
    ]
    out = [(what, json.dumps(req).encode(), {}, name, None) for what, req, name in cases]
    jpeg = ASTRONAUT.read_bytes()
    image_bin = _bytes_tensor("image", [jpeg])
    box_bin = ({"name": "boxes", "datatype": "INT64", "shape": [1, 1, 4], "parameters": {"binary_data_size": 32}},
               np.array([10, 10, 100, 100], np.int64).tobytes())
    for what, tensors, cut, name in [
            ("binary body cut short", [image_bin], 1000, None),
            ("binary size larger than shape", [image_bin, ({"name": "boxes", "datatype": "INT64", "shape": [1, 1, 4],
                                                             "parameters": {"binary_data_size": 64}}, bytes(64))],
             0, "boxes"),
            ("binary size too small for BYTES count", [({"name": "image", "datatype": "BYTES", "shape": [1, 10**9],
                                                         "parameters": {"binary_data_size": 8}}, bytes(8))], 0,
             "image"),
            ("non-UTF-8 region", [image_bin, _bytes_tensor("regions", [b"mo\xffth"])], 0, "regions"),
            ("non-UTF-8 prompt", [image_bin, box_bin, _bytes_tensor("prompt", [b"\xc3\x28 describe"])], 0, "prompt"),
            ("broken image bytes", [_bytes_tensor("image", [jpeg[:200]])], 0, "image")]:
        body, headers = _binary_request(tensors, cut)
        out.append((what, body, headers, name, None))
    body, headers = _binary_request([image_bin])
    out += [("header length past the body", body, {"Inference-Header-Content-Length": str(len(body) + 10)}, None,
             None),
            ("non-UTF-8 JSON header", b'{"inputs": [{"name": "\xff\xfe", "shape": [1], "datatype": "BYTES"}]}', {},
             None, None),
            ("not JSON", b"{inputs: nope", {}, None, None),
            ("empty body", b"", {}, None, None),
            ("random bytes", bytes(rng.integers(0, 256, 300, dtype=np.uint8)), {}, None, None),
            ("gzip claimed", b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"}, None, None),
            ("Content-Length of 10 GB", b"{", {}, None, 10 * 2**30),
            ("client gone mid-body", body[:5000], {"Inference-Header-Content-Length": headers[
                "Inference-Header-Content-Length"]}, None, len(body))]
    return out


def test_no_request_kills_the_server_and_good_ones_keep_their_answers(fuzz_server):
    """A few hundred malformed requests (huge declared shapes, wrong datatypes, truncated binary bodies,
    non-UTF-8 strings, broken framing), interleaved with good ones from another client: the server never dies,
    every malformed request gets a 4xx or its own `error` naming the input, every good one its single-client
    answer."""
    import threading

    import cv2

    from focalrt.serve.client import ServerClient

    rng = np.random.default_rng(26)
    image = cv2.imread(str(ASTRONAUT))
    goods = [dict(image=image, boxes=[(40 + 30 * i, 50 + 20 * i, 260, 280)], max_new_tokens=3) for i in range(3)]
    with ServerClient(fuzz_server.url, timeout_s=120) as client:
        expected = [client.describe(**g)[0].token_ids for g in goods]  # one client alone
    answers, stop = [], threading.Event()

    def good_traffic() -> None:  # its own client: tritonclient's gevent connections stay in their thread
        with ServerClient(fuzz_server.url, timeout_s=120) as other:
            i = 0
            while not stop.is_set() or i < 12:
                answers.append((i % 3, other.describe(**goods[i % 3])[0].token_ids))
                i += 1

    worker = threading.Thread(target=good_traffic)
    worker.start()
    try:
        cases = []
        for _ in range(9):  # each kind of damage several times, shuffled, with fresh huge numbers
            cases += _malformed_requests(rng)
        for k in rng.permutation(len(cases)):
            what, body, headers, name, declared = cases[k]
            status, text = _infer(fuzz_server.http_port, body, headers, declared_length=declared)
            assert fuzz_server.process.poll() is None, f"the server died on {what}:\n{fuzz_server.log()[-3000:]}"
            if what == "client gone mid-body":
                continue  # nobody is left to answer
            assert 400 <= status < 500 or (status == 200 and name and
                                           f"input '{name}'" in text.split('"name":"error"', 1)[-1]), \
                (what, status, text[:500])
            if status != 200:
                assert '"error"' in text and "Traceback" not in text, (what, text[:500])
            if name and status != 200:
                assert name in text, (what, text[:500])
    finally:
        stop.set()
        worker.join(timeout=300)
    assert len(cases) >= 250 and len(answers) >= 12
    assert all(tokens == expected[i] for i, tokens in answers)
    assert fuzz_server.ready()


# --- hard-linked bundles --------------------------------------------------------------------------------------

def test_a_hard_linked_bundle_is_refused_by_convert_in_one_line_and_still_runs(tiny_bundle, tmp_path):
    """`cp -al` backups hard-link every file; onnx will not read external data through a hard link, so convert
    and calibrate refuse such a bundle in one line naming the file and the fix, before any work; describe
    (ONNX Runtime) still runs it."""
    onnx = pytest.importorskip("onnx")
    from focalrt.bundle import file_record, write_manifest

    plain = tmp_path / "plain"
    shutil.copytree(tiny_bundle, plain)
    model = onnx.load(str(plain / "decoder.onnx"))
    onnx.save(model, str(plain / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
              size_threshold=0)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["components"]["decoder"].update(file_record(plain, "decoder.onnx"))
    write_manifest(plain, manifest)
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in plain.rglob("*"):  # what `cp -al plain linked` makes
        target = linked / f.relative_to(plain)
        target.mkdir(exist_ok=True) if f.is_dir() else os.link(f, target)
    line = one_line_error(cli("convert", linked, "--data", ASTRONAUT, "--precision", "fp16", "--out", tmp_path / "o"))
    assert "decoder.onnx.data has 2 hard links" in line and "cp -r" in line
    assert not (tmp_path / "o").exists()
    described = cli("describe", linked, "--image", ASTRONAUT, "--max-new-tokens", "2")
    assert described.returncode == 0, described.stderr[-1500:]

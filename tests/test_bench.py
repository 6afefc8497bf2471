"""`focalrt bench` on the tiny-random bundle and a short synthetic clip; --compare; the roofline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from focalrt import cli
from focalrt.bench.measure import STAGES
from focalrt.bench.roofline import decode_upper_bound, measure_bandwidth, model_bytes, weight_bytes_per_token
from focalrt.bundle import load

cv2 = pytest.importorskip("cv2")

TOP_KEYS = {"schema", "created_unix", "bundle", "settings", "environment", "model_bytes", "load_ms", "stages",
            "throughput", "samples_ms", "memory", "scaling", "roofline", "notes"}
THROUGHPUT_KEYS = {"decode_tokens_per_s", "decode_tokens_per_s_aggregate", "prefill_tokens_per_s", "ttft_ms",
                   "frames_per_s", "region_descriptions_per_s", "tokens_per_region", "prompt_tokens",
                   "regions_per_frame", "faces_per_frame"}
STAT_KEYS = {"p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "min_ms", "runs", "warmup"}
RUNS = 3


def run_cli(argv: list[str], monkeypatch) -> int:
    if "bench" not in cli.COMMANDS:  # until the lead wires the subcommand into cli.py
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "bench"))
    return cli.main(argv)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr) -> Path:
    """Six frames of the astronaut photo, panned a few pixels per frame, as an MJPG AVI."""
    path = tmp_path_factory.mktemp("clip") / "pan.avi"
    h, w = astronaut_bgr.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for i in range(6):
        writer.write(cv2.warpAffine(astronaut_bgr, np.float32([[1, 0, 4 * i], [0, 1, 2 * i]]), (w, h),
                                    borderMode=cv2.BORDER_REFLECT))
    writer.release()
    return path


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, clip, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "result.json", out / "result.png"
    mp = pytest.MonkeyPatch()
    try:
        code = run_cli(["bench", str(tiny_bundle), "--source", str(clip), "--regions", "mouth,eyes",
                        "--runs", str(RUNS), "--warmup", "1", "--max-new-tokens", "4", "--contexts", "16,32",
                        "--context-steps", "4", "--region-counts", "1,2", "--face-counts", "1,2",
                        "--scaling-runs", "1", "--scaling-tokens", "2", "--threads", "2",
                        "--json", str(json_path), "--plot", str(png_path)], mp)
    finally:
        mp.undo()
    assert code == 0
    return json.loads(json_path.read_text()), json_path, png_path


def test_bench_json_has_every_figure(bench_run, tiny_bundle):
    result, _, _ = bench_run
    assert TOP_KEYS <= set(result)
    assert result["settings"]["frame_pipeline"] == "focalrt.runtime.stream.runner.RegionRunner"
    assert set(result["stages"]) == set(STAGES)
    for name, stats in result["stages"].items():
        assert stats is not None, f"stage {name} was not measured"
        assert STAT_KEYS <= set(stats)
        assert 0 <= stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    # One frame-level sample per timed frame; two regions of one face described per frame.
    for per_frame in ("source_decode", "face_detect", "landmarks", "ttft", "frame_end_to_end"):
        assert result["stages"][per_frame]["runs"] == RUNS, per_frame
    assert result["stages"]["region_end_to_end"]["runs"] == 2 * RUNS
    assert result["throughput"]["regions_per_frame"] == 2 and result["throughput"]["faces_per_frame"] == 1
    # A region's time covers its prefill; a frame's covers its regions.
    assert result["stages"]["region_end_to_end"]["p50_ms"] >= result["stages"]["prefill"]["min_ms"]
    assert result["stages"]["frame_end_to_end"]["min_ms"] >= result["stages"]["region_end_to_end"]["min_ms"]

    t = result["throughput"]
    assert THROUGHPUT_KEYS <= set(t)
    assert t["decode_tokens_per_s"] > 0 and t["frames_per_s"] > 0
    assert t["region_descriptions_per_s"] == pytest.approx(2 * t["frames_per_s"])
    assert result["memory"]["peak_rss_bytes"] >= result["memory"]["rss_bytes"] > 0

    bundle = load(tiny_bundle)
    decoder = bundle.manifest["components"]["decoder"]
    assert result["model_bytes"]["decoder"] == decoder["bytes"] + decoder.get("external_data", {}).get("bytes", 0)
    env = result["environment"]
    assert env["cpu"]["model"] and env["cpu"]["usable"] >= 1 and env["onnxruntime"]
    assert env["onnxruntime_providers_used"] == ["CPUExecutionProvider"]

    assert [c["past"] for c in result["scaling"]["context"]] == [16, 32]
    assert all(c["decode_tokens_per_s"] > 0 and c["decode_step_ms"]["runs"] == 4 for c in result["scaling"]["context"])
    assert [r["regions"] for r in result["scaling"]["regions"]] == [1, 2]
    faces = result["scaling"]["faces"]
    assert [f["faces_requested"] for f in faces] == [1, 2]
    assert [f["faces_found"] for f in faces] == [1, 2], "tiled copies of the face should each be found"
    rf = result["roofline"]
    assert rf["bandwidth"]["best_gb_s"] > 0 and rf["decode_upper_bound_tokens_per_s"] > 0
    # Whether the weights exceed this machine's L3 depends on the machine (tiny-random's 39 MB decoder is larger
    # than a 32 MiB L3), so check that the verdict matches the L3 the report records, and that the note follows.
    l3 = env["cpu"]["l3_cache_bytes"]
    assert rf["weights_exceed_l3"] == ((rf["weight_bytes_per_token"] > l3) if l3 else None)
    fits_note = any("fit in the L3 cache" in n for n in result["notes"])
    assert fits_note == (rf["weights_exceed_l3"] is False)


def test_bench_writes_a_png(bench_run):
    _, _, png_path = bench_run
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(png_path))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 300


def test_compare_prints_ratios(bench_run, tmp_path, monkeypatch, capsys):
    result, json_path, _ = bench_run
    faster = copy.deepcopy(result)
    faster["throughput"]["decode_tokens_per_s"] *= 2
    faster["stages"]["prefill"]["p50_ms"] /= 4
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(faster))
    capsys.readouterr()
    assert run_cli(["bench", "--compare", str(json_path), str(b_path)], monkeypatch) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| figure")}
    assert rows["throughput.decode_tokens_per_s"][2] == "2.00"
    assert rows["throughput.decode_tokens_per_s"][3] == "higher"
    assert rows["stages.prefill.p50_ms"][2] == "0.25"
    assert rows["stages.prefill.p50_ms"][3] == "lower"
    assert rows["stages.decode_step.p50_ms"][2] == "1.00"
    assert "scaling.context[past=16].decode_tokens_per_s" in rows


def test_compare_rejects_a_file_that_is_no_bench_result(bench_run, tmp_path, monkeypatch, capsys):
    _, json_path, _ = bench_run
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"text": "a description"}))
    assert run_cli(["bench", "--compare", str(json_path), str(other)], monkeypatch) == 2
    assert "is not a focalrt bench result" in capsys.readouterr().err


def test_bench_without_bundle_says_what_to_give(monkeypatch, capsys):
    assert run_cli(["bench"], monkeypatch) == 2
    assert "give a BUNDLE directory" in capsys.readouterr().err


def test_roofline_bandwidth_is_positive_and_bounds_decode(tiny_bundle):
    bw = measure_bandwidth(working_set_bytes=48 << 20, repeats=2)
    assert bw["best_gb_s"] > 0
    assert all(bw[f"{k}_gb_s"] > 0 for k in ("copy", "add", "read"))
    assert bw["best_gb_s"] == max(bw["copy_gb_s"], bw["add_gb_s"], bw["read_gb_s"])
    assert decode_upper_bound(10.0, 2_000_000_000) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="must both be positive"):
        decode_upper_bound(0.0, 100)
    manifest = load(tiny_bundle).manifest
    per_token = weight_bytes_per_token(tiny_bundle, manifest)
    sizes = model_bytes(tiny_bundle, manifest)
    # The decoder holds the embedding table, tied to the LM head here: the head reads all of it, once.
    assert "embed" not in sizes and "tied" in manifest["components"]["decoder"]["lm_head"]
    assert per_token == sizes["decoder"]
    # Untied, the gathered table is counted as the one row a step reads.
    untied = {**manifest, "components": {"decoder": {**manifest["components"]["decoder"], "lm_head": "Gemm"}}}
    text = manifest["text"]
    assert per_token - weight_bytes_per_token(tiny_bundle, untied) == (text["vocab_size"] - 1) * text["hidden_size"] * 4


def test_every_context_length_is_warmed_before_it_is_timed(tiny_bundle):
    """Per length: an untimed prefill and an untimed round of decode steps come before the timed ones."""
    from focalrt.bench.measure import Settings, context_scaling, open_bench

    bench = open_bench(tiny_bundle, Settings(contexts=[16, 32], context_steps=3, scaling_runs=2, threads=2))
    calls = []  # (tokens in the call, cache length before it) for every decoder call
    bench.pipe.model.observers.append(lambda seen: calls.append((seen.new_tokens, int(seen.cache.lengths[0]))))
    curve = context_scaling(bench)
    for past in (16, 32):
        prefills = [c for c in calls if c == (past, 0)]
        first_steps = [c for c in calls if c == (1, past)]  # the first step of each decode round at this length
        assert len(prefills) == 3 and len(first_steps) == 3, (past, calls)  # 1 warm-up + 2 timed, each
    for c in curve:
        assert c["prefill_runs"] == 2 and c["prefill_warmup"] == 1
        assert c["decode_step_ms"]["runs"] == 2 * 3 and c["decode_step_ms"]["warmup"] == 3


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads another process's VmHWM from /proc")
def test_peak_rss_agrees_with_the_processs_own_high_water_mark_read_from_outside(tiny_bundle, tmp_path):
    """A bench child process reports its peak RSS; the test then reads that process's VmHWM from /proc itself,
    while the child waits before exiting, and the two agree. The report's figure must cover the whole process:
    load, every timed run and anything allocated after the timed runs."""
    import os
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    code = ("import sys; from focalrt.cli import main\n"
            f"code = main(['bench', {str(tiny_bundle)!r}, '--runs', '2', '--warmup', '1', '--max-new-tokens', '2',"
            f" '--contexts', '16', '--context-steps', '2', '--region-counts', '1', '--face-counts', '1',"
            f" '--scaling-runs', '1', '--scaling-tokens', '2', '--threads', '2', '--quiet', '--json', {str(out)!r}])\n"
            "print('done', code, flush=True)\n"
            "sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env={**os.environ})
    try:
        line = ""
        while not line.startswith("done"):
            line = child.stdout.readline()
            assert line, "the bench child ended without finishing"
        assert line.split() == ["done", "0"]
        status = Path(f"/proc/{child.pid}/status").read_text()
        outside = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024
    finally:
        child.communicate("\n", timeout=60)
    memory = json.loads(out.read_text())["memory"]
    reported = memory["peak_rss_bytes"]
    assert reported <= outside and (outside - reported) / outside < 0.05, (reported, outside)
    assert memory["rss_after_load_bytes"] <= reported
    assert "bundle load" in memory["peak_rss_covers"] and "child process" in memory["peak_rss_covers"]
    bandwidth = json.loads(out.read_text())["roofline"]["bandwidth"]
    assert bandwidth["process"] == "child" and bandwidth["probe_peak_rss_bytes"] > bandwidth["working_set_bytes"]

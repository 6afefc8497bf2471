"""CLI conventions: arguments checked at parse time (exit 2, one line), help with defaults, -v anywhere,
--threads where inference runs, progress that suits the output, an aligned regions table, the random-weights
notice once per run, and programming errors that are not passed off as user errors."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from focalrt import cli
from focalrt.bundle import has_random_weights
from focalrt.commands.progress import ProgressLine

REPO = Path(__file__).resolve().parents[1]


def focalrt(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "focalrt.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


BAD_ARGUMENTS = [
    (["describe", "b", "--image", "x.jpg", "--temperature", "nan"], "--temperature", "finite"),
    (["describe", "b", "--image", "x.jpg", "--temperature", "-1"], "--temperature", "0 or more"),
    (["describe", "b", "--image", "x.jpg", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["describe", "b", "--image", "x.jpg", "--max-new-tokens", "0"], "--max-new-tokens", "1 or more"),
    (["describe", "b", "--image", "x.jpg", "--threads", "0"], "--threads", "1 or more"),
    (["export", "--preset", "tiny-random", "--out", "x", "--image-size", "-28"], "--image-size", "1 or more"),
    (["export", "--preset", "tiny-random", "--out", "x", "--max-context", "0"], "--max-context", "1 or more"),
    (["run", "b", "--source", "x.mp4", "--max-frames", "0"], "--max-frames", "-1 for no limit"),
    (["run", "b", "--source", "x.mp4", "--max-frames", "-2"], "--max-frames", "-1 for no limit"),
    (["run", "b", "--source", "x.mp4", "--every", "0"], "--every", "1 or more"),
    (["run", "b", "--source", "x.mp4", "--min-interval", "inf"], "--min-interval", "finite"),
    (["run", "b", "--source", "x.mp4", "--change-threshold", "3"], "--change-threshold", "(0, 2]"),
    (["bench", "b", "--runs", "0"], "--runs", "1 or more"),
    (["bench", "b", "--warmup", "-1"], "--warmup", "0 or more"),
    (["bench", "b", "--contexts", "16,0"], "--contexts", "1 or more"),
    (["demo", "--frames", "0"], "--frames", "1 or more"),
    (["calibrate", "b", "--data", "d", "--out", "o", "--precision", "int8", "--samples", "-3"], "--samples",
     "1 or more"),
    (["calibrate", "b", "--data", "d", "--out", "o", "--precision", "int8", "--min-top1", "2"], "--min-top1",
     "[0, 1]"),
    (["convert", "b", "--data", "d", "--out", "o", "--precision", "int4", "--holdout", "0"], "--holdout",
     "1 or more"),
    (["build-engines", "b", "--max-batch", "0"], "--max-batch", "1 or more"),
]


@pytest.mark.parametrize("argv,option,why", BAD_ARGUMENTS, ids=[" ".join(a[0][:1] + a[0][-2:]) for a in BAD_ARGUMENTS])
def test_bad_argument_is_refused_at_parse_time_in_one_line(argv, option, why):
    out = focalrt(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert option in lines[0] and why in lines[0] and f"focalrt {argv[0]}" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_max_frames_minus_one_means_unlimited_and_is_documented():
    run = subparsers()["run"]
    assert run.parse_args(["b", "--source", "x", "--max-frames", "-1"]).max_frames is None
    assert run.parse_args(["b", "--source", "x", "--max-frames", "5"]).max_frames == 5
    assert "-1 = no limit" in " ".join(run.format_help().split())


def test_every_option_has_help_and_shows_its_default():
    for name, parser in subparsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"focalrt {name} {action.option_strings or action.dest} has no help text"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help.lower() or f"(default: {action.default})" in text or \
                    f"(default: {','.join(map(str, action.default))})" in text, (name, action.option_strings)
    bench = " ".join(subparsers()["bench"].format_help().split())
    assert "timed frames (default: 20)" in bench


def test_top_level_help_is_for_users():
    text = cli.build_parser().format_help()
    assert "focalrt demo" in text and "describe" in text and "focalrt/commands" not in text


@pytest.mark.parametrize("command", ["describe", "run", "demo", "bench"])
def test_threads_wherever_inference_runs(command):
    assert "--threads" in subparsers()[command].format_help()


@pytest.mark.parametrize("argv", [["-v", "regions"], ["regions", "-v"], ["regions", "--verbose"],
                                  ["describe", "b", "--image", "x", "-v"], ["-v", "describe", "b", "--image", "x"]])
def test_verbose_is_accepted_before_or_after_the_subcommand(argv):
    assert cli.build_parser().parse_args(argv).verbose is True


def test_verbose_defaults_off():
    assert cli.build_parser().parse_args(["regions"]).verbose is False


def test_a_programming_error_is_not_passed_off_as_a_user_error(monkeypatch):
    from focalrt.commands import regions

    def broken(args):
        return len(None)  # a bug: TypeError

    monkeypatch.setattr(regions, "run", broken)
    with pytest.raises(TypeError):
        cli.main(["regions"])


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_terminal_only():
    tty = Tty()
    p = ProgressLine(tty, tty_interval_s=0)
    p.update("frames 1")
    p.update("frames 2")
    p.end()
    assert tty.getvalue() == "\rframes 1\x1b[K\rframes 2\x1b[K\n"

    log = io.StringIO()
    p = ProgressLine(log, log_interval_s=0)
    p.update("frames 1")
    p.update("frames 2")
    p.end()
    assert log.getvalue() == "frames 1\nframes 2\n"  # whole lines, no carriage returns

    quiet = io.StringIO()
    p = ProgressLine(quiet, enabled=False, tty_interval_s=0, log_interval_s=0)
    p.update("frames 1")
    p.end()
    assert quiet.getvalue() == ""


def test_regions_table_columns_line_up():
    out = focalrt("regions")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    header = lines[0]
    au_col = header.index("action units")
    desc_col = header.index("covers")
    for line in lines[1:]:
        assert line[au_col - 2:au_col] == "  " and line[au_col] == "A", line
        if line.strip() and not line.startswith(" "):
            assert line[desc_col - 2:desc_col] == "  " and line[desc_col] != " ", line
    assert any(line.startswith("mouth ") for line in lines) and any(line.startswith("face ") for line in lines)


def test_manifest_records_random_weights_and_old_manifests_still_say_so(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["source"]["random_weights"] is True and has_random_weights(manifest)
    old = {**manifest, "source": {k: v for k, v in manifest["source"].items() if k != "random_weights"}}
    assert has_random_weights(old)  # bundles exported before the field existed: judged by the preset
    real = {**manifest, "source": {**manifest["source"], "random_weights": False, "preset": None}}
    assert not has_random_weights(real)
    assert not has_random_weights({**manifest, "source": {"model": "/ckpt", "preset": None}})


def test_describe_says_random_weights_once_and_ends_its_text_with_a_newline(tiny_bundle, capsys):
    import cv2

    from focalrt.demo import demo_photo

    image = tiny_bundle.parent / "face.png"
    cv2.imwrite(str(image), demo_photo())
    for _ in range(2):  # each run says it once
        assert cli.main(["describe", str(tiny_bundle), "--image", str(image), "--max-new-tokens", "3"]) == 0
        out, err = capsys.readouterr()
        assert err.count("random weights") == 1, err
        assert out.endswith("\n") and out.strip()


def test_real_weights_bundle_gets_no_notice(tiny_bundle, tmp_path, capsys):
    import shutil

    from focalrt.commands.notices import reset, warn_if_random

    reset()
    copy = tmp_path / "real"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"].update(random_weights=False, preset=None, model="/ckpt")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    warn_if_random(copy)
    assert capsys.readouterr().err == ""
    warn_if_random(tiny_bundle)
    assert "random weights" in capsys.readouterr().err


def test_bench_default_source_is_the_photo_shipped_in_the_package(tmp_path):
    import cv2
    import numpy as np

    from focalrt.bench.measure import default_image
    from focalrt.demo import demo_photo

    path, what = default_image(tmp_path)
    assert "astronaut.jpg" in what and "synthetic" not in what
    assert np.array_equal(cv2.imread(str(path)), demo_photo())


def test_export_progress_bar_steps_through_the_exporter_log():
    pytest.importorskip("tqdm")
    import logging

    from focalrt.commands.export import StepBar

    drawn = io.StringIO()
    bar = StepBar(total=5, file=drawn)
    log = logging.getLogger("focalrt.export.test")
    log.addHandler(bar)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for step in ("loading the tiny-random preset", "exporting vision encoder", "exporting token embedding",
                     "exporting decoder (2 layers)", "exporting face models"):
            log.info(step)
        assert bar.bar.n == 4  # the fifth step is running
        assert "4/5 steps" in drawn.getvalue() and "exporting face models" in drawn.getvalue()
        bar.finish(done=True)
        assert bar.bar.n == 5
    finally:
        log.removeHandler(bar)


def test_piped_describe_writes_the_answer_alone_and_the_stats_line_only_when_asked(tiny_bundle, tmp_path):
    import cv2

    from focalrt.demo import demo_photo

    image = tmp_path / "face.png"
    cv2.imwrite(str(image), demo_photo())
    argv = ["describe", str(tiny_bundle), "--image", str(image), "--max-new-tokens", "3"]
    piped = focalrt(*argv)  # stdout is a pipe, as in `focalrt describe ... | tee answer.txt`
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.endswith("\n") and piped.stdout.strip(), piped.stdout
    assert "tokens;" not in piped.stderr and "ttft" not in piped.stderr, piped.stderr
    verbose = focalrt(*argv, "-v")
    assert verbose.returncode == 0, verbose.stderr
    stats = [line for line in verbose.stderr.splitlines() if "ttft" in line]
    assert len(stats) == 1 and stats[0].startswith("[") and " 3 tokens;" in stats[0], verbose.stderr
    assert verbose.stdout == piped.stdout  # the answer is the same; only stderr gained the line

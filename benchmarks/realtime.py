"""Real time against lock-step in `focalrt run`'s loop (issue 24): the state stream while descriptions run.

A clip is replayed as a camera delivers it (`open_source(live=True, loop=True)`: paced at its frame rate,
newest frame only), with `--regions mouth --every 1`, so a description is always due. Each configuration
runs in its own process (peak RSS is its own, nothing warm from another), and the configurations are
interleaved within each repeat, so a change in the machine's load hits them all alike:

  states-only    real time, no regions: the state stream alone (the rate descriptions must not slow much)
  realtime       real time, descriptions continuously due
  realtime-nice  the same with the description lane's worker 10 nice levels below the frame lane (--describe-nice 10)
  lockstep       lock-step on the same live replay (what `focalrt run --lockstep` does)
  realtime-2     real time, two sources (the clip twice) in one process, one model
  2-processes    two `realtime` processes side by side (their peak RSS summed)

Each child measures after its warm-up (the first description written, or 5 s for states-only) for
--seconds: state events per second, descriptions per minute, and for every state event the milliseconds
from its frame's capture to the event leaving the frame loop (p50, p99). The report gives the median of the
repeats and the ratios the issue asks for.

    python -m benchmarks.realtime BUNDLE [--seconds 60] [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT

CONFIGS = ("states-only", "realtime", "realtime-nice", "lockstep", "realtime-2", "2-processes")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident set, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    """One configuration in this process; prints one JSON line."""
    from focalrt.runtime.backends.sessions import lane_threads
    from focalrt.runtime.pipeline import Pipeline
    from focalrt.runtime.stream.inbox import SourceSet
    from focalrt.runtime.stream.runner import RegionRunner, bundle_face_state, frame_loop
    from focalrt.runtime.stream.sources import open_source


    realtime = args.config != "lockstep"
    face_threads, threads = lane_threads(face=args.face_threads, describe=args.threads) if realtime else (None, None)
    pipe = Pipeline.from_bundle(args.bundle, provider="cpu", threads=threads, spinning=not realtime)
    cpu = ["CPUExecutionProvider"]
    state = bundle_face_state(pipe, providers=cpu, threads=face_threads, spinning=not realtime)
    describe = args.config != "states-only"
    runner = RegionRunner(pipe, regions="mouth" if describe else None, max_new_tokens=args.max_new_tokens,
                          state=state, realtime=realtime, face_providers=cpu, face_threads=face_threads,
                          describe_nice=10 if args.config == "realtime-nice" else 0)
    count = 2 if args.config == "realtime-2" else 1
    sources = [open_source(args.clip, live=True, loop=True) for _ in range(count)]
    states, descriptions, latencies = 0, 0, []
    start = None
    deadline = None
    warm_until = time.monotonic() + 5.0
    source_set = SourceSet(sources)
    loop = frame_loop(runner, source_set)
    try:
        for result in loop:
            now = time.monotonic()
            if start is None:
                warm = any(e["type"] == "description" for e in result.events) if describe else now >= warm_until
                if warm:
                    start, deadline = now, now + args.seconds
                continue
            if now >= deadline:
                break
            for event in result.events:
                if event["type"] == "state":
                    states += 1
                    latencies.append((now - result.frame.captured) * 1e3)
                elif event.get("fresh"):
                    descriptions += 1
    finally:
        loop.close()
        for source in sources:
            source.close()
    elapsed = time.monotonic() - start
    return {"config": args.config, "seconds": round(elapsed, 2), "state_rate": states / elapsed,
            "descriptions_per_min": descriptions * 60 / elapsed,
            "latency_p50_ms": percentile(latencies, 50), "latency_p99_ms": percentile(latencies, 99),
            "frames_dropped": sum(source_set.stats(i)["frames_dropped"] for i in range(count)),
            "threads": {"frame_lane": face_threads, "description_lane": threads},
            "lanes": runner.lane.stats if runner.lane else None, "peak_rss_mb": peak_rss_mb()}


def spawn(args, config: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmarks.realtime", args.bundle, "--child", config, "--clip", args.clip,
           "--seconds", str(args.seconds), "--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (("--threads", args.threads), ("--face-threads", args.face_threads)):
        if value:
            cmd += [flag, str(value)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"a benchmark child failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def run_all(args) -> dict:
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for repeat in range(args.repeats):
        for config in configs:
            if config == "2-processes":
                pair = [collect(p) for p in [spawn(args, "realtime"), spawn(args, "realtime")]]
                result = {"config": config, "descriptions_per_min": sum(r["descriptions_per_min"] for r in pair),
                          "state_rate": sum(r["state_rate"] for r in pair),
                          "peak_rss_mb": sum(r["peak_rss_mb"] for r in pair), "processes": pair}
            else:
                result = collect(spawn(args, config))
            runs[config].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {config}: " + json.dumps(
                {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()
                 if k not in ("processes", "lanes", "threads")}), file=sys.stderr, flush=True)
    return runs


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict]]) -> dict:
    m = {c: {k: median(runs[c], k) for k in ("state_rate", "descriptions_per_min", "latency_p50_ms",
                                              "latency_p99_ms", "peak_rss_mb")} for c in CONFIGS}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {"medians": m, "ratios": {
        "state_rate_realtime_over_states_only": ratio(m["realtime"]["state_rate"], m["states-only"]["state_rate"]),
        "state_rate_lockstep_over_states_only": ratio(m["lockstep"]["state_rate"], m["states-only"]["state_rate"]),
        "descriptions_realtime_over_lockstep": ratio(m["realtime"]["descriptions_per_min"],
                                                     m["lockstep"]["descriptions_per_min"]),
        "state_rate_realtime_nice_over_states_only": ratio(m["realtime-nice"]["state_rate"],
                                                           m["states-only"]["state_rate"]),
        "descriptions_realtime_nice_over_lockstep": ratio(m["realtime-nice"]["descriptions_per_min"],
                                                          m["lockstep"]["descriptions_per_min"]),
        "descriptions_two_sources_over_one": ratio(m["realtime-2"]["descriptions_per_min"],
                                                   m["realtime"]["descriptions_per_min"]),
        "peak_rss_two_sources_over_two_processes": ratio(m["realtime-2"]["peak_rss_mb"],
                                                         m["2-processes"]["peak_rss_mb"])}}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform == "linux" else ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None)
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "python": platform.python_version()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run, after warm-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--clip", help="video to replay (default: the demo clip, 480x360 at 30 fps)")
    p.add_argument("--threads", type=int, default=None, help="description lane threads (default: lane_threads)")
    p.add_argument("--face-threads", type=int, default=None, help="frame lane threads (default: lane_threads)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma separated")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--child", choices=CONFIGS[:-1], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.config = args.child
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if not args.clip:
            from focalrt.demo import demo_photo, pan_zoom_frames, write_clip

            args.clip = str(write_clip(Path(tmp) / "clip.mp4", pan_zoom_frames(demo_photo(), 90), fps=30.0))
        before = machine()
        runs = run_all(args)
        report = {"machine": before, "load_average_after": os.getloadavg(), "settings": {
            "bundle": args.bundle, "seconds": args.seconds, "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens, "regions": "mouth", "every": 1, "clip": "demo clip 480x360, 30 fps"
            if args.clip.startswith(tmp) else args.clip}, **summarise(runs), "runs": runs}
    print(json.dumps({k: report[k] for k in ("machine", "load_average_after", "settings", "medians", "ratios")},
                     indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

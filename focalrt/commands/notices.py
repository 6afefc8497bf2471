"""Notices a command prints once per run on stderr, whatever it loads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_said: set[str] = set()


def reset() -> None:
    """Start a new run: `focalrt.cli.main` calls this so each command invocation says its notices again."""
    _said.clear()


def warn_if_random(bundle) -> None:
    """Say once per process that a bundle has random weights, so its gibberish text is not a surprise.

    `bundle` is a loaded focalrt.bundle.Bundle or a bundle directory; an unreadable one says nothing here
    (loading it reports the real problem)."""
    from focalrt.bundle import MANIFEST, has_random_weights

    if isinstance(bundle, (str, os.PathLike)):
        try:
            manifest = json.loads((Path(bundle) / MANIFEST).read_text())
        except (OSError, ValueError):
            return
        path = Path(bundle)
    else:
        manifest, path = bundle.manifest, bundle.path
    if not isinstance(manifest, dict) or not has_random_weights(manifest) or "random" in _said:
        return
    _said.add("random")
    preset = (manifest.get("source") or {}).get("preset")
    print(f"note: {path} has random weights{f' (preset {preset})' if preset else ''}: its text is gibberish "
          f"by design; export a real checkpoint with `focalrt export --model DIR` for real descriptions",
          file=sys.stderr, flush=True)

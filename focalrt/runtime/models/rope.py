"""Position ids in numpy: Qwen2.5-VL's 3D M-RoPE for image+text prompts, and plain 1D for Llama."""

from __future__ import annotations

import numpy as np


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grid_hw: tuple[int, int],
                    start: int = 0) -> tuple[np.ndarray, int]:
    """3D positions [3, S] for one prompt holding at most one image, and the decode delta.

    Text tokens advance all three axes together. An image's tokens keep the time axis at its start and
    walk rows (h) and columns (w) of the merged grid; text after it resumes at start + max(h, w).
    Later tokens at absolute index i sit at i + delta on all three axes.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    n_image = int(is_image.sum())
    gh, gw = grid_hw
    pos = np.zeros((3, ids.size), np.int64)
    if n_image == 0:
        pos[:] = np.arange(start, start + ids.size)
        return pos, start
    if n_image != gh * gw:
        raise ValueError(f"prompt has {n_image} image tokens, the encoder grid gives {gh}x{gw}={gh * gw}")
    first = int(np.argmax(is_image))
    if not is_image[first:first + n_image].all():
        raise ValueError("image tokens in the prompt are not contiguous")
    pos[:, :first] = np.arange(start, start + first)
    base = start + first
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    pos[0, first:first + n_image] = base
    pos[1, first:first + n_image] = base + rows.reshape(-1)
    pos[2, first:first + n_image] = base + cols.reshape(-1)
    after = ids.size - first - n_image
    resume = base + max(gh, gw)
    pos[:, first + n_image:] = np.arange(resume, resume + after)
    delta = int(pos.max()) + 1 - ids.size
    return pos, delta


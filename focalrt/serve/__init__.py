"""Serving a bundle on NVIDIA Triton Inference Server through PyTriton (the `serve` extra).

Nothing here imports pytriton at module level: the CLI builds its parser without the extra installed.
"""

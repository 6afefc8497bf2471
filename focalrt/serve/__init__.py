"""Serving a bundle on NVIDIA Triton Inference Server through PyTriton, and the client beside it.

The server modules need the `serve` extra, the client (`client.py`, behind `focalrt run --server`) only the
`client` extra. Nothing here imports pytriton or tritonclient at module level: the CLI builds its parser
without either installed.
"""

"""Options for ONNX Runtime's TensorRT execution provider, per bundle component.

The runtime runs TensorRT through the execution provider (the decoder's GroupQueryAttention, rotary and
fused-norm nodes are contrib ops TensorRT cannot parse; see docs/precision-and-tensorrt.md). Without
explicit shape ranges the provider builds an engine for the first shapes it sees and rebuilds whenever
a later call exceeds them (a longer prompt, more regions in a batch): seconds to minutes per rebuild on
a Jetson. So each component gets one
profile covering everything the pipeline will feed it, plus engine and timing caches in bundle/engines/
and the fp16/int8 flags matching the component's precision.

Pure functions over the manifest: no tensorrt, torch or export code, so the device runtime can use them,
and `focalrt/runtime/backends/tensorrt_engines.py` (native engines) imports the same shape profiles from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from focalrt.bundle import Bundle, load

ENGINE_DIR = "engines"

Shapes = dict[str, tuple[list[int], list[int], list[int]]]


def profile_shapes(record: dict[str, Any], manifest: dict[str, Any], max_batch: int = 1, decode: bool = False,
                   max_context: int | None = None) -> Shapes:
    """(min, opt, max) per dynamic input, from the manifest's symbolic dims, bounded by the max context.

    `max_context` is the context the runtime actually allocates (its KV buffers are exactly that long);
    it is capped at the manifest's, as the pipeline caps it. `decode=True` gives the single-token profile
    that decode steps run in; the other is the prefill profile, optimised for a prompt of about image
    tokens + 64 text tokens.
    """
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be at least 1 (got {max_batch}); it is the most rows one call runs")
    ctx = int(manifest["text"]["max_context"])
    if max_context is not None:
        if int(max_context) < 1:
            raise ValueError(f"max_context must be at least 1 token (got {max_context}); leave it out to use "
                             f"the bundle's {ctx}")
        ctx = min(ctx, int(max_context))
    image_tokens = int(manifest["preprocess"].get("image_tokens", 1))
    prompt = min(ctx, image_tokens + 64)
    ranges = {"batch": (1, 1, max_batch),
              "sequence": (1, 1, 1) if decode else (1, prompt, ctx),
              "total_sequence": (1, min(prompt + 1, ctx) if decode else prompt, ctx),
              "max_context": (1, ctx, ctx), "past_sequence": (0, min(prompt, ctx - 1), ctx - 1),
              "image_tokens": (1, image_tokens, image_tokens * max_batch)}
    shapes: Shapes = {}
    for inp in record.get("inputs", []):
        dims = inp["shape"]
        if all(isinstance(d, int) for d in dims):
            continue
        lo, opt, hi = [], [], []
        for d in dims:
            if isinstance(d, int):
                bounds = (d, d, d)
            elif d in ranges:
                bounds = ranges[d]
            else:
                raise ValueError(f"input {inp['name']} has dynamic dimension {d!r} with no known bound; known: "
                                 f"{sorted(ranges)}")
            lo.append(bounds[0])
            opt.append(bounds[1])
            hi.append(bounds[2])
        shapes[inp["name"]] = (lo, opt, hi)
    return shapes


def shape_spec(shapes: Shapes, which: int) -> str:
    """The provider's profile string, `name:AxBxC,name2:...`, for min (0), opt (1) or max (2)."""
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def trt_ep_provider_options(bundle: Bundle | str | os.PathLike, component: str, max_batch: int = 1,
                            max_context: int | None = None) -> dict[str, Any]:
    """TensorRT execution provider options for one component: engine and timing caches in bundle/engines/,
    explicit shape ranges (so its engines are built once for the whole range) and the precision flags."""
    bundle = bundle if isinstance(bundle, Bundle) else load(bundle)
    record = bundle.component(component)
    shapes = profile_shapes(record, bundle.manifest, max_batch, max_context=max_context)
    cache = str(Path(bundle.path) / ENGINE_DIR)
    options: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    precision = record.get("precision", "fp32")
    if precision == "fp16":
        options["trt_fp16_enable"] = True
    if precision == "int8":
        options["trt_int8_enable"] = True  # explicit quantization: the QDQ scales are used, no calibration table
    if shapes:
        options.update(trt_profile_min_shapes=shape_spec(shapes, 0), trt_profile_opt_shapes=shape_spec(shapes, 1),
                       trt_profile_max_shapes=shape_spec(shapes, 2))
    return options

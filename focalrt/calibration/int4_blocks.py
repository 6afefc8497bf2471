"""INT4 block sizes, apart from quantize.py so `focalrt convert --help` works without onnx installed."""

# 128 is the group size of AWQ/GPTQ checkpoints and TensorRT-LLM's INT4: 3.7x fp32 decode on the CPU here,
# against 3.0x for 32 (finer, slightly more accurate; docs/precision-and-tensorrt.md has both).
INT4_BLOCK_SIZE = 128
INT4_BLOCK_SIZES = (16, 32, 64, 128)

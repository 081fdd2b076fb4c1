"""The quantization names each exporter accepts, in one module that imports nothing: the exporters take their names
from here, and a target profile is checked against the same names, so a profile cannot name a scheme the exporter
lacks (and loading a profile does not pull in torch or onnx)."""

ONNX_SCHEMES = ("int8_dynamic", "int8_qdq", "int4", "fp16")  # edgekit.export.onnx_quantize
INT4_BLOCK_SIZE = 32  # MatMulNBits: one scale per 32 weights
ONNX_QUANTIZATIONS = ("fp32", *ONNX_SCHEMES)  # fp32: the graphs as exported, not quantized
PYTHON_GGUF_TYPES = ("f32", "f16", "q8_0")  # written by edgekit.export.gguf itself (its FTYPES)
LLAMA_CPP_QTYPES = ("q4_0", "q4_k_m", "q6_k", "q8_0")  # llama.cpp's quantizer: llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>
GGUF_QUANTIZATIONS = tuple(dict.fromkeys(PYTHON_GGUF_TYPES + LLAMA_CPP_QTYPES))  # the language model
MMPROJ_QUANTIZATIONS = PYTHON_GGUF_TYPES  # the vision tower + projector: clip.cpp files are written in Python only

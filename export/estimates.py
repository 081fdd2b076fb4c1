"""What an export will need, from the model's config alone, checked before any weight is read: the memory this
machine must have at peak, and the size of the artifacts against the target's budget. A request that cannot work is
one line in seconds, not an error after minutes of tracing a 7B model.

Memory, measured on LLaVA-1.5-7B widths (README: Real sizes):
- the language model GGUF streams from the checkpoint a tensor at a time: a constant (libraries, tokenizer) plus a
  few float32 copies of the largest tensor (the embedding);
- ONNX holds the model once: in float16 when the checkpoint is half precision and the scheme is fp16 (traced as it
  is), else in float32 (onnxruntime's quantizers and float16 conversion read float32 graphs) plus what the quantizer
  loads of the float32 graph.

Artifact bytes per parameter follow from each format's storage (int8: 1 byte; MatMulNBits 4-bit with a float scale
per 32: 0.625; llama.cpp Q4_0 4.5 bits, Q4_K_M about 4.85, Q6_K 6.56, Q8_0 8.5); a request whose smallest runtime set
is clearly over the budget is refused, and the export's own check of the written files stays the authority.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from edgekit.errors import UserError
from edgekit.export.quantizations import PYTHON_GGUF_TYPES
from edgekit.model.families import text_config
from edgekit.model.sizes import config_dtype, model_sizes
from edgekit.units import human_bytes

HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_SCHEMES = ("fp16", "int4")  # what a half-precision model is traced in float16 for (int4 then streams)
GGUF_PEAK_BASE = 2 << 30
GGUF_PEAK_PER_LARGEST_FP32 = 3.0
ONNX_PEAK_PER_HALF_BYTE = 1.15
ONNX_PEAK_PER_FP32_BYTE = 2.0
ESTIMATE_MARGIN = 1.1  # refuse up front only when the estimate is this far over the budget

# bytes per parameter: ONNX scheme -> (vision graph, embedding, decoder); GGUF type -> language model
ONNX_BYTES_PER_PARAM = {
    "fp32": (4, 4, 4),
    "fp16": (2, 2, 2),
    "int8_dynamic": (1, 1, 1),
    "int8_qdq": (1, 4, 1),
    "int4": (4, 4, 0.625),
}
GGUF_BYTES_PER_PARAM = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.0625, "q6_k": 0.82, "q4_k_m": 0.625, "q4_0": 0.5625}


def traced_in_half(config, scheme: str) -> bool:
    """Whether the export traces the model in float16 as it is (else: in float32)."""
    return scheme in HALF_SCHEMES and config_dtype(config) in HALF_DTYPES


def export_memory_need(config, formats: Sequence[str], scheme: str) -> tuple[int, str]:
    """The peak memory an export of `config`'s model needs, and what holds it."""
    text = text_config(config)
    needs = [(0, "")]
    if "gguf" in formats:
        largest = text.vocab_size * text.hidden_size * 4
        needs.append((int(GGUF_PEAK_BASE + GGUF_PEAK_PER_LARGEST_FP32 * largest), "streams the language model"))
    if "onnx" in formats or "mmproj" in formats:
        if traced_in_half(config, scheme):
            held = model_sizes(config, dtype=torch.float16).parts[-1].bytes
            needs.append((int(ONNX_PEAK_PER_HALF_BYTE * held), "holds the model in float16"))
        else:
            held = model_sizes(config, dtype=torch.float32).parts[-1].bytes
            needs.append((int(ONNX_PEAK_PER_FP32_BYTE * held), "holds the model in float32 (the quantizers read it)"))
    return max(needs)


def check_export_memory(config, formats: Sequence[str], scheme: str) -> None:
    available = available_memory()
    if available is None:
        return
    need, why = export_memory_need(config, formats, scheme)
    if need > available:
        raise UserError(
            f"exporting {','.join(formats)} {why} and needs about {human_bytes(need)} of memory at peak; this "
            f"machine has {human_bytes(available)} available"
        )


def runtime_set_bytes(config, exit_layer: int, profile, formats: Sequence[str], scheme: str) -> dict[str, int]:
    """Estimated bytes of each runtime set the export would write (see artifacts.RuntimeSet)."""
    sizes = model_sizes(config, exit_layer=exit_layer, dtype=torch.float32)
    tower, projector, language, _ = (part.params for part in sizes.parts)
    vision_params = tower - sizes.saved_params + projector
    text = text_config(config)
    embed = text.vocab_size * text.hidden_size
    per_vision, per_embed, per_decoder = ONNX_BYTES_PER_PARAM[scheme]
    if traced_in_half(config, scheme):  # the graphs the scheme leaves alone stay as traced
        per_vision, per_embed = min(per_vision, 2), min(per_embed, 2)
    vision = vision_params * per_vision
    lm = language * GGUF_BYTES_PER_PARAM[profile.gguf_quantization]
    sets = {}
    if "onnx" in formats:
        sets["onnx"] = vision + embed * per_embed + (language - embed) * per_decoder
    if "gguf" in formats:
        mmproj = vision_params * GGUF_BYTES_PER_PARAM[profile.mmproj_quantization] if "mmproj" in formats else 0
        sets["gguf"] = lm + mmproj
        if "onnx" in formats:
            sets["hybrid"] = vision + lm
    return {name: int(n) for name, n in sets.items()}


def check_export_fits(config, exit_layer: int, profile, formats: Sequence[str], scheme: str) -> None:
    sets = runtime_set_bytes(config, exit_layer, profile, formats, scheme)
    name, size = max(sets.items(), key=lambda item: item[1])
    if size > ESTIMATE_MARGIN * profile.memory_budget_bytes:
        gguf = sets.get("gguf", profile.memory_budget_bytes + 1)
        hint = (
            f"; --formats gguf would fit (about {human_bytes(gguf, 'decimal')})"
            if name != "gguf" and gguf <= profile.memory_budget_bytes
            else ""
        )
        raise UserError(
            f"artifacts would not fit target {profile.name}: the {name} set needs about {human_bytes(size, 'decimal')}"
            f" ({scheme if name == 'onnx' else profile.gguf_quantization}) but the memory budget is "
            f"{human_bytes(profile.memory_budget_bytes, 'decimal')}{hint}"
        )


def export_disk_need(config, exit_layer: int, profile, formats: Sequence[str], scheme: str) -> int:
    """Bytes an export writes at its fullest: the artifacts (the ONNX folder with onnxruntime-genai's copy of the
    embedding, the GGUF files) plus the larger intermediate (the float32 graphs a quantizer reads; the GGUF in the
    checkpoint's precision that llama.cpp quantizes), each removed once used."""

    sets = runtime_set_bytes(config, exit_layer, profile, formats, scheme)
    text = text_config(config)
    half = traced_in_half(config, scheme)
    embed = text.vocab_size * text.hidden_size * (2 if half else ONNX_BYTES_PER_PARAM[scheme][1])
    lm = sets.get("gguf", 0)
    artifacts = sets.get("onnx", 0) + embed + lm if "onnx" in formats else lm
    params = model_sizes(config, exit_layer=exit_layer, dtype=torch.float32).parts[-1].params
    traced = 0 if scheme == "fp32" or (half and scheme == "fp16") else (2 if half else 4) * params
    onnx_work = traced if "onnx" in formats else 0
    gguf_work = 0
    if "gguf" in formats and profile.gguf_quantization not in PYTHON_GGUF_TYPES:
        gguf_work = params * torch.empty((), dtype=config_dtype(config)).element_size()
    return int(artifacts + max(onnx_work, gguf_work))


def check_export_disk(config, exit_layer: int, profile, formats: Sequence[str], scheme: str, out_dir) -> None:
    import shutil

    folder = Path(out_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    need, free = export_disk_need(config, exit_layer, profile, formats, scheme), shutil.disk_usage(folder).free
    if need > free:
        raise UserError(
            f"exporting to {out_dir} writes about {human_bytes(need)} at its fullest; {folder} has "
            f"{human_bytes(free)} free"
        )


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # not Linux: no estimate to hold the export to

"""What an export will need, from the model's config alone, checked before any weight is read: the memory this
machine must have at peak, and the size of the artifacts against the target's budget. A request that cannot work is
one line in seconds, not an error after minutes of tracing a 7B model.

Memory, measured on LLaVA-1.5-7B widths (README: Real sizes):
- the language model GGUF streams from the checkpoint a tensor at a time: a constant (libraries, tokenizer) plus a
  few float32 copies of the largest tensor (the embedding);
- ONNX holds the model once, plus a copy of its largest tensor while the weights are written and a constant for the
  libraries (torch, onnx, onnxruntime): 13.5 GiB for 12.9 GiB of float16 weights, 3.0 for 2.3. In float16 when the
  checkpoint is half precision and the scheme is fp16 or int4 (traced as it is), else in float32 (onnxruntime's int8
  quantizers and float16 conversion read float32 graphs) plus what the quantizer loads of the float32 graph.

Artifact bytes per parameter follow from each format's storage (int8: 1 byte, the vision graph's patch and position
embeddings staying float32; MatMulNBits 4-bit with a scale per 32 in the traced precision: 0.5625 from float16, 0.625
from float32; llama.cpp Q4_0 4.5 bits, Q4_K_M about 4.8, Q6_K 6.56, Q8_0 8.5, except that llama.cpp's quantizer keeps
the output matrix in Q6_K: a 7B's Q4_0 is 3.83 GB, not 3.79). A target's default ONNX scheme gives way to the next of
its options whose sets fit the budget (`fit_to_budget`); where no ONNX decoder fits but the hybrid's set does (the ONNX
vision graph + the language model GGUF), the export writes the vision graph alone for the hybrid runtime. A request
whose largest runtime set is still clearly over the budget is refused, and the export's own check of the written files
stays the authority.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.devices.profiles import list_profiles
from edgekit.errors import UserError
from edgekit.export.quantizations import INT4_BLOCK_SIZE, PYTHON_GGUF_TYPES
from edgekit.machine import available_memory
from edgekit.model.families import text_config
from edgekit.model.sizes import config_dtype, model_sizes
from edgekit.units import human_bytes

HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_SCHEMES = ("fp16", "int4")  # what a half-precision model is traced in float16 for (int4 then streams)
GGUF_PEAK_BASE = 2 << 30
GGUF_PEAK_PER_LARGEST_FP32 = 3.0
ONNX_PEAK_BASE = 3 << 28  # 0.75 GiB: the libraries and the exporter's own state
ONNX_PEAK_PER_FP32_BYTE = 2.0
ESTIMATE_MARGIN = 1.1  # refuse up front only when the estimate is this far over the budget

# bytes per parameter: ONNX scheme -> (vision graph, embedding, decoder); GGUF type -> language model. int4's decoder:
# half a byte per weight plus a scale per block, in the precision the graph was traced in (see export_needs)
ONNX_BYTES_PER_PARAM = {
    "fp32": (4, 4, 4),
    "fp16": (2, 2, 2),
    "int8_dynamic": (1, 1, 1),
    "int8_qdq": (1, 4, 1),
    "int4": (4, 4, 0.5 + 4 / INT4_BLOCK_SIZE),
}
GGUF_BYTES_PER_PARAM = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.0625, "q6_k": 0.82, "q4_k_m": 0.6, "q4_0": 0.5625}


def traced_in_half(dtype: torch.dtype, scheme: str) -> bool:
    """Whether the export traces a model held in `dtype` in float16 as it is (else: in float32)."""
    return scheme in HALF_SCHEMES and dtype in HALF_DTYPES


@dataclass(frozen=True)
class OnnxPlan:
    """What an export writes as ONNX: `scheme`; the decoder too (`decoder`), or only the vision graph, which the
    hybrid runtime runs beside the language model GGUF; and `why`, a line saying how it departs from the target's
    default ('' when it does not)."""

    scheme: str
    decoder: bool = True
    why: str = ""


@dataclass(frozen=True)
class ExportNeeds:
    sets: dict[str, int]  # estimated bytes of each runtime set the export would write (see artifacts.RuntimeSet)
    memory: int  # peak memory
    memory_why: str  # what holds it
    disk: int  # bytes written at the export's fullest


def export_needs(
    config, exit_layer: int, profile, formats: Sequence[str], scheme: str, decoder: bool = True
) -> ExportNeeds:
    """What an export of `config`'s model at `exit_layer` will need, from one count of its parameters (`decoder`:
    whether the ONNX graphs include the language model, see OnnxPlan)."""
    sizes = model_sizes(config, exit_layer=exit_layer, dtype=torch.float32)
    tower, projector, language, total = (part.params for part in sizes.parts)
    text = text_config(config)
    embed = text.vocab_size * text.hidden_size
    largest = max(embed, text.hidden_size * getattr(text, "intermediate_size", 0))  # a language-model matrix
    half = traced_in_half(config_dtype(config), scheme)
    saved = total * torch.empty((), dtype=config_dtype(config)).element_size()  # the checkpoint's weight bytes

    vision_params = tower - sizes.saved_params + projector
    per_vision, per_embed, per_decoder = ONNX_BYTES_PER_PARAM[scheme]
    if half:  # the graphs the scheme leaves alone stay as traced, and int4's scales are float16
        per_vision, per_embed = min(per_vision, 2), min(per_embed, 2)
        if scheme == "int4":
            per_decoder = 0.5 + 2 / INT4_BLOCK_SIZE
    vision = vision_params * per_vision + _vision_embedding_params(config) * (4 - per_vision) * scheme.startswith(
        "int8"
    )
    per_lm = GGUF_BYTES_PER_PARAM[profile.gguf_quantization]
    per_output = per_lm if profile.gguf_quantization in PYTHON_GGUF_TYPES else max(per_lm, GGUF_BYTES_PER_PARAM["q6_k"])
    lm = (language - embed) * per_lm + embed * per_output  # the output matrix is as large as the embedding
    sets = {}
    onnx_lm = embed * per_embed + (language - embed) * per_decoder if decoder else 0
    if "onnx" in formats and decoder:
        sets["onnx"] = vision + onnx_lm
    if "gguf" in formats:
        mmproj = vision_params * GGUF_BYTES_PER_PARAM[profile.mmproj_quantization] if "mmproj" in formats else 0
        sets["gguf"] = lm + mmproj
        if "onnx" in formats:
            sets["hybrid"] = vision + lm

    memory = [(0, "")]
    if "gguf" in formats:
        memory.append((int(GGUF_PEAK_BASE + GGUF_PEAK_PER_LARGEST_FP32 * embed * 4), "streams the language model"))
    if "onnx" in formats and not decoder:  # the vision graph alone is traced; the rest stays as saved
        memory.append((ONNX_PEAK_BASE + saved + 2 * 4 * vision_params, "holds the model as saved"))
    elif "onnx" in formats or "mmproj" in formats:
        if half or ("onnx" not in formats and config_dtype(config) in HALF_DTYPES):  # the mmproj reads it as saved
            memory.append((ONNX_PEAK_BASE + 2 * (total + largest), "holds the model in float16"))
        else:
            memory.append(
                (int(ONNX_PEAK_PER_FP32_BYTE * 4 * total), "holds the model in float32 (the quantizers read it)")
            )

    # The artifacts (the ONNX folder, the GGUF files) plus the larger intermediate (the traced graphs a quantizer
    # reads; the GGUF in the checkpoint's precision that llama.cpp quantizes), each removed once used.
    artifacts = (vision + onnx_lm if "onnx" in formats else 0) + sets.get("gguf", 0)
    traced = 0 if scheme == "fp32" or (half and scheme == "fp16") else (2 if half else 4) * total
    traced = traced if decoder else 4 * vision_params
    onnx_work = traced if "onnx" in formats else 0
    gguf_work = 0
    if "gguf" in formats and profile.gguf_quantization not in PYTHON_GGUF_TYPES:
        gguf_work = saved
    need, why = max(memory)
    return ExportNeeds({k: int(v) for k, v in sets.items()}, need, why, int(artifacts + max(onnx_work, gguf_work)))


def _vision_embedding_params(config) -> int:
    """The patch and position embeddings of a ViT tower (none for a config without those fields)."""
    vision = config.vision_config
    if not all(hasattr(vision, key) for key in ("image_size", "patch_size", "num_channels")):
        return 0
    positions = (vision.image_size // vision.patch_size) ** 2 + 1
    return (vision.num_channels * vision.patch_size**2 + positions) * vision.hidden_size


def fit_to_budget(config, exit_layer: int, profile, formats: Sequence[str]) -> OnnxPlan:
    """The ONNX a target gets when no scheme is asked for: its default; where the default's artifacts would be over
    the budget, the first of its `onnx_options` after the default (most precise first) whose would fit; where none
    fits and the formats include the GGUF, the default's vision graph alone for the hybrid runtime, if that fits.
    Where nothing fits, the default, which `check_export` refuses."""
    default = profile.onnx_quantization
    if "onnx" not in formats:
        return OnnxPlan(default)
    budget = profile.memory_budget_bytes
    options = profile.onnx_options[profile.onnx_options.index(default) :]
    sizes = {s: _largest_set(config, exit_layer, profile, formats, s) for s in options}
    scheme = next((s for s in options if sizes[s] <= budget), None)
    if scheme == default:
        return OnnxPlan(default)
    over = (
        f"target {profile.name}: with {default} ONNX the largest runtime set would need about "
        f"{_decimal(sizes[default])}, over the {_decimal(budget)} budget"
    )
    if scheme is not None:
        return OnnxPlan(scheme, why=f"{over}; exporting {scheme} (largest set about {_decimal(sizes[scheme])})")
    hybrid = _largest_set(config, exit_layer, profile, formats, default, decoder=False)
    if "gguf" not in formats or hybrid > budget:
        return OnnxPlan(default)
    smallest = min(sizes, key=sizes.__getitem__)
    if smallest != default:
        over += f", and with {smallest} about {_decimal(sizes[smallest])}"
    return OnnxPlan(
        default,
        decoder=False,
        why=f"{over}; exporting the {default} ONNX vision graph alone, for the hybrid runtime with the "
        f"{profile.gguf_quantization} language model GGUF (about {_decimal(hybrid)})",
    )


def _largest_set(config, exit_layer: int, profile, formats: Sequence[str], scheme: str, decoder: bool = True) -> int:
    return max(export_needs(config, exit_layer, profile, formats, scheme, decoder).sets.values())


def _decimal(n: int) -> str:
    return human_bytes(n, "decimal")


def check_export(config, exit_layer: int, profile, formats: Sequence[str], plan: OnnxPlan, out_dir=None) -> None:
    """Refuse, in one line, an export whose artifacts are clearly over the target's budget, or that this machine
    cannot hold in memory or (with `out_dir`) on disk."""
    scheme = plan.scheme
    needs = export_needs(config, exit_layer, profile, formats, scheme, plan.decoder)
    name, size = max(needs.sets.items(), key=lambda item: item[1])
    budget = profile.memory_budget_bytes
    if size > ESTIMATE_MARGIN * budget:
        gguf = needs.sets.get("gguf", budget + 1)
        fits = name != "gguf" and gguf <= budget
        hint = f"; --formats gguf would fit (about {_decimal(gguf)})" if fits else ""
        roomier = roomier_target(config, exit_layer, profile, formats)
        raise UserError(
            f"artifacts would not fit target {profile.name}: the {name} set needs about {_decimal(size)}"
            f" ({scheme if name == 'onnx' else profile.gguf_quantization}) but the memory budget is "
            f"{_decimal(budget)}{hint}{roomier}"
        )
    available = available_memory()
    if available is not None and needs.memory > available:
        raise UserError(
            f"exporting {','.join(formats)} {needs.memory_why} and needs about {human_bytes(needs.memory)} of memory "
            f"at peak; this machine has {human_bytes(available)} available"
        )
    if out_dir is None:
        return
    folder = Path(out_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needs.disk > free:
        raise UserError(
            f"exporting to {out_dir} writes about {human_bytes(needs.disk)} at its fullest; {folder} has "
            f"{human_bytes(free)} free"
        )


def roomier_target(config, exit_layer: int, profile, formats: Sequence[str]) -> str:
    """'; target NAME would fit (...)' for the first built-in target of the same kind with a larger budget that fits
    these formats with its own scheme, or ''."""
    budget = profile.memory_budget_bytes
    roomier = [p for p in list_profiles() if p.kind == profile.kind and p.memory_budget_bytes > budget]
    for other in sorted(roomier, key=lambda p: p.memory_budget_bytes):
        if not set(formats) <= set(other.accepted_formats):
            continue
        plan = fit_to_budget(config, exit_layer, other, formats)
        size = _largest_set(config, exit_layer, other, formats, plan.scheme, plan.decoder)
        if size <= other.memory_budget_bytes:
            what = plan.scheme if plan.decoder else f"{plan.scheme} vision graph with the hybrid"
            return f"; target {other.name} would fit ({what}, about {_decimal(size)})"
    return ""

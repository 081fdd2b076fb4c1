"""The export stage: a model cut at exit layer k -> the artifacts a target device runs, in one atomic folder.

    OUT/
      manifest.json                  sha256 + bytes + format + quantization of every file; exit layer, target, source
      onnx-k{K}-{scheme}/            vision_encoder / embed_tokens / decoder_model_merged .onnx + edgekit_onnx.json;
                                     + genai_config.json, genai_embedding.onnx for onnxruntime-genai (LLaVA-1.5)
      lm-{qtype}.gguf                language model for llama.cpp (families llama.cpp runs)
      mmproj-k{K}-{qtype}.gguf       vision tower cut at K + projector, for llama.cpp's mtmd (LLaVA-1.5; opt-in)
      processor/                     the HF processor (tokenizer, image processor, chat template) the runtimes use

Memory: the model is held once, in the precision it was saved in. The language model GGUF is written first, streamed
from the checkpoint's files a tensor at a time (the model is not loaded for it); f32/f16/bf16/q8_0 by Python, K-quants
and Q4_0 by llama.cpp's own quantizer from an intermediate in the checkpoint's precision. ONNX: a half-precision model
is traced in float16 for the fp16 and int4 schemes (int4 then quantizes a weight at a time); otherwise the graphs are
traced in float32 and quantized with the profile's scheme (`edgekit.export.onnx_quantize`), the traced graphs being an
intermediate. What the export will need (memory, disk, the budget) is checked from the config first
(`edgekit.export.estimates`); after writing, each runtime set (the ONNX folder; LM + mmproj; the hybrid's vision graph
+ LM) must fit the profile's budget, or the export fails with a UserError and nothing is left written. The budget
covers the weights a device loads, not its KV cache or activations.

Per family, as the family table says (`gguf_language_model`, `gguf_projector`): LLaVA-1.5 can get every artifact.
The mmproj (llama.cpp's own vision pipeline) is written only when `mmproj` is among the formats: that pipeline puts
LLaVA's CLS token in the wrong place upstream, so targets ship the hybrid runtime (the ONNX vision graph + the LM GGUF)
by default. Where no ONNX decoder fits the target's budget but the hybrid's set does, the ONNX folder holds the vision
graph alone (`estimates.OnnxPlan`), and the manifest names the onnx and ortgenai runtimes unsupported, saying why.
LLaVA-NeXT cannot have an mmproj: edgekit's mmproj writer has no anyres (image grid pinpoints, image_newline) support,
and a LLaVA-1.5-style mmproj would silently see only the base tile; the hybrid runtime runs it. Llama 3.2 Vision: ONNX
only (llama.cpp has no support for it). onnxruntime-genai's files (`edgekit.export.genai`, runtime set `ortgenai`) are
written unless the family table says why not (`ortgenai_unsupported`); the manifest records that reason.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgekit.devices.profiles import FORMATS, TargetProfile
from edgekit.devices.runtime import chat_text
from edgekit.errors import UserError
from edgekit.export.estimates import OnnxPlan, check_export, fit_to_budget, roomier_target, traced_in_half
from edgekit.export.manifest import FileEntry, file_entry, write_manifest
from edgekit.export.onnx_format import DECODER_FILE, GENAI_EMBED_FILE, GRAPH_FILES, VISION_FILE
from edgekit.export.quantizations import PYTHON_GGUF_TYPES
from edgekit.machine import release_freed_memory
from edgekit.model.families import attr_path
from edgekit.model.surgery import check_exit_layer
from edgekit.outputs import atomic_dir, check_output_dir, save_processor
from edgekit.units import human_bytes

PROCESSOR_DIR = "processor"
LOSSLESS_GGUF_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_WORK_DIR = ".work"  # intermediates inside the temporary folder, removed before it is renamed into place
CALIBRATION_PROMPTS = (
    "describe the image",
    "what colour is the shape",
    "what is in the middle of the picture",
    "is there a circle or a square",
)


@dataclass(frozen=True)
class RuntimeSet:
    """The files one runtime loads on the device, and their total size."""

    name: str  # onnx | gguf | hybrid | ortgenai
    paths: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    exit_layer: int
    target: str
    files: tuple[FileEntry, ...]
    runtime_sets: tuple[RuntimeSet, ...]
    onnx_dir: str | None  # relative to folder
    lm_gguf: str | None
    mmproj_gguf: str | None

    @property
    def largest_set(self) -> RuntimeSet:
        return max(self.runtime_sets, key=lambda s: s.bytes)


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """'onnx,gguf,mmproj' -> ('onnx', 'gguf', 'mmproj'); unknown or empty -> UserError."""
    items = [f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text)]
    items = [f for f in items if f]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        raise UserError(f"unknown format {', '.join(unknown) or repr(text)}; choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def check_request(
    family,
    num_layers: int,
    exit_layer,
    profile: TargetProfile,
    formats: Sequence[str],
    onnx_quantization: str | None = None,
    config=None,
    out_dir=None,
) -> OnnxPlan:
    """Everything about an export request that can be checked before loading weights; with `config`, the budget,
    memory and (with `out_dir`) disk it needs too. Returns what the ONNX export writes: `onnx_quantization`, or the
    target's default fitted to its budget (`estimates.fit_to_budget`), with a line saying why where it changed."""
    check_exit_layer(exit_layer, num_layers)
    for fmt in formats:
        if fmt not in profile.accepted_formats:
            raise UserError(f"target {profile.name} takes formats {', '.join(profile.accepted_formats)}, not {fmt}")
    if "mmproj" in formats and "gguf" not in formats:
        raise UserError("--formats mmproj needs gguf too: the mmproj feeds the language model GGUF")
    if "mmproj" in formats and not family.gguf_projector:
        raise UserError(
            f"no mmproj for {family.name}: edgekit's mmproj writer has no anyres support; the hybrid runtime (ONNX "
            "vision + the language model GGUF, --formats onnx,gguf) runs it"
        )
    if "gguf" in formats and not family.gguf_language_model:
        raise UserError(f"llama.cpp has no {family.name} support; use --formats onnx")
    scheme = onnx_quantization or profile.onnx_quantization
    if scheme not in profile.onnx_options:
        raise UserError(
            f"target {profile.name} takes ONNX quantization {', '.join(profile.onnx_options)}, not {scheme}"
        )
    plan = OnnxPlan(scheme)
    if config is not None:
        if onnx_quantization is None:
            plan = fit_to_budget(config, exit_layer, profile, formats)
        check_export(config, exit_layer, profile, formats, plan, out_dir)
    return plan


def export_artifacts(
    loaded,
    exit_layer: int,
    profile: TargetProfile,
    out_dir: str | Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    *,
    onnx_quantization: str | None = None,
    calibration_inputs: Sequence[Mapping] | None = None,
    nthread: int = 0,
) -> ExportResult:
    """Cut `loaded` (a LoadedModel) at `exit_layer` and write the target's artifacts to `out_dir` atomically. The
    GGUF is written first, streamed from the checkpoint's files when the weights are not yet in memory; the ONNX
    export loads them and leaves the model cut (`set_exit_layer`). `onnx_quantization` picks one of the profile's
    `onnx_options` (default: the profile's, or the next that fits its budget); `calibration_inputs` (processor
    outputs) calibrate int8_qdq."""
    family, config = loaded.family, loaded.config
    formats = parse_formats(formats or profile.formats)
    num_layers = family.num_layers(config)
    check_output_dir(out_dir, overwrite)
    plan = check_request(family, num_layers, exit_layer, profile, formats, onnx_quantization, config, out_dir)
    scheme = plan.scheme
    entries: list[FileEntry] = []
    onnx_dir = lm_name = mmproj_name = genai_dir = None
    genai_files: list[str] = []
    with atomic_dir(out_dir, overwrite) as tmp:
        work = tmp / _WORK_DIR
        work.mkdir()
        if "gguf" in formats:  # first: from the checkpoint's files, before anything loads the model
            lm_name = f"lm-{profile.gguf_quantization}.gguf"
            _write_lm_gguf(loaded, profile.gguf_quantization, tmp / lm_name, work, nthread)
            entries.append(file_entry(tmp, lm_name, "gguf", profile.gguf_quantization))
        if "onnx" in formats:
            onnx_dir = f"onnx-k{exit_layer}-{scheme}"
            _write_onnx(loaded, exit_layer, profile, plan, tmp / onnx_dir, work, calibration_inputs)
            release_freed_memory()  # the tracer's and quantizers' garbage, before the model's next reader
            if plan.decoder and not family.ortgenai_unsupported:
                from edgekit.export.genai import write_genai

                genai_files = [f"{onnx_dir}/{name}" for name in write_genai(tmp / onnx_dir)]
                genai_dir = onnx_dir
            entries += [
                file_entry(tmp, p, "onnx" if p.suffix == ".onnx" else p.suffix.lstrip("."), scheme)
                for p in sorted((tmp / onnx_dir).iterdir())
            ]
        if "mmproj" in formats:
            mmproj_name = f"mmproj-k{exit_layer}-{profile.mmproj_quantization}.gguf"
            _write_mmproj(loaded, exit_layer, profile.mmproj_quantization, tmp / mmproj_name)
            entries.append(file_entry(tmp, mmproj_name, "gguf", profile.mmproj_quantization))
        shutil.rmtree(work)
        entries += _write_processor(loaded, tmp / PROCESSOR_DIR)
        sets = _runtime_sets(entries, onnx_dir, lm_name, mmproj_name, genai_files)
        largest = max(sets, key=lambda s: s.bytes)
        if largest.bytes > profile.memory_budget_bytes:
            size, budget = (human_bytes(n, "decimal") for n in (largest.bytes, profile.memory_budget_bytes))
            raise UserError(
                f"artifacts do not fit target {profile.name}: the {largest.name} set needs {size} "
                f"({largest.bytes} bytes) but the memory budget is {budget} "
                f"({profile.memory_budget_bytes} bytes); pick a smaller quantization, model or another target"
                + roomier_target(config, exit_layer, profile, formats)
            )
        extra: dict[str, Any] = {
            **family.manifest_fields(config),
            "num_exit_layers": num_layers,
            "formats": list(formats),
            "quantization": {
                "onnx": scheme if onnx_dir else None,
                "gguf": profile.gguf_quantization if lm_name else None,
                "mmproj": profile.mmproj_quantization if mmproj_name else None,
                "fitted_to_budget": plan.why or None,
            },
            "artifacts": {
                "onnx_dir": onnx_dir,
                "lm_gguf": lm_name,
                "mmproj_gguf": mmproj_name,
                "genai_dir": genai_dir,
                "processor_dir": PROCESSOR_DIR,
            },
            "unsupported_runtimes": _unsupported_runtimes(family, plan, formats),
            "memory": {
                "budget_bytes": profile.memory_budget_bytes,
                "largest_set": largest.name,
                "largest_set_bytes": largest.bytes,
                "sets": {s.name: {"bytes": s.bytes, "paths": list(s.paths)} for s in sets},
                "covers": "weights a runtime loads; not the KV cache or activations",
            },
        }
        write_manifest(
            tmp,
            exit_layer=exit_layer,
            target=profile.name,
            source_model=loaded.source,
            revision=loaded.revision,
            files=entries,
            extra=extra,
        )
    return ExportResult(
        Path(out_dir),
        exit_layer,
        profile.name,
        tuple(sorted(entries, key=lambda e: e.path)),
        tuple(sets),
        onnx_dir,
        lm_name,
        mmproj_name,
    )


# --- pieces --------------------------------------------------------------------------------------------------------
def _unsupported_runtimes(family, plan: OnnxPlan, formats: Sequence[str]) -> dict[str, str]:
    """The runtimes this export cannot serve although its formats name them, and why (`runtime.export_files`)."""
    out = {"ortgenai": family.ortgenai_unsupported} if family.ortgenai_unsupported else {}
    if "onnx" in formats and not plan.decoder:
        out |= dict.fromkeys(("onnx", "ortgenai"), f"no ONNX decoder: {plan.why}")
    return out


def _write_onnx(loaded, k, profile, plan: OnnxPlan, out: Path, work: Path, calibration_inputs) -> None:
    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_quantize import quantize, record_traced_fp16

    model, family, scheme = loaded.model, loaded.family, plan.scheme
    parts = GRAPH_FILES if plan.decoder else (VISION_FILE,)
    if traced_in_half(model.dtype, scheme):  # no float32 copy
        traced = out if scheme == "fp16" else work / "onnx-fp16"
        export_onnx(model.to(torch.float16), loaded.processor, family, k, traced, profile.onnx_opset, parts=parts)
        record_traced_fp16(traced)
        if scheme == "int4":  # streams a weight at a time
            quantize(traced, scheme, out)
        return
    fp32 = out if scheme == "fp32" else work / "onnx-fp32"
    # onnxruntime's int8 quantizers and float16 conversion read float32 graphs; only the graphs' modules are cast
    for module in [model] if plan.decoder else [attr_path(model, family.tower), attr_path(model, family.projector)]:
        module.float()
    export_onnx(model, loaded.processor, family, k, fp32, opset=profile.onnx_opset, parts=parts)
    if scheme != "fp32":
        calibration = calibration_inputs
        if scheme == "int8_qdq" and not calibration:
            calibration = default_calibration_inputs(loaded.processor)
        quantize(fp32, scheme, out, calibration_inputs=calibration)


def _write_lm_gguf(loaded, qtype: str, path: Path, work: Path, nthread: int) -> None:
    """The language model GGUF, a tensor at a time: from the checkpoint's files while the model is not in memory
    (memory: one tensor), else from the model as it is in memory. K-quants and Q4_0 go through an intermediate in the
    weights' own precision (f32, f16 or bf16: lossless), which llama.cpp's quantizer reads."""
    from edgekit.export import gguf
    from edgekit.model.families import text_config
    from edgekit.model.weights import CheckpointTensors, ModelTensors, checkpoint_dtype, language_model_tensors

    if loaded.folder is not None and not loaded.in_memory:
        tensors = language_model_tensors(CheckpointTensors(loaded.folder))
    else:
        model = loaded.model
        lm = attr_path(model, loaded.family.language_model)
        tensors = ModelTensors({**lm.state_dict(), "lm_head.weight": model.get_output_embeddings().weight})
    direct = qtype in PYTHON_GGUF_TYPES
    src = path if direct else work / "lm-intermediate.gguf"
    processor = loaded.processor
    gguf.write_language_model(
        text_config(loaded.config),
        tensors,
        processor.tokenizer,
        src,
        ftype=qtype if direct else LOSSLESS_GGUF_TYPES[checkpoint_dtype(tensors)],
        chat_template=processor.chat_template,
        progress=True,
    )
    if not direct:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor to the C-level stderr
            gguf.quantize_with_llama_cpp(src, path, qtype, nthread=nthread)
        src.unlink()


def _write_mmproj(loaded, k: int, qtype: str, path: Path) -> None:
    from edgekit.export import gguf

    model, family = loaded.model, loaded.family
    image_processor = loaded.processor.image_processor
    gguf.write_mmproj(
        attr_path(model, family.tower).state_dict(),
        model.config.vision_config,
        attr_path(model, family.projector).state_dict(),
        path,
        exit_layer=k,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        ftype=qtype,
    )


def _write_processor(loaded, out: Path) -> list[FileEntry]:
    save_processor(loaded.processor, loaded.source, out)
    return [file_entry(out.parent, p, "processor", "none") for p in sorted(out.rglob("*")) if p.is_file()]


def _runtime_sets(entries: list[FileEntry], onnx_dir, lm_name, mmproj_name, genai_files) -> list[RuntimeSet]:
    size = {e.path: e.bytes for e in entries}
    candidates: list[tuple[str, list[str]]] = []
    if onnx_dir and f"{onnx_dir}/{DECODER_FILE}" in size:  # else the vision graph alone, for the hybrid
        in_onnx = [p for p in size if p.startswith(f"{onnx_dir}/") and p.endswith((".onnx", ".onnx_data", ".npy"))]
        candidates.append(("onnx", [p for p in in_onnx if f"/{GENAI_EMBED_FILE}" not in p]))
    if lm_name and mmproj_name:
        candidates.append(("gguf", [lm_name, mmproj_name]))
    if lm_name and onnx_dir:
        vision = [p for p in size if p.startswith(f"{onnx_dir}/vision_encoder") or p.endswith(".npy")]
        candidates.append(("hybrid", [*vision, lm_name]))
    if genai_files:
        candidates.append(("ortgenai", genai_files))
    if not candidates and lm_name:
        candidates.append(("gguf", [lm_name]))
    return [RuntimeSet(name, tuple(sorted(paths)), sum(size[p] for p in paths)) for name, paths in candidates]


def default_calibration_inputs(processor, n: int = 4) -> list[dict]:
    """Processor outputs of a few procedural benign images (gradients and a shape) with short prompts."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        ramp = np.linspace(0, 255, 64)[None, :, None] * rng.uniform(0.3, 1.0, 3)
        image = Image.fromarray(np.broadcast_to(ramp, (48, 64, 3)).astype("uint8"))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        ImageDraw.Draw(image).ellipse([8 + 4 * i, 8, 40 + 4 * i, 40], fill=colour)
        prompt = chat_text(processor, CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)])
        out.append(dict(processor(images=image, text=prompt, return_tensors="pt")))
    return out

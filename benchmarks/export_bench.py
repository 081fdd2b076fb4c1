"""What the exported artifacts cost: vision latency against exit layer k, decode speed per runtime and quantization,
artifact sizes and the peak memory of each runtime process (benchmarks/README.md says how to read the JSON).

    python benchmarks/export_bench.py run [MODEL] [--size tiny|mid] [--out export_bench.json]
    python benchmarks/export_bench.py plot A.json [B.json ...] -o docs/export-latency.png

MODEL is a LLaVA-1.5 checkpoint (folder or hub id); without it the model is built locally with random weights:
`--size tiny` is `make_tiny_checkpoint("llava")`, `--size mid` a ~100M-parameter Llama language model with a 24-block
CLIP tower at 224 px (MID_SIZES). Every artifact comes from edgekit's own exporters (`export_onnx` with only the vision
graph for each k; `export_artifacts` for the full ONNX folders and the GGUF files). Every runtime is measured in its
own fresh process by edgekit's bench harness (`edgekit.devices.bench.lockstep`), side by side in rounds; every number
quoted is a median over the rounds.

1. Vision encode against exit layer k (`TimedVision`): the fp32 ONNX vision graph exported at each k and PyTorch with
   the model exited at k. A least-squares line t(k) = a + b k splits the cost into the blocks (b per block) and what
   is outside them (a: patch embedding, pre-norm, projector, call overhead), against the ideal k/L.
2. Decode (`TimedDecode`): a fixed prompt, `--new-tokens` greedy steps after the first token, eos ignored, in PyTorch
   fp32, ONNX Runtime fp32 / int8 dynamic / int4 and the hybrid runtime (ONNX fp32 vision graph + llama.cpp over the
   LM GGUF in F32 / Q8_0 / Q4_0 / Q4_K_M): vision encode, LM prefill, decode tokens/s.
3. Sizes of the files written and, per runtime, its process's peak RSS (VmHWM) and RSS after imports.

Threads: `--threads` (default 2) for onnxruntime (intra-op; inter-op 1), llama.cpp and torch; their waiting threads
sleep unless `--spin` (measured here: PyTorch vision at k = 24 on the tiny model, 8 ms with 1 thread, 824 ms median
with 2 spinning threads beside one busy neighbour, 17 ms with 2 passive threads).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from export_bench_results import describe_model, machine, markdown, plot, vision_summary

from edgekit.devices.bench import decode_summary, lockstep
from edgekit.model.tiny import TinySizes

# ~100M-parameter language model (TinySizes fixes the MLP at 2 x hidden, so 16 layers of 768 reach it: 95.6M) and a
# CLIP tower of LLaVA-1.5's depth at 224 px in 14 px patches (256 patches + CLS). Rows of 768 and 1536 are whole
# 256-blocks, so llama.cpp's K-quants apply unchanged. Vocabulary 768: the most the default corpus trains.
MID_SIZES = TinySizes(
    vision_hidden=256,
    vision_layers=24,
    vision_heads=4,
    image_size=224,
    patch_size=14,
    text_hidden=768,
    text_layers=16,
    text_heads=12,
    text_kv_heads=12,
    vocab_size=768,
)
DEFAULT_REPEATS = {"tiny": (30, 10), "mid": (20, 7)}  # (vision rounds, decode rounds)
PROMPT_TEXT = "describe the image in detail ."
ONNX_SCHEMES = ("fp32", "int8_dynamic", "int4")
GGUF_TYPES = (("f32", "f32"), ("q8_0", "q8_0"), ("q4_0", "f16"), ("q4_k_m", "f16"))  # (LM, mmproj written beside it)


# --- the run -------------------------------------------------------------------------------------------------------
def _image():
    from PIL import Image, ImageDraw

    ramp = np.linspace(0, 255, 320)[None, :, None] * np.array([0.9, 0.5, 0.2])
    image = Image.fromarray(np.broadcast_to(ramp, (240, 320, 3)).astype("uint8"))
    ImageDraw.Draw(image).ellipse([100, 60, 220, 180], fill=(30, 90, 200))
    return image


def _gguf_tensor_types(path: Path) -> dict[str, int]:
    import gguf

    types: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        name = tensor.tensor_type.name
        types[name] = types.get(name, 0) + 1
    return types


def _bench_profile():
    from edgekit.devices.profiles import load_profile

    return replace(
        load_profile("phone"),
        name="export-bench",
        formats=("onnx", "gguf", "mmproj"),
        onnx_options=ONNX_SCHEMES,
        memory_budget_bytes=10**13,
    )


def export_all(loaded, layers: list[int], exit_layer: int, work: Path, threads: int) -> dict:
    """Vision-only ONNX graphs at every k, then full ONNX folders and LM + mmproj GGUFs at `exit_layer`."""
    from edgekit.export.artifacts import export_artifacts
    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_format import VISION_FILE

    exports: dict = {"vision_by_k": {}, "onnx": {}, "gguf": {}}
    for k in layers:
        start = time.perf_counter()
        folder = work / f"vision-k{k}"
        export_onnx(loaded.model, loaded.processor, loaded.family, k, folder, parts=(VISION_FILE,))
        exports["vision_by_k"][str(k)] = {
            "path": str(folder / VISION_FILE),
            "seconds": round(time.perf_counter() - start, 2),
            "bytes": (folder / VISION_FILE).stat().st_size,
        }
    profile = _bench_profile()

    def one(kind: str, name: str, prof, formats) -> dict:
        start = time.perf_counter()
        try:
            result = export_artifacts(
                loaded,
                exit_layer,
                prof,
                work / f"{kind}-{name}",
                formats=formats,
                onnx_quantization=prof.onnx_quantization,
                nthread=threads,
            )
        except Exception as err:  # noqa: BLE001  recorded, not fatal: the other artifacts still get measured
            return {"error": f"{type(err).__name__}: {err}"}
        files = {e.path: e.bytes for e in result.files if e.format in ("onnx", "gguf", "npy")}
        return {
            "folder": str(result.folder),
            "seconds": round(time.perf_counter() - start, 2),
            "files": files,
            "onnx_dir": result.onnx_dir,
            "lm_gguf": result.lm_gguf,
            "mmproj_gguf": result.mmproj_gguf,
        }

    for scheme in ONNX_SCHEMES:
        print(f"  export onnx {scheme}", file=sys.stderr, flush=True)
        exports["onnx"][scheme] = one("onnx", scheme, replace(profile, onnx_quantization=scheme), ("onnx",))
    for qtype, mmproj in GGUF_TYPES:
        print(f"  export gguf {qtype}", file=sys.stderr, flush=True)
        entry = one("gguf", qtype, replace(profile, gguf_quantization=qtype, mmproj_quantization=mmproj), ("gguf",))
        if "error" not in entry:
            folder = Path(entry["folder"])
            entry["tensor_types"] = {name: _gguf_tensor_types(folder / name) for name in entry["files"]}
        exports["gguf"][qtype] = entry
    return exports


def _files(kind: str, folder: str) -> dict[str, str]:
    from edgekit.devices.runtime import export_files

    return {key: str(path) for key, path in export_files(kind, folder).items()}


def decode_rows(model_path: str, exports: dict, exit_layer: int, n_ctx: int) -> dict[str, dict]:
    """One row per runtime and quantization: what it loads (files, bytes) and the spec of its measurement."""
    hybrid = "hybrid (onnxruntime vision + llama.cpp)"
    files = {f.name: f.stat().st_size for f in sorted(Path(model_path).glob("*.safetensors"))}
    torch_spec = {"runtime": "pytorch", "files": {"checkpoint": model_path}, "options": {"exit_layer": exit_layer}}
    rows = {"torch-fp32": {"runtime": "pytorch", "quantization": "fp32", "files": files, "spec": torch_spec}}
    for scheme in ONNX_SCHEMES:
        e = exports["onnx"][scheme]
        spec = e if "error" in e else {"runtime": "onnx", "files": _files("onnx", e["folder"])}
        rows[f"onnx-{scheme}"] = {
            "runtime": "onnxruntime",
            "quantization": scheme,
            "files": e.get("files", {}),
            "spec": spec,
        }
    onnx = exports["onnx"]["fp32"]
    for qtype, _ in GGUF_TYPES:
        e = exports["gguf"][qtype]
        if "error" in e or "error" in onnx:
            rows[f"hybrid-{qtype}"] = {
                "runtime": hybrid,
                "quantization": qtype,
                "files": {},
                "spec": e if "error" in e else onnx,
            }
            continue
        vision_file = f"{onnx['onnx_dir']}/vision_encoder.onnx"
        rows[f"hybrid-{qtype}"] = {
            "runtime": hybrid,
            "quantization": qtype,
            "files": {vision_file: onnx["files"][vision_file], e["lm_gguf"]: e["files"][e["lm_gguf"]]},
            "spec": {
                "runtime": "hybrid",
                "files": {**_files("onnx", onnx["folder"]), **_files("gguf", e["folder"])},
                "options": {"n_ctx": n_ctx},
            },
        }
    for row in rows.values():
        row["weights_bytes"] = sum(row["files"].values())
        if "error" in row["spec"]:
            row["spec"] = {"error": f"export failed: {row['spec']['error']}"}
    return rows


def run(args) -> None:
    import torch

    from edgekit.devices.runtime import Prompt, processor_inputs
    from edgekit.model.loading import load
    from edgekit.model.surgery import num_exit_layers
    from edgekit.model.tiny import build_tiny, make_tiny_checkpoint, save_tiny

    torch.set_num_threads(args.threads)
    vision_repeats, decode_repeats = DEFAULT_REPEATS[args.size]
    vision_repeats, decode_repeats = args.vision_repeats or vision_repeats, args.decode_repeats or decode_repeats
    work = Path(args.work or tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.model:
        model_path, label = args.model, args.model
    elif args.size == "tiny":
        model_path, label = str(make_tiny_checkpoint("llava", work / "tiny-llava")), "tiny LLaVA-1.5 (random)"
    else:
        model, processor = build_tiny("llava", MID_SIZES)
        model_path, label = str(save_tiny(model, processor, work / "mid-llava")), "mid-size LLaVA-1.5 (random)"
        del model, processor
    loaded = load(model_path, dtype="float32")
    if loaded.family.gguf_projector is None or loaded.family.name != "LLaVA-1.5":
        sys.exit(f"export_bench measures LLaVA-1.5 checkpoints; {model_path} is {loaded.family.name}")
    config = loaded.model.config
    num_layers = num_exit_layers(loaded.model)
    exit_layer = args.exit_layer or loaded.family.default_exit(config)
    layers = sorted({k for k in (args.layers or [1, 4, 8, 12, 16, 20, num_layers]) if 1 <= k <= num_layers})
    if layers[-1] != num_layers:
        layers.append(num_layers)
    image = _image()
    image.save(work / "prompt.png")
    inputs = processor_inputs(loaded.processor, Prompt(image, PROMPT_TEXT))
    np.save(work / "pixel_values.npy", inputs["pixel_values"].numpy())
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    model_info = describe_model(loaded, label, model_path, exit_layer, image_tokens)
    print(f"{label}: {model_info['params']['total'] / 1e6:.1f}M parameters; exporting to {work}", file=sys.stderr)
    exports = export_all(loaded, layers, exit_layer, work, args.threads)
    export_s = time.perf_counter() - started
    del loaded
    gc.collect()

    common = {"threads": args.threads, "spin": args.spin}
    graphs = {str(k): e["path"] for k, e in exports["vision_by_k"].items()}
    vision_spec = {
        **common,
        "kind": "vision",
        "warmup": args.warmup,
        "graphs": graphs,
        "model": model_path,
        "pixels": str(work / "pixel_values.npy"),
    }
    vision_specs = {f"{runtime}_fp32": {**vision_spec, "runtime": runtime} for runtime in ("onnx", "pytorch")}
    measured = lockstep(work, vision_specs, vision_repeats, _progress)
    vision = {
        "layers": layers,
        "L": num_layers,
        "rounds": vision_repeats,
        "ideal_ratio": {str(k): round(k / num_layers, 4) for k in layers},
    }
    for name, r in measured.items():
        vision[name] = vision_summary(r, layers) if r.get("runs") else r

    n_ctx = -(-(prompt_tokens + args.new_tokens + 16) // 256) * 256
    decode_spec = {
        **common,
        "kind": "decode",
        "warmup": 1,
        "steps": args.new_tokens,
        "prompts": [{"image": str(work / "prompt.png"), "text": PROMPT_TEXT}],
    }
    rows = decode_rows(model_path, exports, exit_layer, n_ctx)
    specs = {name: row.pop("spec") for name, row in rows.items()}
    measured = lockstep(
        work,
        {name: spec if "error" in spec else {**decode_spec, **spec} for name, spec in specs.items()},
        decode_repeats,
        _progress,
    )
    decode = []
    for name, row in rows.items():
        r = measured[name]
        runs = r.pop("runs", [])
        decode.append({**row, **r, **(decode_summary(runs) if runs else {})})

    result = {
        "benchmark": "export_bench",
        "size": None if args.model else args.size,
        "model": model_info,
        "settings": {
            "threads": args.threads,
            "spin_waits": args.spin,
            "vision_rounds": vision_repeats,
            "decode_rounds": decode_repeats,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "prompt_text": PROMPT_TEXT,
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "llama_n_ctx": n_ctx,
            "decode_steps": "tokens after the first one; eos ignored; tok/s = steps / their time",
            "peak_rss": "VmHWM of the runtime's own process at its end (ru_maxrss would carry the parent's "
            "RSS at fork across exec)",
            "mid_sizes": asdict(MID_SIZES) if args.size == "mid" and not args.model else None,
        },
        "machine": {
            **machine(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "export_s": round(export_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "exports": exports,
        "vision": vision,
        "decode": decode,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="export, measure, write JSON and print Markdown")
    r.add_argument("model", nargs="?", help="a LLaVA-1.5 checkpoint; default: built locally (--size)")
    r.add_argument("--size", choices=tuple(DEFAULT_REPEATS), default="tiny")
    r.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], help="exit layers, e.g. 1,4,8,24")
    r.add_argument("--exit-layer", type=int, help="exit layer of the decode artifacts (default: the model's)")
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--vision-repeats", type=int, help="rounds (default: 30 tiny, 20 mid)")
    r.add_argument("--decode-repeats", type=int, help="decode rounds (default: 10 tiny, 7 mid)")
    r.add_argument("--warmup", type=int, default=2, help="untimed vision runs per k (decode: 1 run)")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument(
        "--spin",
        action="store_true",
        help="let onnxruntime / OpenMP threads spin while they wait "
        "(their default; on a machine shared with other work, spinning threads stall each other)",
    )
    r.add_argument("--work", help="keep the artifacts in this folder (default: a temporary one, removed)")
    r.add_argument("--keep", action="store_true", help="keep the temporary folder")
    r.add_argument("--out", default="export_bench.json")
    p = sub.add_parser("plot", help="vision latency against exit layer from result JSONs")
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--out", default="docs/export-latency.png")
    args = ap.parse_args()
    if args.command == "run":
        run(args)
    else:
        plot(args.results, args.out)


if __name__ == "__main__":
    main()

"""export_bench's results beside the raw measurements (the model, the machine, the vision summaries with their
t(k) = a + b k fit) and how they are shown: Markdown tables and a plot of vision latency against exit layer.

    python benchmarks/export_bench.py plot A.json [B.json ...] -o docs/export-latency.png
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import numpy as np

MB = 1024 * 1024  # MiB: what VmHWM (kB / 1024) and the tables report
# The model's dimensions recorded in the result: JSON key -> config attribute.
VISION_FIELDS = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
}
TEXT_FIELDS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
}


def describe_model(loaded, label: str, source: str, exit_layer: int, image_tokens: int) -> dict:
    from edgekit.model.surgery import num_exit_layers

    config = loaded.model.config
    return {
        "label": label,
        "source": source,
        "params": _params(loaded),
        "exit_layer_for_decode": exit_layer,
        "vision": {
            "layers": num_exit_layers(loaded.model),
            **_fields(config.vision_config, VISION_FIELDS),
            "image_tokens": image_tokens,
        },
        "text": _fields(config.text_config, TEXT_FIELDS),
    }


def _params(loaded) -> dict:
    from edgekit.model.families import attr_path

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    model, family = loaded.model, loaded.family
    vision, projector = count(attr_path(model, family.tower)), count(attr_path(model, family.projector))
    return {
        "total": count(model),
        "vision_tower": vision,
        "projector": projector,
        "language_model": count(model) - vision - projector,
    }


def _fields(config, names: dict[str, str]) -> dict:
    return {key: getattr(config, attr) for key, attr in names.items()}


def vision_summary(measured: dict, layers: list[int]) -> dict:
    """Per k: median and min over the rounds, ratio of medians to k = L, and the a + b k fit."""
    runs = measured.pop("runs")
    times = {str(k): [run[str(k)] for run in runs] for k in layers}
    median = {k: round(statistics.median(t) * 1000, 4) for k, t in times.items()}
    full = median[str(layers[-1])]
    return {
        "median_ms": median,
        "ratio_to_L": {k: round(v / full, 4) for k, v in median.items()},
        "fit": _fit(layers, median),
        "min_ms": {k: round(min(t) * 1000, 4) for k, t in times.items()},
        **measured,
        "runs_ms": {k: [round(x * 1000, 4) for x in t] for k, t in times.items()},
    }


def _fit(layers: list[int], median_ms: dict[str, float]) -> dict:
    """t(k) = a + b k by least squares: a is what the k blocks do not explain."""
    ks = np.array(layers, dtype=float)
    t = np.array([median_ms[str(k)] for k in layers])
    b, a = np.polyfit(ks, t, 1)
    full = median_ms[str(layers[-1])]
    return {
        "outside_blocks_ms": round(float(a), 4),
        "per_block_ms": round(float(b), 4),
        "outside_blocks_share_at_L": round(float(a) / full, 4),
    }


def machine() -> dict:
    """The CPU, core count and package versions a result was measured with."""
    import os
    from importlib.metadata import version

    packages = ("torch", "transformers", "onnxruntime", "llama-cpp-python", "gguf")
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(result: dict) -> str:
    m, v = result["model"], result["vision"]
    out = [
        f"**{m['label']}**: {m['params']['total'] / 1e6:.1f}M parameters (vision tower "
        f"{m['params']['vision_tower'] / 1e6:.1f}M, projector {m['params']['projector'] / 1e6:.2f}M, language "
        f"model {m['params']['language_model'] / 1e6:.1f}M); {m['vision']['image_tokens']} image tokens, "
        f"{result['settings']['prompt_tokens']} prompt tokens; {result['settings']['threads']} threads",
        "",
        f"Vision encode (median of {v['rounds']} rounds, k interleaved)",
        "",
        "| k | ONNX fp32 ms | ratio to k=L | PyTorch ms | ratio to k=L | ideal k/L | vision graph MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    onnx, torch_ = v["onnx_fp32"], v["pytorch_fp32"]
    cell = lambda r, key, k, fmt: format(r[key][str(k)], fmt) if key in r else "n/a"  # noqa: E731
    for k in v["layers"]:
        size = result["exports"]["vision_by_k"][str(k)]["bytes"] / MB
        out.append(
            f"| {k} | {cell(onnx, 'median_ms', k, '.2f')} | {cell(onnx, 'ratio_to_L', k, '.3f')} | "
            f"{cell(torch_, 'median_ms', k, '.2f')} | {cell(torch_, 'ratio_to_L', k, '.3f')} | "
            f"{v['ideal_ratio'][str(k)]:.3f} | {size:.2f} |"
        )
    for name, r in (("ONNX", onnx), ("PyTorch", torch_)):
        if "fit" in r:
            f = r["fit"]
            out.append(
                f"\n{name} fit t(k) = {f['outside_blocks_ms']:.2f} + {f['per_block_ms']:.3f} k ms: "
                f"{f['outside_blocks_share_at_L']:.1%} of k=L is outside the blocks (other processes used "
                f"{r.get('other_processes_cores', float('nan')):.2f} cores meanwhile)"
            )
        else:
            out.append(f"\n{name}: {r.get('error')}")
    s = result["settings"]
    out += [
        "",
        f"Decode: {s['new_tokens']} greedy steps after the first token, median of {s['decode_rounds']} rounds; "
        "each row its own process",
        "",
        "| runtime | weights | files MiB | vision ms | LM prefill ms | decode tok/s | peak RSS MiB | RSS after "
        "imports MiB | other processes, cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
        head = f"| {r['runtime']} | {r['quantization']} | {r['weights_bytes'] / MB:.1f} |"
        if "decode_tok_s" not in r:
            out.append(f"{head} not measured: {r.get('error')} ||||||")
        else:
            out.append(
                f"{head} {r['vision_ms']:.1f} | {r['lm_prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                f"{r.get('peak_rss_mb', float('nan')):.0f} | {r['rss_after_imports_mb']:.0f} | "
                f"{r.get('other_processes_cores', float('nan')):.2f} |"
            )
    out += ["", "Artifact sizes (bytes as written)", "", "| artifact | file | bytes | MiB |", "|---|---|---|---|"]
    listed = set()
    for kind in ("onnx", "gguf"):
        for name, e in result["exports"][kind].items():
            if "error" in e:
                out.append(f"| {kind} {name} | export failed: {e['error']} | | |")
                continue
            for path, size in sorted(e["files"].items()):
                if path not in listed:  # the f16 mmproj is written beside Q4_0 and Q4_K_M alike: list it once
                    listed.add(path)
                    out.append(f"| {kind} {name} | {path} | {size} | {size / MB:.2f} |")
    return "\n".join(out)


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in paths]
    fig, (rel, ab) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_l = max(r["vision"]["L"] for r in results)
    rel.plot([0, max_l], [0, 1], "k--", lw=1.2, label="ideal k/L (only blocks cost)")
    for i, r in enumerate(results):
        v, name = r["vision"], r["model"]["label"].replace(" (random)", "")
        name += f", {r['model']['params']['total'] / 1e6:.1f}M"
        for runtime, marker, style in (("onnx_fp32", "o", "-"), ("pytorch_fp32", "s", ":")):
            m = v[runtime]
            if "median_ms" not in m:
                continue
            label = f"{name}: {'ONNX Runtime' if runtime == 'onnx_fp32' else 'PyTorch'}"
            ks = v["layers"]
            rel.plot(ks, [m["ratio_to_L"][str(k)] for k in ks], marker=marker, ls=style, color=colours[i], label=label)
            ab.plot(ks, [m["median_ms"][str(k)] for k in ks], marker=marker, ls=style, color=colours[i], label=label)
    rel.set(
        xlabel="exit layer k (vision blocks run)",
        ylabel="latency / latency at k = L",
        title="Vision encode, relative to the full tower",
        xlim=(0, max_l + 0.5),
        ylim=(0, 1.08),
    )
    ab.set(
        xlabel="exit layer k (vision blocks run)",
        ylabel="median latency (ms, log scale)",
        yscale="log",
        title="Vision encode, absolute (CPU, 2 threads, fp32)",
        xlim=(0, max_l + 0.5),
    )
    for axis in (rel, ab):
        axis.grid(alpha=0.3)
    rel.legend(fontsize=7.5, loc="upper left")
    ab.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")

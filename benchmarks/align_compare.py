"""L-PPO against the layer-wise SFT baseline, at one exit layer and over an exit range, scanned on the eval split.

    python benchmarks/align_compare.py [MODEL] [--exit-layer 12] [--range 8-16] [--layers 8,10,12,14,16,23]
        [--steps 100] [--limit-per-kind N] [--out benchmarks/results/align_compare_demo.json]
        [--plot docs/align-compare.png]

Runs, on the same model (the demo model without MODEL): a scan before alignment, then for each of L-PPO and SFT an
alignment at `--exit-layer` and one over `--range` (one adapter, the layer sampled per batch), each followed by a scan
of its merged checkpoint at every layer of `--layers`. Every alignment uses the default LPPOConfig but `--steps`
(the settings `edgekit build` uses); every scan reads the whole eval split (or N items per kind), greedy, judged
offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgekit.align.config import LPPOConfig
from edgekit.align.rewards import JudgeReward
from edgekit.align.trainer import align
from edgekit.model.loading import load
from edgekit.model.surgery import num_exit_layers
from edgekit.safety.judges import RefusalJudge
from edgekit.safety.report import LABELS, scan_rows
from edgekit.safety.scan import METRICS, parse_layers, scan
from edgekit.safety.suite import builtin_suite


def scan_model(loaded, layers: list[int], limit: int | None, split: str = "eval") -> list[dict]:
    items = builtin_suite().select(split, limit_per_kind=limit)
    return scan_rows(scan(loaded, items, layers, RefusalJudge(), max_new_tokens=24))


def run(
    model: str, name: str, config: LPPOConfig, method: str, layers: list[int], limit: int | None, work: Path
) -> dict:
    print(f"{name}: aligning", file=sys.stderr, flush=True)
    start = time.time()
    result = align(
        load(model, dtype="float32"),
        work / name,
        config,
        JudgeReward() if method == "lppo" else None,
        method=method,
        progress=False,
    )
    seconds = time.time() - start
    aligned = load(work / name / "merged", dtype="float32")
    return {
        "method": method,
        "exit_layers": list(config.layers),
        "align_seconds": round(seconds, 1),
        "last": result.last,
        "layers": scan_model(aligned, layers, limit),
    }


def markdown(runs: dict[str, dict]) -> str:
    layers = [r["layer"] for r in runs["before"]["layers"]]
    header = "| run | " + " | ".join(f"L{k} ASR / OR / util %" for k in layers) + " |"
    lines = [header, "|---" * (len(layers) + 1) + "|"]
    for name, run_ in runs.items():
        cells = [" / ".join(f"{100 * r[m]:.1f}" for m in METRICS) for r in run_["layers"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path, exit_layer: int, span: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), sharex=True)
    for ax, metric in zip(axes, METRICS):
        for i, (name, run_) in enumerate(runs.items()):
            rows = run_["layers"]
            x = [r["layer"] for r in rows]
            ax.plot(
                x,
                [100 * r[metric] for r in rows],
                "--" if name == "before" else "-",
                marker="o",
                color=f"C{i}",
                label=name,
            )
        ax.axvspan(span[0], span[1], color="grey", alpha=0.08)
        ax.axvline(exit_layer, color="black", linestyle=":", linewidth=1)
        ax.set(title=LABELS[metric], xlabel="vision exit layer", ylabel="%", ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"L-PPO vs layer-wise SFT: at exit {exit_layer} and over {span[0]}-{span[1]} (shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--exit-layer", type=int, default=12)
    ap.add_argument("--range", default="8-16")
    ap.add_argument("--layers", default="8,10,12,14,16,23")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--limit-per-kind", type=int, help="eval items per kind (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="align_compare.json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from edgekit.model.demo import demo_model_path

        args.model = str(demo_model_path())
    original = load(args.model, dtype="float32")
    layers = parse_layers(args.layers, num_exit_layers(original.model))
    low, high = map(int, args.range.split("-"))
    runs = {"before": {"layers": scan_model(original, layers, args.limit_per_kind)}}
    with tempfile.TemporaryDirectory() as work:
        for method in ("lppo", "sft"):
            for name, span in ((f"{method} @{args.exit_layer}", None), (f"{method} @{low}-{high}", (low, high))):
                config = LPPOConfig(exit_layer=args.exit_layer, exit_layers=span, steps=args.steps)
                runs[name] = run(
                    args.model, name.replace(" @", "-"), config, method, layers, args.limit_per_kind, Path(work)
                )
    record = {"model": args.model, "steps": args.steps, "reward": JudgeReward().name, "runs": runs}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(markdown(runs))
    if args.plot:
        plot(runs, Path(args.plot), args.exit_layer, (low, high))


if __name__ == "__main__":
    main()

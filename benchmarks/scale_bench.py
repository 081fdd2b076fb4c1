"""Time and peak memory of each stage against model size: the mid-size LLaVA-1.5 of export_bench (about 115M
parameters), LLaVA-1.5-7B widths with 4 language-model layers (1.4B) and the full LLaVA-1.5-7B dimensions (7.1B),
random weights in the hub's layout (`edgekit.model.real_sizes`).

    python benchmarks/scale_bench.py [--work DIR] [--sizes mid,1.4b,7b] [--out benchmarks/results/scale_bench.json]
        [--plot docs/scale-bench.png]

Exports target jetson-agx-orin, the profile whose budget (28 GB) holds a 7B in fp16. Each stage is its own `edgekit`
process; its peak memory is that process's maximum RSS (`os.wait4`; this script imports no torch, so the floor it
leaves under that figure is a few dozen MB). A stage edgekit refuses on this machine is recorded with its one-line
reason and the seconds the refusal took. Checkpoints are written once into --work and reused; what the stages
write is removed once measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = {
    "inspect": ["inspect", "{model}", "--exit-layer", "12"],
    "truncate": ["truncate", "{model}", "--exit-layer", "12", "-o", "{work}/{size}-truncated", "--overwrite"],
    "export onnx+gguf": [
        *("export", "{model}", "--exit-layer", "12", "--target", "jetson-agx-orin"),
        *("-o", "{work}/{size}-export", "--overwrite"),
    ],
    "export gguf": [
        *("export", "{model}", "--exit-layer", "12", "--target", "jetson-agx-orin", "--formats", "gguf"),
        *("-o", "{work}/{size}-gguf", "--overwrite"),
    ],
}


def _python(code: str, *args: str) -> str:
    """Run `code` in a fresh Python and return its stdout: this process never imports torch, so the processes it
    starts do not inherit a large high-water mark (Linux carries it into ru_maxrss across fork and exec)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def checkpoint(size: str, work: Path) -> Path:
    """The size's checkpoint in `work`, written on first use."""
    folder = work / f"{size}-model"
    if (folder / "config.json").is_file():
        return folder
    if size == "mid":
        code = (
            "import sys; sys.path.insert(0, sys.argv[2]); from export_bench import MID_SIZES; "
            "from edgekit.model.tiny import build_tiny, save_tiny; "
            "save_tiny(*build_tiny('llava', MID_SIZES), sys.argv[1])"
        )
        _python(code, str(folder), str(Path(__file__).parent))
    else:
        layers = ["--lm-layers", "4"] if size == "1.4b" else []
        subprocess.run(
            [sys.executable, "-m", "edgekit.model.real_sizes", "llava-1.5-7b", str(folder), *layers], check=True
        )
    return folder


def parameters(model: Path) -> int:
    code = (
        "import sys; from edgekit.model.loading import load_config; from edgekit.model.sizes import model_sizes; "
        "print(model_sizes(load_config(sys.argv[1])).parts[-1].params)"
    )
    return int(_python(code, str(model)).splitlines()[-1])


def measure(argv: list[str]) -> dict:
    """One edgekit command in its own process: seconds, its peak RSS, and its exit code and last stderr line."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgekit.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    err = process.stderr.read().strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    row = {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "exit_code": code}
    return row | ({"message": err[-1]} if code else {})


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        points = [(r["params"], r["stages"][stage]) for r in results.values() if r["stages"][stage]["exit_code"] == 0]
        if not points:
            continue
        params = [p for p, _ in points]
        axes[0].plot(params, [s["seconds"] for _, s in points], marker="o", label=stage)
        axes[1].plot(params, [s["peak_rss_gib"] for _, s in points], marker="o", label=stage)
    params = sorted(r["params"] for r in results.values())
    axes[1].plot(params, [2 * p / 2**30 for p in params], "k--", lw=1, label="fp16 checkpoint")
    axes[1].legend(fontsize=8)
    for ax, label in zip(axes, ("seconds", "peak RSS (GiB)")):
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("edgekit stages against model size (stages edgekit refused on this machine are left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/edgekit-scale-bench")
    ap.add_argument("--sizes", default="mid,1.4b,7b")
    ap.add_argument("--out", default="benchmarks/results/scale_bench.json")
    ap.add_argument("--plot", default="docs/scale-bench.png")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        model = checkpoint(size, work)
        params = parameters(model)
        results[size] = {"params": params, "stages": {}}
        for stage, template in STAGES.items():
            argv = [part.format(model=model, work=work, size=size) for part in template]
            results[size]["stages"][stage] = row = measure(argv)
            if "-o" in argv:  # outputs are not kept: a 7B export is 18 GB
                shutil.rmtree(argv[argv.index("-o") + 1], ignore_errors=True)
            print(f"{size} ({params / 1e9:.2f}B) {stage}: {json.dumps(row)}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(args.plot))


if __name__ == "__main__":
    main()

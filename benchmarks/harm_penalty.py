"""Choose the judge reward's harm penalty on the TRAIN split: L-PPO at one exit layer with each candidate penalty,
each merged checkpoint scanned at that layer and the default one on train-split items. The eval split is never read.

    python benchmarks/harm_penalty.py [MODEL] [--exit-layer 12] [--penalties 1,2,3] [--limit-per-kind 100]
        [--steps 100] [--out benchmarks/results/harm_penalty_demo.json]

Prints ASR / over-refusal / utility (%) per penalty. The rule edgekit's default follows: the smallest penalty with
which alignment lowers ASR at both layers. Train items were trained on, so over-refusal and utility here flatter the
model; the eval split (benchmarks/align_compare.py) is where results are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from align_compare import markdown, scan_model  # this folder is on sys.path when a script in it runs

from edgekit.align.config import LPPOConfig
from edgekit.align.rewards import JudgeReward
from edgekit.align.trainer import align
from edgekit.model.loading import load
from edgekit.safety.scan import METRICS


def scan_train(loaded, layers: list[int], limit: int) -> list[dict]:
    return [{"layer": r["layer"], **{m: r[m] for m in METRICS}} for r in scan_model(loaded, layers, limit, "train")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--exit-layer", type=int, default=12)
    ap.add_argument("--penalties", default="1,2,3")
    ap.add_argument("--limit-per-kind", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="harm_penalty.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from edgekit.model.demo import demo_model_path

        args.model = str(demo_model_path())
    original = load(args.model, dtype="float32")
    layers = sorted({args.exit_layer, original.family.default_exit(original.model.config)})
    runs = {"before": {"layers": scan_train(original, layers, args.limit_per_kind)}}
    config = LPPOConfig(exit_layer=args.exit_layer, steps=args.steps)
    with tempfile.TemporaryDirectory() as work:
        for penalty in map(float, args.penalties.split(",")):
            print(f"harm penalty {penalty:g}: aligning", file=sys.stderr, flush=True)
            out, start = Path(work) / f"penalty-{penalty:g}", time.time()
            align(load(args.model, dtype="float32"), out, config, JudgeReward(harm_penalty=penalty), progress=False)
            runs[f"penalty {penalty:g}"] = {
                "align_seconds": round(time.time() - start, 1),
                "layers": scan_train(load(out / "merged", dtype="float32"), layers, args.limit_per_kind),
            }
    record = {
        "model": args.model,
        "split": "train",
        "limit_per_kind": args.limit_per_kind,
        "steps": args.steps,
        "exit_layer": args.exit_layer,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(markdown(runs))


if __name__ == "__main__":
    main()

"""Run several demo-model recipes in parallel processes, one JSON per recipe (see benchmarks/demo_recipe.py).

    python benchmarks/demo_sweep.py RECIPES.jsonl OUT_DIR [--device cuda] [--timeout 560]

RECIPES.jsonl holds one JSON object of DemoRecipe overrides per line. On a many-core machine each process gets one
thread; on 2 cores run them one at a time (--parallel 1): two trainings side by side run far slower than in turn. A
recipe with `batch_parts` N trains on N cores whatever the thread count, one per part.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes")
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = [line.strip() for line in Path(args.recipes).read_text().splitlines() if line.strip()]
    script = Path(__file__).with_name("demo_recipe.py")
    running: list[subprocess.Popen] = []
    for i, recipe in enumerate(recipes):
        if len(running) >= args.parallel:
            running.pop(0).wait()
        log = open(out / f"v{i}.log", "w")
        cmd = [
            sys.executable,
            str(script),
            str(out / f"v{i}.json"),
            "--recipe",
            recipe,
            "--device",
            args.device,
            "--threads",
            "1" if args.parallel > 1 else "2",
        ]
        running.append(subprocess.Popen(["timeout", str(args.timeout), *cmd], stdout=log, stderr=subprocess.STDOUT))
    for process in running:
        process.wait()


if __name__ == "__main__":
    main()

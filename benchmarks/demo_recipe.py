"""Train one demo-model recipe, then scan it and probe every layer: the experiment behind the demo model's card.

python benchmarks/demo_recipe.py OUT.json [--recipe '{"seed": 1, "chat_steps": 1500}'] [--keep DIR]
    [--tower MODEL] [--layers 12,23] [--per-kind N]

--tower reuses the tower of a demo model trained with the same tower settings (a screen of stages 0-2: what the full
run would give, minutes sooner); --per-kind 0 scans the whole eval split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict

import torch
from probe import probe_layers

from edgekit.model.demo import DemoRecipe, train_demo
from edgekit.model.loading import load
from edgekit.safety.judges import RefusalJudge
from edgekit.safety.scan import scan
from edgekit.safety.suite import KINDS, builtin_suite

LAYERS = [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23, 24]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--recipe", default="{}")
    ap.add_argument("--keep")
    ap.add_argument("--tower")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.recipe)
    if "mix" in overrides:
        overrides["mix"] = tuple(overrides["mix"])
    recipe = DemoRecipe(**overrides)
    folder = args.keep or tempfile.mkdtemp()
    start = time.time()
    train_demo(folder, recipe, log=lambda line: print(line, flush=True), device=args.device, tower_from=args.tower)
    trained = time.time() - start
    loaded = load(folder, dtype="float32", device=args.device)
    layers = [int(x) for x in args.layers.split(",")]
    items = builtin_suite().select("eval", limit_per_kind=args.per_kind or None)
    result = scan(loaded, items, layers, RefusalJudge(), batch_size=50, max_new_tokens=20)
    probes = probe_layers(loaded, layers)
    rows = []
    for layer in result.layers:
        row = {"layer": layer.layer} | {k: round(v.value, 3) for k, v in layer.metrics.items() if v.value is not None}
        rows.append(row | {f"probe_{k}": round(v, 3) for k, v in probes[layer.layer].items()})
        print(json.dumps(rows[-1]), flush=True)
    samples = {
        layer.layer: {kind: [a.response for a in layer.answers if a.item.kind == kind][:3] for kind in KINDS}
        for layer in result.layers
        if layer.layer in (12, 23)
    }
    json.dump(
        {"recipe": asdict(recipe), "train_seconds": trained, "layers": rows, "samples": samples},
        open(args.out, "w"),
        indent=1,
    )


if __name__ == "__main__":
    main()

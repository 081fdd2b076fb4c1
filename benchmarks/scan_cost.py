"""What the ICET scan costs: vision-tower forwards and time per layer, against exiting the model once per layer.

    python benchmarks/scan_cost.py [MODEL] [--items 48] [--out scan_cost.json]

Counts every image that passes through the vision tower (a forward hook on the tower), for edgekit's scan (one
tower forward per batch yields all layers) and for the naive way (cut the model at each layer, then generate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from edgekit.model.families import attr_path
from edgekit.model.loading import load
from edgekit.model.surgery import num_exit_layers, set_exit_layer
from edgekit.model.tiny import make_tiny_checkpoint
from edgekit.safety.judges import RefusalJudge
from edgekit.safety.scan import chat_inputs, scan
from edgekit.safety.suite import builtin_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="scan_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = args.model or str(make_tiny_checkpoint("llava", tempfile.mkdtemp() + "/tiny-llava"))
    loaded = load(model, dtype="float32")
    layers = list(range(1, num_exit_layers(loaded.model) + 1))
    items = builtin_suite().select("eval", limit_per_kind=args.items // 5 + 1)[: args.items]
    images_through_tower = [0]
    tower = attr_path(loaded.model, loaded.family.tower)
    tower.register_forward_hook(
        lambda m, a, out: images_through_tower.__setitem__(0, images_through_tower[0] + len(a[0]))
    )

    def timed(fn) -> tuple[float, int]:
        times, seen = [], 0
        for _ in range(args.repeats):
            images_through_tower[0] = 0
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            seen = images_through_tower[0]
        return statistics.median(times), seen

    def edgekit_scan():
        scan(loaded, items, layers, RefusalJudge(), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    @torch.no_grad()
    def per_layer_exit():
        tokenizer = loaded.processor.tokenizer
        for k in layers:
            set_exit_layer(loaded.model, k)
            for start in range(0, len(items), args.batch_size):
                inputs = chat_inputs(loaded.processor, items[start : start + args.batch_size])
                out = loaded.model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                RefusalJudge().judge([i.prompt for i in items[start : start + args.batch_size]], texts)
        set_exit_layer(loaded.model, layers[-1])

    scan_s, scan_images = timed(edgekit_scan)
    naive_s, naive_images = timed(per_layer_exit)
    result = {
        "model": model,
        "items": len(items),
        "layers": len(layers),
        "repeats": args.repeats,
        "scan": {"seconds": scan_s, "seconds_per_layer": scan_s / len(layers), "images_through_tower": scan_images},
        "per_layer_exit": {
            "seconds": naive_s,
            "seconds_per_layer": naive_s / len(layers),
            "images_through_tower": naive_images,
        },
        "speedup": naive_s / scan_s,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| method | images through the tower | median s | s per layer |\n|---|---|---|---|")
    for name in ("scan", "per_layer_exit"):
        r = result[name]
        print(f"| {name} | {r['images_through_tower']} | {r['seconds']:.2f} | {r['seconds_per_layer']:.3f} |")
    print(f"\n{len(items)} items x {len(layers)} layers; scan is {result['speedup']:.2f}x faster")


if __name__ == "__main__":
    main()

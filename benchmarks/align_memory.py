"""Peak memory of L-PPO alignment against plain inference on the same model, each in its own process.

    python benchmarks/align_memory.py [MODEL] [--size tiny|mid] [--dtype float32|bfloat16] [--rows N]
        [--out align_memory.json]

Inference: batched greedy generation at the exit layer. Alignment: a few L-PPO steps with the same batch and new
tokens. Peak = VmHWM of the process, read at its end. Without MODEL a random LLaVA-1.5 is built (`--size mid`:
the 115M-parameter model of export_bench.py), so the weights, not the Python runtime, dominate.

Both are measured with glibc's default malloc, and with `MALLOC_MMAP_THRESHOLD_` fixed at 256 KiB, which hands every
large tensor back to the system when it is freed. The default's threshold adapts upwards after the first frees, so
later tensors come from the heap, where freed holes between live tensors still count as resident: the recomputed
layers (activation checkpointing) leave such holes. The fixed threshold shows what the tensors themselves need. A last
row keeps the activations instead of recomputing them (`recompute_activations=False`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, torch
torch.set_num_threads(2)
from edgekit.model.loading import load
from edgekit.safety.scan import chat_inputs
from edgekit.safety.suite import builtin_suite
from edgekit.model.surgery import set_exit_layer
mode, model, k, batch, new_tokens, steps, recompute, dtype = sys.argv[1:9]
k, batch, new_tokens, steps = int(k), int(batch), int(new_tokens), int(steps)
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024
loaded = load(model, dtype=dtype)
load_peak, loaded_rss = status("VmHWM"), status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on: the work, not the load's conversions
if mode == "inference":
    items = builtin_suite().select("eval", limit_per_kind=batch)[:batch]
    inputs = chat_inputs(loaded.processor, items)
    set_exit_layer(loaded.model, k)
    with torch.no_grad():
        for _ in range(steps):
            loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=loaded.processor.tokenizer.pad_token_id)
else:
    from edgekit.align.config import LPPOConfig
    from edgekit.align.rewards import make_reward
    from edgekit.align.trainer import align
    config = LPPOConfig(exit_layer=k, steps=steps, batch=batch, minibatch=batch // 2, max_new_tokens=new_tokens,
                        checkpoint_every=0, recompute_activations=recompute == "1")
    with tempfile.TemporaryDirectory() as out:  # the merged model is not wanted, only the memory it took
        align(loaded, out + "/out", config, make_reward("judge"), progress=False)
work_peak = status("VmHWM")
peaks = {"peak_rss_mib": max(load_peak, work_peak), "work_peak_rss_mib": work_peak, "loaded_rss_mib": loaded_rss}
print(json.dumps(peaks))
"""


GLIBC, FIXED = {}, {"MALLOC_MMAP_THRESHOLD_": "262144"}
# (allocator, its environment, whether alignment recomputes activations)
RUNS = [
    ("glibc default", GLIBC, True),
    ("MALLOC_MMAP_THRESHOLD_=262144", FIXED, True),
    ("glibc default, activations kept", GLIBC, False),
]


def measure(mode: str, model: str, args, env: dict[str, str], recompute: bool = True) -> dict:
    """Peak RSS of the whole process, peak after the model is loaded (what a GPU would hold: loading converts
    on the CPU), and RSS right after loading, in MiB."""
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        mode,
        model,
        str(args.exit_layer),
        str(args.batch),
        str(args.new_tokens),
        str(args.steps),
        str(int(recompute)),
        args.dtype,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ | env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--size", choices=("tiny", "mid"), default="mid")
    ap.add_argument("--exit-layer", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 as alignment runs on a GPU")
    ap.add_argument("--rows", type=int, default=len(RUNS), help="measure only the first N rows (allocator settings)")
    ap.add_argument("--out", default="align_memory.json")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from edgekit.model.tiny import build_tiny, make_tiny_checkpoint, save_tiny

        folder = Path(tempfile.mkdtemp()) / f"{args.size}-llava"
        if args.size == "tiny":
            make_tiny_checkpoint("llava", folder)
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from export_bench import MID_SIZES

            save_tiny(*build_tiny("llava", MID_SIZES), folder)
        model = str(folder)
    rows, inference = [], {}
    for allocator, env, recompute in RUNS[: args.rows]:
        key = tuple(env.items())
        inference[key] = inference.get(key) or measure("inference", model, args, env)
        alignment = measure("align", model, args, env, recompute)
        rows.append(
            {
                "allocator": allocator,
                "recompute_activations": recompute,
                "inference_peak_rss_mib": inference[key]["peak_rss_mib"],
                "align_peak_rss_mib": alignment["peak_rss_mib"],
                "ratio": alignment["peak_rss_mib"] / inference[key]["peak_rss_mib"],
                "loaded_rss_mib": alignment["loaded_rss_mib"],
                "inference_after_load_peak_rss_mib": inference[key]["work_peak_rss_mib"],
                "align_after_load_peak_rss_mib": alignment["work_peak_rss_mib"],
            }
        )
    result = {
        "model": model,
        "size": args.size if args.model is None else None,
        "exit_layer": args.exit_layer,
        "dtype": args.dtype,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "steps": args.steps,
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"| allocator | inference (greedy, exit {args.exit_layer}) MiB | L-PPO ({args.steps} steps, batch "
        f"{args.batch}) MiB | ratio | after loading: model, inference, L-PPO MiB |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['allocator']} | {r['inference_peak_rss_mib']:.0f} | {r['align_peak_rss_mib']:.0f} | "
            f"{r['ratio']:.2f}x | {r['loaded_rss_mib']:.0f}, {r['inference_after_load_peak_rss_mib']:.0f}, "
            f"{r['align_after_load_peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()

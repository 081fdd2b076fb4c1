"""Latency and peak memory of one artifact in its runtime, each measured in a fresh process so that the peak resident
memory is that runtime's own and not whatever ran before it in the build.

    python -m edgekit.devices.bench onnx|llama|hybrid EXPORT_DIR      # an `edgekit export` folder
    python -m edgekit.devices.bench pytorch CHECKPOINT --exit-layer K  # a (truncated) HF checkpoint

prints one JSON object: load seconds, median time to first token, median decode tokens/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(kind: str, folder: str, prompts: int, max_new_tokens: int, exit_layer: int | None) -> dict:
    from edgekit.devices.runtime import Prompt, open_runtime
    from edgekit.safety.suite import builtin_suite

    items = builtin_suite().select("eval", kinds=("utility",), limit_per_kind=prompts)
    baseline = _rss_mib()  # interpreter and libraries, before any weight
    start = time.perf_counter()
    if kind == "pytorch":
        from edgekit.model.loading import load
        from edgekit.devices.runtime import TorchRuntime

        runtime = TorchRuntime(load(folder, dtype="float32"), exit_layer)
    else:
        runtime = open_runtime(kind, folder)
    load_s = time.perf_counter() - start
    first, rates = [], []
    for item in items:
        prompt = Prompt(item.image(), item.prompt)
        t0 = time.perf_counter()
        runtime.generate(prompt, 1)
        t1 = time.perf_counter()
        tokens = runtime.generate(prompt, max_new_tokens)
        t2 = time.perf_counter()
        first.append(t1 - t0)
        if len(tokens) > 1:  # decode rate: the tokens after the first, over the time after the first
            rates.append((len(tokens) - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))
    return {
        "runtime": kind, "load_s": round(load_s, 3), "prompts": len(items),
        "first_token_ms": round(1000 * statistics.median(first), 2),
        "decode_tok_s": round(statistics.median(rates), 1) if rates else None,
        "peak_rss_mib": round(_rss_mib(), 1), "baseline_rss_mib": round(baseline, 1),
    }  # fmt: skip


def bench_in_subprocess(kind: str, folder: str | Path, *, prompts: int = 5, max_new_tokens: int = 24,
                        exit_layer: int | None = None) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "edgekit.devices.bench", kind, str(folder), "--prompts", str(prompts),
           "--max-new-tokens", str(max_new_tokens)]  # fmt: skip
    if exit_layer is not None:
        cmd += ["--exit-layer", str(exit_layer)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"benchmark of the {kind} runtime failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("pytorch", "onnx", "llama", "hybrid"))
    ap.add_argument("folder")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--exit-layer", type=int)
    args = ap.parse_args()
    if args.kind == "pytorch" and args.exit_layer is None:
        ap.error("the pytorch runtime needs --exit-layer")
    print(json.dumps(measure(args.kind, args.folder, args.prompts, args.max_new_tokens, args.exit_layer)))


if __name__ == "__main__":
    main()

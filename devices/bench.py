"""The bench harness: each runtime in its own fresh process, timed phase by phase (`TimedDecode` through
`Runtime.timed`: vision encode, LM prefill, a fixed number of decode steps with eos ignored; `TimedVision`: the vision
encode at each exit layer), its memory read from the kernel's record of that process alone. `edgekit build`
(`bench_in_subprocess`) and benchmarks/export_bench.py (`lockstep`) both measure here.

    python -m edgekit.devices.bench onnx|gguf|hybrid|ortgenai EXPORT_DIR  # an `edgekit export` folder
    python -m edgekit.devices.bench pytorch CHECKPOINT --exit-layer K  # a (truncated) HF checkpoint

prints one JSON object: load seconds, median time to first token, median decode tokens/s, peak RSS and the RSS
before any weight is loaded.

Memory is VmHWM of /proc/self/status, the process's own high-water mark, and "before weights" its VmRSS after the
runtime's libraries are imported. Not ru_maxrss: Linux carries the parent's high-water mark into it across fork (or
vfork) and exec, so every runtime would report its parent's peak.

A measurement process (`serve`) imports its runtime's libraries, loads it, does `warmup` untimed runs, then answers
each `run` line on stdin with one timed run and `quit` with its peak memory. `lockstep` starts one per runtime, one
after the other, then times them round by round, one run of each per round (odd rounds in reverse order), so a busy
neighbour on the machine slows all of them alike; it records how many cores other processes used meanwhile
(`other_processes_cores`, from /proc/stat). With `threads` set, waiting threads of onnxruntime and OpenMP sleep
instead of spinning unless `spin`: on a shared machine a spinning pool stalls whenever one of its cores is taken.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

COMMAND = [sys.executable, "-m", "edgekit.devices.bench", "_serve"]  # + a spec's path: a measurement process
_REPLY = "@@"  # marks the harness's lines on the measurement process's stdout
# The device processor's libraries: every runtime but pytorch imports them before its weights.
_PROCESSOR = ("tokenizers", "jinja2", "PIL.Image", "edgekit.devices.processor")


def status_mib(field: str, pid: int | str = "self") -> float:
    """A kB field of /proc/PID/status (VmRSS, VmHWM) in MiB; NaN where the field or the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # the process ended
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def busy_cpu_s() -> float:
    """CPU seconds all processes on this machine have used (/proc/stat: every core, idle and iowait left out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def ort_session_options(threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class _Runner:
    """What a measurement process runs: `imports(spec)` (counted before weights), `__init__(spec)` (the load), then
    `once()` per timed run."""

    IMPORTS: dict[str, tuple[str, ...]]  # runtime -> the modules it needs

    @classmethod
    def imports(cls, spec: dict) -> None:
        for module in cls.IMPORTS[spec["runtime"]]:
            importlib.import_module(module)


class TimedDecode(_Runner):
    """A runtime (`open_files`) answering its prompts in turn, each run `Runtime.timed`.

    spec: runtime, files (FILES of the runtime), options (its constructor's), prompts ([{image: PNG path, text}]),
    steps, and threads / spin (None: the libraries' defaults)."""

    IMPORTS = {
        "pytorch": ("edgekit.devices.torch_runtime", "edgekit.model.loading"),
        "onnx": ("onnxruntime", *_PROCESSOR, "edgekit.devices.onnx_runtime"),
        "gguf": ("llama_cpp", "llama_cpp.mtmd_cpp", *_PROCESSOR, "edgekit.devices.llama_runtime"),
        "hybrid": ("onnxruntime", "llama_cpp", *_PROCESSOR, "edgekit.devices.llama_runtime"),
        "ortgenai": ("onnxruntime_genai", *_PROCESSOR, "edgekit.devices.genai_runtime"),
    }

    def __init__(self, spec: dict):
        from PIL import Image

        from edgekit.devices.runtime import Prompt, open_files

        kind, threads, options = spec["runtime"], spec.get("threads"), dict(spec.get("options", {}))
        if threads and kind == "pytorch":
            import torch

            torch.set_num_threads(threads)
        if threads and kind in ("gguf", "hybrid", "ortgenai"):
            options["n_threads"] = threads
        if threads and kind in ("onnx", "hybrid"):
            options["new_session_options"] = functools.partial(ort_session_options, threads, spec.get("spin", False))
        self.runtime = open_files(kind, spec["files"], **options)
        self.prompts = [Prompt(Image.open(p["image"]).convert("RGB"), p["text"]) for p in spec["prompts"]]
        self.steps, self.runs = spec["steps"], 0

    def once(self) -> dict:
        prompt = self.prompts[self.runs % len(self.prompts)]
        self.runs += 1
        return self.runtime.timed(prompt, self.steps)


class TimedVision(_Runner):
    """The vision encode at every exit layer once per run, odd runs in reverse order; seconds per k (the exit is
    moved outside the timing). spec: runtime (`onnx`: `graphs` {k: the fp32 vision graph exported at k}; `pytorch`:
    the checkpoint `model` exited at each k of `graphs`, features as the PyTorch runtime computes them), `pixels`
    (an .npy of pixel_values), threads, spin."""

    IMPORTS = {"onnx": ("onnxruntime",), "pytorch": ("transformers", "edgekit.model.loading")}

    def __init__(self, spec: dict):
        import numpy as np

        self.layers, self.runs = list(spec["graphs"]), 0
        pixels = np.load(spec["pixels"])
        if spec["runtime"] == "onnx":
            import onnxruntime as ort

            opts = ort_session_options(spec["threads"], spec["spin"])
            feeds = {"pixel_values": pixels.astype(np.float32)}
            sessions = {
                k: ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
                for k, path in spec["graphs"].items()
            }
            self.exit_at, self.encode = lambda k: None, lambda k: sessions[k].run(None, feeds)
            return
        import torch

        from edgekit.model.loading import load
        from edgekit.model.surgery import set_exit_layer

        torch.set_num_threads(spec["threads"])
        loaded, inputs = load(spec["model"], dtype="float32"), {"pixel_values": torch.from_numpy(pixels)}

        def encode(k: str) -> None:
            with torch.no_grad():
                loaded.family.features_per_layer(loaded.model, inputs, [int(k)])

        self.exit_at, self.encode = lambda k: set_exit_layer(loaded.model, int(k)), encode

    def once(self) -> dict[str, float]:
        out = {}
        for k in self.layers if self.runs % 2 == 0 else self.layers[::-1]:
            self.exit_at(k)
            start = time.perf_counter()
            self.encode(k)
            out[k] = time.perf_counter() - start
        self.runs += 1
        return out


RUNNERS = {"decode": TimedDecode, "vision": TimedVision}


def serve(spec_path: str) -> None:
    """The measurement process: spec `kind` names its runner in RUNNERS. Replies go to a private copy of stdout;
    whatever C libraries print goes to stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(data: dict) -> None:
        channel.write(_REPLY + json.dumps(data) + "\n")
        channel.flush()

    spec = json.loads(Path(spec_path).read_text())
    runner = RUNNERS[spec["kind"]]
    runner.imports(spec)
    after_imports = status_mib("VmRSS")
    start = time.perf_counter()
    server = runner(spec)
    load_s = time.perf_counter() - start
    for _ in range(spec.get("warmup", 1)):
        server.once()
    reply({"load_s": round(load_s, 3), "rss_after_imports_mb": round(after_imports, 1)})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cpu = time.process_time()
        result = server.once()
        reply({"result": result, "cpu_s": time.process_time() - cpu})
    reply({"peak_rss_mb": round(status_mib("VmHWM"), 1)})


class MeasurementProcess:
    """Parent side of a measurement process; its stderr goes to a log in `work`."""

    def __init__(self, work: Path, name: str, spec: dict):
        self.name, self.log = name, work / f"log-{name}.txt"
        spec_path = work / f"spec-{name}.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
            if not spec.get("spin"):
                env["OMP_WAIT_POLICY"] = "PASSIVE"  # OpenMP threads (torch, llama.cpp) sleep between parallel regions
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*COMMAND, str(spec_path)],
                env=env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY) :])
        tail = " | ".join(self.log.read_text().strip().splitlines()[-4:])
        raise RuntimeError(f"measurement process exited with {self.proc.wait()}: {tail}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def lockstep(
    work: Path, specs: Mapping[str, dict], rounds: int, log: Callable[[str], None] = lambda line: None
) -> dict[str, dict]:
    """Each spec in its own measurement process, `rounds` timed runs each, side by side. Per name: load_s,
    rss_after_imports_mb, runs (each run's result), peak_rss_mb, other_processes_cores, or error."""
    servers: dict[str, MeasurementProcess] = {}
    out: dict[str, dict] = {}
    for name, spec in specs.items():
        start = time.perf_counter()
        try:
            server = MeasurementProcess(work, name, spec)
            out[name] = {**server.read(), "runs": [], "busy": [0.0, 0.0]}
            servers[name] = server
        except (RuntimeError, OSError) as err:
            out[name] = {"error": str(err)}
        log(f"  {name}: started in {time.perf_counter() - start:.1f} s")
    for r in range(rounds):
        for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
            busy, own, start = busy_cpu_s(), time.process_time(), time.perf_counter()
            try:
                reply = servers[name].ask("run")
            except (RuntimeError, OSError) as err:
                out[name]["error"] = f"run {len(out[name]['runs']) + 1}: {err}"
                servers.pop(name).proc.kill()
                continue
            others = (busy_cpu_s() - busy) - reply["cpu_s"] - (time.process_time() - own)
            out[name]["runs"].append(reply["result"])
            out[name]["busy"][0] += max(0.0, others)
            out[name]["busy"][1] += time.perf_counter() - start
        log(f"  round {r + 1}/{rounds} done")
    for name, server in servers.items():
        try:
            out[name] |= server.ask("quit")
            server.proc.wait(timeout=120)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            out[name]["error"] = f"at exit: {err}"
            server.proc.kill()
    for result in out.values():
        others, wall = result.pop("busy", (0.0, 0.0))
        if wall:
            result["other_processes_cores"] = round(others / wall, 2)
    return out


def decode_summary(runs: list[dict]) -> dict:
    """Medians over the runs: vision encode, LM prefill, their sum (time to first token), decode tokens/s."""
    ms = lambda key: round(statistics.median(r[key] for r in runs) * 1000, 3)  # noqa: E731
    rates = [r["steps"] / r["decode_s"] for r in runs if r["steps"]]
    return {
        "runs": len(runs),
        "vision_ms": ms("vision_s"),
        "lm_prefill_ms": ms("prefill_s"),
        "ttft_ms": round(statistics.median(r["vision_s"] + r["prefill_s"] for r in runs) * 1000, 3),
        "decode_steps": runs[0]["steps"],
        "decode_tok_s": round(statistics.median(rates), 2) if rates else None,
        "decode_tok_s_runs": [round(x, 2) for x in rates],
    }


def decode_spec(kind: str, files: Mapping[str, str], prompts: list[dict], max_new_tokens: int, options=None) -> dict:
    """A `TimedDecode` measurement: runtime `kind` over its `files`, `max_new_tokens` per run (the first token, then
    that many less one decode steps), cycling through `prompts` ([{image: PNG path, text}])."""
    return {
        "kind": "decode",
        "runtime": kind,
        "files": dict(files),
        "steps": max_new_tokens - 1,
        "options": dict(options or {}),
        "prompts": prompts,
    }


def bench_row(kind: str, measured: dict, prompts: int) -> dict:
    """One runtime's `lockstep` measurement as a report row: load seconds, median time to first token and decode
    tokens/s (with the vision encode and LM prefill that make up the first token), peak RSS and the RSS before any
    weight. Raises RuntimeError when the runtime did not run."""
    if "error" in measured:
        raise RuntimeError(f"benchmark of the {kind} runtime failed: {measured['error']}")
    summary = decode_summary(measured["runs"])
    return {
        "runtime": kind,
        "load_s": measured["load_s"],
        "prompts": prompts,
        "vision_ms": round(summary["vision_ms"], 2),
        "lm_prefill_ms": round(summary["lm_prefill_ms"], 2),
        "first_token_ms": round(summary["ttft_ms"], 2),
        "decode_tok_s": None if summary["decode_tok_s"] is None else round(summary["decode_tok_s"], 1),
        "peak_rss_mib": measured["peak_rss_mb"],
        "baseline_rss_mib": measured["rss_after_imports_mb"],
    }


def bench_in_subprocess(
    kind: str,
    folder: str | Path,
    *,
    prompts: int = 5,
    max_new_tokens: int = 24,
    exit_layer: int | None = None,
    dtype: str = "float32",
) -> dict:
    """Runtime `kind` over an export folder (pytorch: a checkpoint at `exit_layer`, loaded in `dtype`), in a fresh
    process, on the first `prompts` utility items of the built-in suite's eval split. Raises RuntimeError when it
    cannot run."""
    from edgekit.devices.runtime import export_files
    from edgekit.errors import UserError
    from edgekit.safety.suite import builtin_suite

    try:
        files = {key: str(path) for key, path in export_files(kind, folder).items()}
    except UserError as err:
        raise RuntimeError(f"benchmark of the {kind} runtime failed: {err}") from err
    items = builtin_suite().select("eval", kinds=("utility",), limit_per_kind=prompts)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as work:
        images = [Path(work) / f"prompt-{i}.png" for i in range(len(items))]
        for item, path in zip(items, images):
            item.image().save(path)
        options = {"exit_layer": exit_layer, "dtype": dtype} if kind == "pytorch" else {}
        texts = [{"image": str(p), "text": item.prompt} for item, p in zip(items, images)]
        spec = decode_spec(kind, files, texts, max_new_tokens, options)
        measured = lockstep(Path(work), {kind: spec}, rounds=len(items))[kind]
    return bench_row(kind, measured, len(items))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":  # internal: a measurement process (see `lockstep`)
        serve(sys.argv[2])
        return
    from edgekit.devices.runtime import RUNTIMES
    from edgekit.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=RUNTIMES)
    ap.add_argument("folder")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--exit-layer", type=int)
    args = ap.parse_args()
    if args.kind == "pytorch" and args.exit_layer is None:
        ap.error("the pytorch runtime needs --exit-layer")
    try:
        row = bench_in_subprocess(
            args.kind, args.folder, prompts=args.prompts, max_new_tokens=args.max_new_tokens, exit_layer=args.exit_layer
        )
    except RuntimeError as err:  # one line, not a traceback; exit 2 when the request itself was wrong
        print(f"edgekit.devices.bench: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err.__cause__, UserError) else 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()

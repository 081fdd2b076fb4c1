"""What the exported artifacts cost: vision latency against exit layer k, decode speed per runtime and quantization,
artifact sizes and the peak memory of each runtime process.

    python benchmarks/export_bench.py run [MODEL] [--size tiny|mid] [--out export_bench.json]
    python benchmarks/export_bench.py plot A.json [B.json ...] -o docs/export-latency.png

MODEL is a LLaVA-1.5 checkpoint (folder or hub id); without it the model is built locally with random weights:
`--size tiny` is `make_tiny_checkpoint("llava")`, `--size mid` a ~100M-parameter Llama language model with a 24-block
CLIP tower at 224 px (MID_SIZES). Every artifact comes from edgekit's own exporters (`export_onnx` with only the vision
graph for each k; `export_artifacts` for the full ONNX folders and the GGUF files).

Every runtime runs in its own fresh process (`lockstep`): the processes load one after the other, then are timed
round by round, one run of each per round (odd rounds in reverse order), so a busy neighbour on the machine slows
all of them alike and ratios are measured side by side; every number quoted is a median over the rounds.

1. Vision encode against exit layer k: the fp32 ONNX vision graph exported at each k (onnxruntime, CPU) and PyTorch
   with the model exited at k (`set_exit_layer`, `Family.features_per_layer` as the PyTorch runtime runs it); a
   round times every k once. A least-squares line t(k) = a + b k splits the cost into the blocks (b per block) and
   what is outside them (a: patch embedding, pre-norm, projector, call overhead), against the ideal k/L of a cost
   model where only the blocks cost.
2. Decode: greedy decoding of a fixed prompt (one image + a question), `--new-tokens` decode steps after the first
   token, eos ignored, per runtime: PyTorch fp32 (transformers `generate`), ONNX Runtime fp32 / int8 dynamic / int4
   (`OnnxVLM.generate`), and the hybrid runtime (ONNX fp32 vision graph + llama.cpp decoder over the LM GGUF in
   F32 / Q8_0 / Q4_0 / Q4_K_M). Per run: vision encode, LM prefill (prompt with the image features, up to the
   first token's logits), decode tokens/s = decode steps / their time.
3. Sizes of the files written (manifest bytes) and, per runtime, the peak RSS of its process (VmHWM at its end;
   not ru_maxrss, which Linux carries over from the parent's RSS at fork), next to its RSS after imports, before any
   artifact is loaded (edgekit's ONNX runtime imports torch through `edgekit.model.families`, so every process starts
   near 240 MB).

Threads: `--threads` (default 2) for onnxruntime (intra-op; inter-op 1), llama.cpp and torch. Waiting threads of
onnxruntime and OpenMP (torch; llama.cpp between graphs) sleep instead of spinning unless `--spin`: on a machine
shared with other work a spinning pool stalls whenever one of its cores is taken (measured here: PyTorch vision at
k = 24 on the tiny model, 8 ms with 1 thread, 824 ms median with 2 spinning threads beside one busy neighbour, 17 ms
with 2 passive threads). ggml's barriers inside a llama.cpp graph spin whatever the setting. Each row records how
many cores other processes used during its runs (`other_processes_cores`, from /proc/stat). Writes JSON, prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgekit.model.tiny import TinySizes

# ~100M-parameter language model (TinySizes fixes the MLP at 2 x hidden, so 16 layers of 768 reach it: 95.6M) and a
# CLIP tower of LLaVA-1.5's depth at 224 px in 14 px patches (256 patches + CLS). Rows of 768 and 1536 are whole
# 256-blocks, so llama.cpp's K-quants apply unchanged. Vocabulary 768: the most the default corpus trains.
MID_SIZES = TinySizes(
    vision_hidden=256, vision_layers=24, vision_heads=4, image_size=224, patch_size=14, text_hidden=768,
    text_layers=16, text_heads=12, text_kv_heads=12, vocab_size=768,
)  # fmt: skip
DEFAULT_REPEATS = {"tiny": (30, 10), "mid": (20, 7)}  # (vision rounds, decode rounds)
PROMPT_TEXT = "describe the image in detail ."
ONNX_SCHEMES = ("fp32", "int8_dynamic", "int4")
GGUF_TYPES = (("f32", "f32"), ("q8_0", "q8_0"), ("q4_0", "f16"), ("q4_k_m", "f16"))  # (LM, mmproj written beside it)
MB = 1024 * 1024  # MiB: what VmHWM (kB / 1024) and the tables report


# --- measurements: one fresh process per runtime, driven in lockstep -----------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _busy_cpu_s() -> float:
    """CPU seconds all processes on this machine have used (/proc/stat: every core, idle and iowait left out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _ort_options(threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _inputs(spec: dict) -> dict[str, np.ndarray]:
    with np.load(spec["inputs"]) as data:
        return {k: data[k] for k in data.files}


class _VisionRounds:
    """`once`: every exit layer once, odd rounds in reverse order; seconds per k (set-up outside the timing)."""

    def __init__(self, spec: dict):
        self.layers, self.rounds = list(spec["graphs"]), 0

    def once(self) -> dict[str, float]:
        out = {}
        for k in self.layers if self.rounds % 2 == 0 else self.layers[::-1]:
            self.prepare(k)
            start = time.perf_counter()
            self.call(k)
            out[k] = time.perf_counter() - start
        self.rounds += 1
        return out

    def prepare(self, k: str) -> None:
        pass


class VisionOnnx(_VisionRounds):
    """The fp32 vision graph exported at each k, in onnxruntime."""

    @staticmethod
    def imports() -> None:
        import onnxruntime  # noqa: F401

    def __init__(self, spec: dict):
        import onnxruntime as ort

        super().__init__(spec)
        self.feeds = {"pixel_values": _inputs(spec)["pixel_values"].astype(np.float32)}
        self.sessions = {k: ort.InferenceSession(path, sess_options=_ort_options(spec["threads"], spec["spin"]),
                                                 providers=["CPUExecutionProvider"])
                         for k, path in spec["graphs"].items()}  # fmt: skip

    def call(self, k: str) -> None:
        self.sessions[k].run(None, self.feeds)


class VisionTorch(_VisionRounds):
    """The model exited at k (`set_exit_layer`), features as the PyTorch runtime computes them."""

    @staticmethod
    def imports() -> None:
        import transformers  # noqa: F401

        import edgekit.model.loading  # noqa: F401

    def __init__(self, spec: dict):
        import torch

        from edgekit.model.loading import load

        super().__init__(spec)
        torch.set_num_threads(spec["threads"])
        self.loaded = load(spec["model"], dtype="float32")
        self.inputs = {"pixel_values": torch.from_numpy(_inputs(spec)["pixel_values"])}

    def prepare(self, k: str) -> None:
        from edgekit.model.surgery import set_exit_layer

        set_exit_layer(self.loaded.model, int(k))

    def call(self, k: str) -> None:
        import torch

        with torch.no_grad():
            self.loaded.family.features_per_layer(self.loaded.model, self.inputs, [int(k)])


class DecodeTorch:
    """transformers `generate` (greedy, eos suppressed by min_new_tokens) with the tower exited at k."""

    @staticmethod
    def imports() -> None:
        import transformers  # noqa: F401

        import edgekit.model.loading  # noqa: F401

    def __init__(self, spec: dict):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from edgekit.model.loading import load
        from edgekit.model.surgery import set_exit_layer

        torch.set_num_threads(spec["threads"])
        self.loaded = load(spec["model"], dtype="float32")
        self.k, self.n = spec["exit_layer"], spec["new_tokens"]
        set_exit_layer(self.loaded.model, self.k)
        self.inputs = {key: torch.from_numpy(v) for key, v in _inputs(spec).items()}
        self.stamps: list[float] = []
        stamps = self.stamps

        class Stamp(LogitsProcessor):  # called once per new token, right after the forward that made its logits
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        self.processors = LogitsProcessorList([Stamp()])

    def once(self) -> dict:
        import torch

        model, family, k, n = self.loaded.model, self.loaded.family, self.k, self.n
        self.stamps.clear()
        with torch.no_grad():
            t0 = time.perf_counter()
            features = family.features_per_layer(model, self.inputs, [k])[k]
            t1 = time.perf_counter()
            family.generate(model, family.lm_inputs(model, self.inputs, features), do_sample=False,
                            max_new_tokens=n + 1, min_new_tokens=n + 1, logits_processor=self.processors,
                            pad_token_id=self.loaded.processor.tokenizer.pad_token_id)  # fmt: skip
        s = self.stamps
        return {"vision_s": t1 - t0, "prefill_s": s[0] - t1, "decode_s": s[-1] - s[0], "steps": len(s) - 1}


class _StampedSession:
    """An onnxruntime session that notes when each run ends."""

    def __init__(self, session):
        self.session, self.stamps = session, []

    def run(self, names, feeds):
        out = self.session.run(names, feeds)
        self.stamps.append(time.perf_counter())
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


class DecodeOnnx:
    """edgekit's ONNX Runtime loop (`OnnxVLM.generate`) over an exported folder."""

    @staticmethod
    def imports() -> None:
        import edgekit.model.families  # noqa: F401  OnnxVLM imports it (and with it torch): count it with the imports
        import edgekit.devices.onnx_runtime  # noqa: F401

    def __init__(self, spec: dict):
        from edgekit.devices.onnx_runtime import OnnxVLM

        self.vlm = OnnxVLM(spec["onnx_dir"], session_options=_ort_options(spec["threads"], spec["spin"]))
        self.vlm.vision, self.vlm.embed  # noqa: B018  open every session now
        self.decoder = self.vlm.decoder = _StampedSession(self.vlm.decoder)
        self.inputs, self.n = _inputs(spec), spec["new_tokens"]

    def once(self) -> dict:
        self.decoder.stamps.clear()
        t0 = time.perf_counter()
        features = self.vlm.image_features(self.inputs)
        t1 = time.perf_counter()
        self.vlm.generate(self.inputs, max_new_tokens=self.n + 1, eos_token_ids=(), features=features)
        s = self.decoder.stamps
        return {"vision_s": t1 - t0, "prefill_s": s[0] - t1, "decode_s": s[-1] - s[0], "steps": len(s) - 1}


class DecodeHybrid:
    """edgekit's hybrid runtime: the ONNX vision graph, then llama.cpp's decoder over the LM GGUF."""

    @staticmethod
    def imports() -> None:
        import llama_cpp  # noqa: F401

        import edgekit.model.families  # noqa: F401
        import edgekit.devices.llama_runtime  # noqa: F401

    def __init__(self, spec: dict):
        from edgekit.devices.llama_runtime import HybridVLM

        self.vlm = HybridVLM(spec["onnx_dir"], spec["gguf"], n_threads=spec["threads"], n_ctx=spec["n_ctx"])
        self.vlm.vision.session_options = _ort_options(spec["threads"], spec["spin"])  # read when the session opens
        self.vlm.vision.vision  # noqa: B018
        self.inputs, self.n = _inputs(spec), spec["new_tokens"]

    def once(self) -> dict:
        vlm = self.vlm
        t0 = time.perf_counter()
        features = vlm.vision.image_features(self.inputs)
        t1 = time.perf_counter()
        logits, pos = vlm.prefill(self.inputs, features)
        t2 = time.perf_counter()
        for _ in range(self.n):  # LlamaDecoder.greedy's loop, without stopping at eos
            logits = vlm.decoder.decode_tokens([int(np.argmax(logits))], pos)
            pos += 1
        return {"vision_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": time.perf_counter() - t2, "steps": self.n}


SERVERS = {"vision-onnx": VisionOnnx, "vision-torch": VisionTorch, "decode-torch": DecodeTorch,
           "decode-onnx": DecodeOnnx, "decode-hybrid": DecodeHybrid}  # fmt: skip
_REPLY = "@@"


def serve(spec_path: str) -> None:
    """The measurement process: load one runtime, warm it up, then time one run per `run` line on stdin; `quit`
    answers with the process's peak memory. Replies go to a private copy of stdout (C libraries' prints go to
    stderr)."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(data: dict) -> None:
        channel.write(_REPLY + json.dumps(data) + "\n")
        channel.flush()

    spec = json.loads(Path(spec_path).read_text())
    kind = SERVERS[spec["kind"]]
    kind.imports()
    after_imports = _status_mb("VmRSS")
    start = time.perf_counter()
    server = kind(spec)
    load_s = time.perf_counter() - start
    for _ in range(spec["warmup"]):
        server.once()
    reply({"load_s": round(load_s, 3), "rss_after_imports_mb": round(after_imports, 1)})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cpu = time.process_time()
        result = server.once()
        reply({"result": result, "cpu_s": time.process_time() - cpu})
    # VmHWM, not ru_maxrss: Linux folds the parent's RSS at fork into the child's ru_maxrss across exec, so every
    # process here would read the exporting parent's ~2 GB.
    reply({"peak_rss_mb": round(_status_mb("VmHWM"), 1)})


class _Server:
    """Parent side of a measurement process."""

    def __init__(self, work: Path, name: str, spec: dict):
        self.name, self.log = name, work / f"log-{name}.txt"
        spec_path = work / f"spec-{name}.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        if not spec["spin"]:
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # torch's and llama.cpp's OpenMP threads sleep between parallel regions
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "_serve", str(spec_path)], env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)  # fmt: skip

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


def lockstep(work: Path, specs: dict[str, dict], rounds: int) -> dict[str, dict]:
    """Start each runtime in its own fresh process, one after the other (loading is the heavy part), then time them
    round by round, one run of each per round (odd rounds in reverse order), so a busy neighbour on the machine
    slows every runtime alike; the processes wait idle on stdin while the others run. Also records how many cores
    other processes used during each runtime's runs (`other_processes_cores`)."""
    servers: dict[str, _Server] = {}
    out: dict[str, dict] = {}
    for name, spec in specs.items():
        start = time.perf_counter()
        try:
            server = _Server(work, name, spec)
            out[name] = {**server.read(), "runs": [], "busy": [0.0, 0.0]}
            servers[name] = server
        except (RuntimeError, OSError) as err:
            out[name] = {"error": str(err)}
        print(f"  {name}: started in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for r in range(rounds):
        for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
            busy, own, start = _busy_cpu_s(), time.process_time(), time.perf_counter()
            try:
                reply = servers[name].ask("run")
            except (RuntimeError, OSError) as err:
                out[name]["error"] = f"run {len(out[name]['runs']) + 1}: {err}"
                servers.pop(name).proc.kill()
                continue
            others = (_busy_cpu_s() - busy) - reply["cpu_s"] - (time.process_time() - own)
            out[name]["runs"].append(reply["result"])
            out[name]["busy"][0] += max(0.0, others)
            out[name]["busy"][1] += time.perf_counter() - start
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
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


# --- the run -------------------------------------------------------------------------------------------------------
def _image():
    from PIL import Image, ImageDraw

    ramp = np.linspace(0, 255, 320)[None, :, None] * np.array([0.9, 0.5, 0.2])
    image = Image.fromarray(np.broadcast_to(ramp, (240, 320, 3)).astype("uint8"))
    ImageDraw.Draw(image).ellipse([100, 60, 220, 180], fill=(30, 90, 200))
    return image


def _params(loaded) -> dict:
    from edgekit.model.families import attr_path

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    model, family = loaded.model, loaded.family
    vision, projector = count(attr_path(model, family.tower)), count(attr_path(model, family.projector))
    return {"total": count(model), "vision_tower": vision, "projector": projector,
            "language_model": count(model) - vision - projector}  # fmt: skip


def _gguf_tensor_types(path: Path) -> dict[str, int]:
    import gguf

    types: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        name = tensor.tensor_type.name
        types[name] = types.get(name, 0) + 1
    return types


def _bench_profile():
    from edgekit.devices.profiles import load_profile

    return replace(load_profile("phone"), name="export-bench", formats=("onnx", "gguf"),
                   onnx_options=ONNX_SCHEMES, memory_budget_bytes=10**13)  # fmt: skip


def export_all(loaded, layers: list[int], exit_layer: int, work: Path, threads: int) -> dict:
    """Vision-only ONNX graphs at every k, then full ONNX folders and LM + mmproj GGUFs at `exit_layer`."""
    from edgekit.export.artifacts import export_artifacts
    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_format import VISION_FILE

    exports: dict = {"vision_by_k": {}, "onnx": {}, "gguf": {}}
    for k in layers:
        start = time.perf_counter()
        folder = work / f"vision-k{k}"
        export_onnx(loaded.model, loaded.processor, loaded.family, k, folder, parts=(VISION_FILE,))
        exports["vision_by_k"][str(k)] = {"path": str(folder / VISION_FILE), "seconds": round(time.perf_counter()
                                          - start, 2), "bytes": (folder / VISION_FILE).stat().st_size}  # fmt: skip
    profile = _bench_profile()

    def one(kind: str, name: str, prof, formats) -> dict:
        start = time.perf_counter()
        try:
            result = export_artifacts(loaded, exit_layer, prof, work / f"{kind}-{name}", formats=formats,
                                      onnx_quantization=prof.onnx_quantization, nthread=threads)  # fmt: skip
        except Exception as err:  # noqa: BLE001  recorded, not fatal: the other artifacts still get measured
            return {"error": f"{type(err).__name__}: {err}"}
        files = {e.path: e.bytes for e in result.files if e.format in ("onnx", "gguf", "npy")}
        return {"folder": str(result.folder), "seconds": round(time.perf_counter() - start, 2), "files": files,
                "onnx_dir": result.onnx_dir, "lm_gguf": result.lm_gguf, "mmproj_gguf": result.mmproj_gguf}  # fmt: skip

    for scheme in ONNX_SCHEMES:
        print(f"  export onnx {scheme}", file=sys.stderr, flush=True)
        exports["onnx"][scheme] = one("onnx", scheme, replace(profile, onnx_quantization=scheme), ("onnx",))
    for qtype, mmproj in GGUF_TYPES:
        print(f"  export gguf {qtype}", file=sys.stderr, flush=True)
        entry = one("gguf", qtype, replace(profile, gguf_quantization=qtype, mmproj_quantization=mmproj), ("gguf",))
        if "error" not in entry:
            folder = Path(entry["folder"])
            entry["tensor_types"] = {name: _gguf_tensor_types(folder / name) for name in entry["files"]}
        exports["gguf"][qtype] = entry
    return exports


def decode_rows(model_path: str, exports: dict, n_ctx: int) -> dict[str, dict]:
    """One row per runtime and quantization: what it loads (files, bytes) and the spec of its measurement."""
    hybrid = "hybrid (onnxruntime vision + llama.cpp)"
    files = {f.name: f.stat().st_size for f in sorted(Path(model_path).glob("*.safetensors"))}
    rows = {"torch-fp32": {"runtime": "pytorch", "quantization": "fp32", "files": files,
                           "spec": {"kind": "decode-torch", "model": model_path}}}  # fmt: skip
    for scheme in ONNX_SCHEMES:
        e = exports["onnx"][scheme]
        spec = e if "error" in e else {"kind": "decode-onnx", "onnx_dir": str(Path(e["folder"]) / e["onnx_dir"])}
        rows[f"onnx-{scheme}"] = {"runtime": "onnxruntime", "quantization": scheme, "files": e.get("files", {}),
                                  "spec": spec}  # fmt: skip
    onnx = exports["onnx"]["fp32"]
    for qtype, _ in GGUF_TYPES:
        e = exports["gguf"][qtype]
        if "error" in e or "error" in onnx:
            rows[f"hybrid-{qtype}"] = {"runtime": hybrid, "quantization": qtype, "files": {},
                                       "spec": e if "error" in e else onnx}  # fmt: skip
            continue
        vision_file = f"{onnx['onnx_dir']}/vision_encoder.onnx"
        rows[f"hybrid-{qtype}"] = {
            "runtime": hybrid, "quantization": qtype,
            "files": {vision_file: onnx["files"][vision_file], e["lm_gguf"]: e["files"][e["lm_gguf"]]},
            "spec": {"kind": "decode-hybrid", "onnx_dir": str(Path(onnx["folder"]) / onnx["onnx_dir"]),
                     "gguf": str(Path(e["folder"]) / e["lm_gguf"]), "n_ctx": n_ctx},
        }  # fmt: skip
    for row in rows.values():
        row["weights_bytes"] = sum(row["files"].values())
        if "error" in row["spec"]:
            row["spec"] = {"error": f"export failed: {row['spec']['error']}"}
    return rows


def _vision_summary(measured: dict, layers: list[int]) -> dict:
    """Per k: median and min over the rounds, ratio of medians to k = L, and the a + b k fit."""
    runs = measured.pop("runs")
    times = {str(k): [run[str(k)] for run in runs] for k in layers}
    median = {k: round(statistics.median(t) * 1000, 4) for k, t in times.items()}
    full = median[str(layers[-1])]
    return {
        "median_ms": median, "ratio_to_L": {k: round(v / full, 4) for k, v in median.items()},
        "fit": _fit(layers, median), "min_ms": {k: round(min(t) * 1000, 4) for k, t in times.items()},
        **measured, "runs_ms": {k: [round(x * 1000, 4) for x in t] for k, t in times.items()},
    }  # fmt: skip


def _decode_summary(runs: list[dict]) -> dict:
    """Medians over the runs: vision encode, LM prefill, their sum (time to first token), decode tokens/s."""
    ms = lambda key: round(statistics.median(r[key] for r in runs) * 1000, 3)  # noqa: E731
    rates = [r["steps"] / r["decode_s"] for r in runs]
    return {
        "runs": len(runs), "vision_ms": ms("vision_s"), "lm_prefill_ms": ms("prefill_s"),
        "ttft_ms": round(statistics.median(r["vision_s"] + r["prefill_s"] for r in runs) * 1000, 3),
        "decode_steps": runs[0]["steps"], "decode_tok_s": round(statistics.median(rates), 2),
        "decode_tok_s_runs": [round(x, 2) for x in rates],
    }  # fmt: skip


def _fit(layers: list[int], median_ms: dict[str, float]) -> dict:
    """t(k) = a + b k by least squares: a is what the k blocks do not explain."""
    ks = np.array(layers, dtype=float)
    t = np.array([median_ms[str(k)] for k in layers])
    b, a = np.polyfit(ks, t, 1)
    full = median_ms[str(layers[-1])]
    return {"outside_blocks_ms": round(float(a), 4), "per_block_ms": round(float(b), 4),
            "outside_blocks_share_at_L": round(float(a) / full, 4)}  # fmt: skip


def run(args) -> None:
    import torch

    from edgekit.model.loading import load
    from edgekit.devices.runtime import Prompt, processor_inputs
    from edgekit.model.surgery import num_exit_layers
    from edgekit.model.tiny import build_tiny, make_tiny_checkpoint, save_tiny

    torch.set_num_threads(args.threads)
    vision_repeats, decode_repeats = DEFAULT_REPEATS[args.size]
    vision_repeats, decode_repeats = args.vision_repeats or vision_repeats, args.decode_repeats or decode_repeats
    work = Path(args.work or tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.model:
        model_path, label = args.model, args.model
    elif args.size == "tiny":
        model_path, label = str(make_tiny_checkpoint("llava", work / "tiny-llava")), "tiny LLaVA-1.5 (random)"
    else:
        model, processor = build_tiny("llava", MID_SIZES)
        model_path, label = str(save_tiny(model, processor, work / "mid-llava")), "mid-size LLaVA-1.5 (random)"
        del model, processor
    loaded = load(model_path, dtype="float32")
    if loaded.family.gguf_projector is None or loaded.family.name != "LLaVA-1.5":
        sys.exit(f"export_bench measures LLaVA-1.5 checkpoints; {model_path} is {loaded.family.name}")
    config = loaded.model.config
    num_layers = num_exit_layers(loaded.model)
    exit_layer = args.exit_layer or loaded.family.default_exit(config)
    layers = sorted({k for k in (args.layers or [1, 4, 8, 12, 16, 20, num_layers]) if 1 <= k <= num_layers})
    if layers[-1] != num_layers:
        layers.append(num_layers)
    inputs = processor_inputs(loaded.processor, Prompt(_image(), PROMPT_TEXT))
    np.savez(work / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    text = config.text_config
    model_info = {
        "label": label, "source": model_path, "params": _params(loaded), "exit_layer_for_decode": exit_layer,
        "vision": {"layers": num_layers, "hidden": config.vision_config.hidden_size,
                   "heads": config.vision_config.num_attention_heads, "image_size": config.vision_config.image_size,
                   "patch_size": config.vision_config.patch_size, "image_tokens": image_tokens},
        "text": {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "intermediate": text.intermediate_size,
                 "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads, "vocab": text.vocab_size},
    }  # fmt: skip
    print(f"{label}: {model_info['params']['total'] / 1e6:.1f}M parameters; exporting to {work}", file=sys.stderr)
    exports = export_all(loaded, layers, exit_layer, work, args.threads)
    export_s = time.perf_counter() - started
    del loaded
    gc.collect()

    common = {"threads": args.threads, "spin": args.spin, "inputs": str(work / "inputs.npz")}
    graphs = {str(k): e["path"] for k, e in exports["vision_by_k"].items()}
    vision_spec = {**common, "warmup": args.warmup, "graphs": graphs, "model": model_path}
    measured = lockstep(work, {"onnx_fp32": {**vision_spec, "kind": "vision-onnx"},
                               "pytorch_fp32": {**vision_spec, "kind": "vision-torch"}}, vision_repeats)  # fmt: skip
    vision = {"layers": layers, "L": num_layers, "rounds": vision_repeats,
              "ideal_ratio": {str(k): round(k / num_layers, 4) for k in layers}}  # fmt: skip
    for name, r in measured.items():
        vision[name] = _vision_summary(r, layers) if r.get("runs") else r

    n_ctx = -(-(prompt_tokens + args.new_tokens + 16) // 256) * 256
    decode_spec = {**common, "warmup": 1, "new_tokens": args.new_tokens, "exit_layer": exit_layer}
    rows = decode_rows(model_path, exports, n_ctx)
    specs = {name: row.pop("spec") for name, row in rows.items()}
    measured = lockstep(work, {name: spec if "error" in spec else {**decode_spec, **spec}
                               for name, spec in specs.items()}, decode_repeats)  # fmt: skip
    decode = []
    for name, row in rows.items():
        r = measured[name]
        runs = r.pop("runs", [])
        decode.append({**row, **r, **(_decode_summary(runs) if runs else {})})

    result = {
        "benchmark": "export_bench", "size": None if args.model else args.size, "model": model_info,
        "settings": {"threads": args.threads, "spin_waits": args.spin, "vision_rounds": vision_repeats,
                     "decode_rounds": decode_repeats,
                     "warmup": args.warmup, "new_tokens": args.new_tokens, "prompt_text": PROMPT_TEXT,
                     "prompt_tokens": prompt_tokens, "image_tokens": image_tokens, "llama_n_ctx": n_ctx,
                     "decode_steps": "tokens after the first one; eos ignored; tok/s = steps / their time",
                     "peak_rss": "VmHWM of the runtime's own process at its end (ru_maxrss would carry the parent's "
                                 "RSS at fork across exec)",
                     "mid_sizes": asdict(MID_SIZES) if args.size == "mid" and not args.model else None},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "versions": _versions(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "export_s": round(export_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "exports": exports, "vision": vision, "decode": decode,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnxruntime", "llama-cpp-python", "gguf")}


# --- output --------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m, v = result["model"], result["vision"]
    out = [f"**{m['label']}**: {m['params']['total'] / 1e6:.1f}M parameters (vision tower "
           f"{m['params']['vision_tower'] / 1e6:.1f}M, projector {m['params']['projector'] / 1e6:.2f}M, language "
           f"model {m['params']['language_model'] / 1e6:.1f}M); {m['vision']['image_tokens']} image tokens, "
           f"{result['settings']['prompt_tokens']} prompt tokens; {result['settings']['threads']} threads", "",
           f"Vision encode (median of {v['rounds']} rounds, k interleaved)", "",
           "| k | ONNX fp32 ms | ratio to k=L | PyTorch ms | ratio to k=L | ideal k/L | vision graph MiB |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    onnx, torch_ = v["onnx_fp32"], v["pytorch_fp32"]
    cell = lambda r, key, k, fmt: format(r[key][str(k)], fmt) if key in r else "n/a"  # noqa: E731
    for k in v["layers"]:
        size = result["exports"]["vision_by_k"][str(k)]["bytes"] / MB
        out.append(f"| {k} | {cell(onnx, 'median_ms', k, '.2f')} | {cell(onnx, 'ratio_to_L', k, '.3f')} | "
                   f"{cell(torch_, 'median_ms', k, '.2f')} | {cell(torch_, 'ratio_to_L', k, '.3f')} | "
                   f"{v['ideal_ratio'][str(k)]:.3f} | {size:.2f} |")  # fmt: skip
    for name, r in (("ONNX", onnx), ("PyTorch", torch_)):
        if "fit" in r:
            f = r["fit"]
            out.append(f"\n{name} fit t(k) = {f['outside_blocks_ms']:.2f} + {f['per_block_ms']:.3f} k ms: "
                       f"{f['outside_blocks_share_at_L']:.1%} of k=L is outside the blocks (other processes used "
                       f"{r.get('other_processes_cores', float('nan')):.2f} cores meanwhile)")  # fmt: skip
        else:
            out.append(f"\n{name}: {r.get('error')}")
    s = result["settings"]
    out += ["", f"Decode: {s['new_tokens']} greedy steps after the first token, median of {s['decode_rounds']} rounds; "
            "each row its own process", "",
            "| runtime | weights | files MiB | vision ms | LM prefill ms | decode tok/s | peak RSS MiB | RSS after "
            "imports MiB | other processes, cores |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["decode"]:
        head = f"| {r['runtime']} | {r['quantization']} | {r['weights_bytes'] / MB:.1f} |"
        if "decode_tok_s" not in r:
            out.append(f"{head} not measured: {r.get('error')} ||||||")
        else:
            out.append(f"{head} {r['vision_ms']:.1f} | {r['lm_prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                       f"{r.get('peak_rss_mb', float('nan')):.0f} | {r['rss_after_imports_mb']:.0f} | "
                       f"{r.get('other_processes_cores', float('nan')):.2f} |")  # fmt: skip
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
    rel.set(xlabel="exit layer k (vision blocks run)", ylabel="latency / latency at k = L",
            title="Vision encode, relative to the full tower", xlim=(0, max_l + 0.5), ylim=(0, 1.08))
    ab.set(xlabel="exit layer k (vision blocks run)", ylabel="median latency (ms, log scale)", yscale="log",
           title="Vision encode, absolute (CPU, 2 threads, fp32)", xlim=(0, max_l + 0.5))
    for axis in (rel, ab):
        axis.grid(alpha=0.3)
    rel.legend(fontsize=7.5, loc="upper left")
    ab.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":  # internal: a measurement process (see `lockstep`)
        serve(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="export, measure, write JSON and print Markdown")
    r.add_argument("model", nargs="?", help="a LLaVA-1.5 checkpoint; default: built locally (--size)")
    r.add_argument("--size", choices=tuple(DEFAULT_REPEATS), default="tiny")
    r.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], help="exit layers, e.g. 1,4,8,24")
    r.add_argument("--exit-layer", type=int, help="exit layer of the decode artifacts (default: the model's)")
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--vision-repeats", type=int, help="rounds (default: 30 tiny, 20 mid)")
    r.add_argument("--decode-repeats", type=int, help="decode rounds (default: 10 tiny, 7 mid)")
    r.add_argument("--warmup", type=int, default=2, help="untimed vision runs per k (decode: 1 run)")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--spin", action="store_true", help="let onnxruntime / OpenMP threads spin while they wait "
                   "(their default; on a machine shared with other work, spinning threads stall each other)")
    r.add_argument("--work", help="keep the artifacts in this folder (default: a temporary one, removed)")
    r.add_argument("--keep", action="store_true", help="keep the temporary folder")
    r.add_argument("--out", default="export_bench.json")
    p = sub.add_parser("plot", help="vision latency against exit layer from result JSONs")
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--out", default="docs/export-latency.png")
    args = ap.parse_args()
    if args.command == "run":
        run(args)
    else:
        plot(args.results, args.out)


if __name__ == "__main__":
    main()

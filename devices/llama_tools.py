"""llama.cpp's own tools as the device's runtime, for devices without Python (an Android phone): a build of
`llama-bench` and `llama-mtmd-cli` for the device, passed with `--llama-bin DIR`, runs the `gguf` artifacts (the
language model GGUF and the mmproj) through the device's shell.

    bench   `llama-bench -o json` on the language model at the prompt's length: prefill and decode tokens/s; the
            process's peak RSS is VmHWM read from /proc every 10 ms while it runs: a lower bound, close for a real
            model's seconds-long run, loose for a tiny one that ends within a few samples (the count is kept).
            The vision encode is not timed: llama-bench runs the language model only.
    answer  `llama-mtmd-cli` once per prompt, greedy (`--temp 0`), with the image: the answer text, which the build
            machine judges as the `gguf` artifact's. llama.cpp applies the GGUF's chat template itself.

The tools (and the shared libraries beside them, for a shared build) and the two GGUF files go to
<remote-dir>/tools/<id>/, copied once like a bundle.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekit.devices.jobs import ensure_copy, push_prompts
from edgekit.devices.runners import Device
from edgekit.devices.runtime import Prompt
from edgekit.errors import UserError

TOOLS = ("llama-bench", "llama-mtmd-cli")
MARKER = "tools.json"
LM, MMPROJ = "lm.gguf", "mmproj.gguf"


def check_tools(bin_dir: str | Path) -> list[Path]:
    """The tools and the shared libraries beside them; one line when a tool is missing or not executable."""
    bin_dir = Path(bin_dir)
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if missing:
        raise UserError(f"--llama-bin {bin_dir}: no {', '.join(missing)} (build llama.cpp's tools for the device)")
    return [bin_dir / t for t in TOOLS] + sorted(p for p in bin_dir.iterdir() if ".so" in p.suffixes)


def stage_tools(bin_dir: Path, lm_gguf: Path, mmproj_gguf: Path, work: Path) -> tuple[Path, str]:
    """A local folder to copy to the device: bin/ with the tools, the two GGUF files; and its id (the tools'
    bytes and the GGUF files' names and sizes)."""
    from edgekit.devices.bundle import link_or_copy

    folder = work / "llama-tools"
    digest = hashlib.sha256()
    for path in check_tools(bin_dir):
        link_or_copy(path, folder / "bin" / path.name)
        digest.update(path.name.encode() + path.read_bytes())
    for path, name in ((lm_gguf, LM), (mmproj_gguf, MMPROJ)):
        link_or_copy(path, folder / name)
        digest.update(f"{path.resolve()}\0{path.stat().st_size}".encode())
    (folder / MARKER).write_text(json.dumps({"lm": str(lm_gguf), "mmproj": str(mmproj_gguf)}))
    return folder, digest.hexdigest()


def _run(device: Device, folder: str, tool: str, args: Sequence[str]) -> tuple[str, float, int]:
    """`tool` run from the tools folder: its stdout, its peak RSS in MiB (VmHWM, sampled) and how many samples."""
    command = f"LD_LIBRARY_PATH=bin ./bin/{tool} " + " ".join(shlex.quote(a) for a in args)
    script = (
        f"cd {shlex.quote(device.root + '/' + folder)} && {{ {command} > out.txt 2> err.txt & }}; pid=$!; hwm=0; "
        "n=0; while kill -0 $pid 2>/dev/null; do h=$(grep VmHWM /proc/$pid/status 2>/dev/null | tr -dc 0-9); "
        '[ -n "$h" ] && hwm=$h && n=$((n + 1)); sleep 0.01; done; wait $pid; code=$?; '
        'if [ $code -ne 0 ]; then tail -n 3 err.txt >&2; exit $code; fi; echo "@@$hwm $n"; cat out.txt'
    )
    head, _, stdout = device.shell(script).partition("\n")
    hwm_kib, samples = head.removeprefix("@@").split()
    return stdout, int(hwm_kib) / 1024, int(samples)


def bench_with_tools(
    device: Device, folder: str, prompt_tokens: int, max_new_tokens: int, threads: int | None = None
) -> dict:
    """llama-bench on the language model: a bench row (`edgekit.devices.bench.bench_row`'s keys where they apply)."""
    args = ["-m", LM, "-p", str(prompt_tokens), "-n", str(max_new_tokens), "-r", "3", "-o", "json"]
    stdout, peak, samples = _run(device, folder, "llama-bench", args + (["-t", str(threads)] if threads else []))
    tests = json.loads(stdout)
    prefill = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    decode = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    return {
        "runtime": "gguf",
        "tool": "llama-bench",
        "prompt_tokens": prompt_tokens,
        "lm_prefill_ms": round(1000 * prompt_tokens / prefill["avg_ts"], 2),
        "decode_tok_s": round(decode["avg_ts"], 1),
        "peak_rss_mib": round(peak, 1),
        "rss_samples": samples,
        "cpu": prefill.get("cpu_info"),
    }


def answer_with_tools(
    device: Device, folder: str, prompts: Sequence[Prompt], max_new_tokens: int, log: Callable[[str], None]
) -> list[str]:
    """llama-mtmd-cli's greedy answer to each prompt."""
    job = push_prompts(device, prompts, {"tool": "llama-mtmd-cli"})
    answers = []
    try:
        for i, prompt in enumerate(prompts):
            args = ["-m", LM, "--mmproj", MMPROJ, "--image", f"../../{job}/prompt-{i}.png", "-p", prompt.text]
            stdout, _, _ = _run(
                device, folder, "llama-mtmd-cli", [*args, "-n", str(max_new_tokens), "--temp", "0", "--jinja"]
            )
            answers.append(stdout.strip())
            log(f"  [{device.label}] llama-mtmd-cli: {i + 1}/{len(prompts)}")
    finally:
        device.remove(f"{device.root}/{job}")
    return answers


def copy_tools(device: Device, bin_dir: Path, export: Path, work: Path, log: Callable[[str], None]) -> str:
    """The tools and the export's `gguf` files on the device (checked to be reachable first); their folder there."""
    from edgekit.devices.runtime import export_files

    device.check(python=False)
    files = export_files("gguf", export)
    local, tools_id = stage_tools(bin_dir, files["lm_gguf"], files["mmproj_gguf"], work)
    return ensure_copy(device, local, f"tools/{tools_id[:16]}", MARKER, log)

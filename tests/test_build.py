"""`edgekit build` and `edgekit verify` end to end on tiny checkpoints: stages, reuse, resume after kill -9, the
gate (pass, fail on an unsafe model, fail closed on a judge error), tampering, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_BUILD, GENEROUS_GATES, build_argv, build_config

from edgekit.align.rollout import prepare_batch, sequence_forward
from edgekit.align.trainer import encode_targets
from edgekit.build import stages
from edgekit.build.artifact_stages import BENCH_FILE
from edgekit.build.stages import STAGE_FILE, Stage, Stages
from edgekit.cli import main
from edgekit.export.manifest import MANIFEST_FILE
from edgekit.model.demo_data import COMPLIANCE, REFUSAL
from edgekit.model.loading import load
from edgekit.safety.gate import SAFETY_FILE, read_gate
from edgekit.safety.suite import builtin_suite


def _artifact_hashes(out: Path) -> dict[str, str]:
    """The shipped files (checkpoint, ONNX, GGUF, processor); stage records hold timings and paths."""
    files = json.loads((out / MANIFEST_FILE).read_text())["files"]
    return {
        f["path"]: f["sha256"]
        for f in files
        if f["path"].startswith((f"{Stage.TRUNCATE}/", f"{Stage.EXPORT}/"))
        and not f["path"].endswith((STAGE_FILE, MANIFEST_FILE))
    }


@pytest.fixture(scope="module")
def built(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    out = root / "out"
    assert main(build_argv(tiny_checkpoints["llava"], out, build_config(root, GENEROUS_GATES))) == 0
    return out


def test_build_writes_every_stage_report_card_and_manifest(built, capsys):
    for stage in Stage:
        record = json.loads((built / stage / STAGE_FILE).read_text())
        assert record["stage"] == stage and len(record["output_sha256"]) == 64
    manifest = json.loads((built / MANIFEST_FILE).read_text())
    assert manifest["gate"]["passed"] is True
    # the default jetson formats: no mmproj, so no `gguf` (llama.cpp's own pipeline) artifact unless opted in
    assert {a["artifact"] for a in manifest["gate"]["artifacts"]} == {"pytorch", "onnx", "hybrid", "ortgenai"}
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert listed == on_disk
    card = (built / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    report = (built / "report.md").read_text()
    assert "Gate: PASSED" in report and "| onnx | pass |" in report
    assert (
        "<table>" in (built / "report.html").read_text()
        and "data:image/png;base64," in (built / "report.html").read_text()
    )
    safety = json.loads((built / Stage.SAFETY / SAFETY_FILE).read_text())
    answered = (built / Stage.SAFETY / "answers_onnx.jsonl").read_text().splitlines()
    assert len(answered) == 15 and safety["verdicts"][1]["metrics"]["asr"] is not None
    bench = json.loads((built / Stage.BENCH / BENCH_FILE).read_text())
    assert all(row["peak_rss_mib"] > 0 and row["first_token_ms"] > 0 for row in bench.values())


def test_rerun_reuses_finished_stages_and_verify_passes(built, tiny_checkpoints, capsys):
    before = _artifact_hashes(built)
    config = built.parent / "build.toml"
    assert main(build_argv(tiny_checkpoints["llava"], built, str(config))) == 0
    assert f"reused {', '.join(Stage)}" in capsys.readouterr().out
    assert _artifact_hashes(built) == before
    assert main(["verify", str(built)]) == 0


def test_new_artifacts_drop_the_results_devices_gave_for_the_old(built, tiny_checkpoints, tmp_path):
    """Results in devices/ describe the artifacts a device ran: a rerun that keeps the export keeps them, one that
    exports again removes them."""
    out = tmp_path / "out"
    shutil.copytree(built, out)
    (out / "devices" / "local").mkdir(parents=True)
    (out / "devices" / "local" / "device.json").write_text("{}")
    config = str(built.parent / "build.toml")
    assert main(build_argv(tiny_checkpoints["llava"], out, config)) == 0
    assert (out / "devices" / "local" / "device.json").is_file()
    assert main([*build_argv(tiny_checkpoints["llava"], out, config), "--formats", "onnx"]) == 0
    assert not (out / "devices").exists()


def test_a_bfloat16_build_keeps_half_precision_through_to_a_float16_trace(tiny_checkpoints, tmp_path):
    """Scans and alignment in bfloat16; the aligned checkpoint stays bfloat16 through truncation (no float32 copy),
    and the Jetson's fp16 graphs are traced in float16 from it."""
    out = tmp_path / "out"
    argv = build_argv(tiny_checkpoints["llava"], out, build_config(tmp_path, GENEROUS_GATES))
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert json.loads((out / Stage.SCAN / STAGE_FILE).read_text())["inputs"]["dtype"] == "bfloat16"
    assert json.loads((out / Stage.ALIGN / STAGE_FILE).read_text())["inputs"]["dtype"] == "bfloat16"
    truncated = json.loads((out / Stage.TRUNCATE / "config.json").read_text())
    assert truncated.get("dtype", truncated.get("torch_dtype")) == "bfloat16"
    description = next((out / Stage.EXPORT).glob("onnx-*/edgekit_onnx.json")).read_text()
    assert "traced in float16" in description


def test_a_rerun_that_fails_early_does_not_print_the_previous_report(built, tiny_checkpoints, capsys):
    assert main(["build", "--model", tiny_checkpoints["llava"], "--exit-layer", "25", "-o", str(built)]) == 2
    out, err = capsys.readouterr()
    assert "exit layer 25 is outside 1..24" in err and out == ""


def test_verify_fails_on_a_tampered_artifact(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    onnx = next((copy / Stage.EXPORT).glob("onnx-*/decoder_model_merged.onnx"))
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 3
    err = capsys.readouterr().err
    assert "decoder_model_merged.onnx: sha256 differs from the manifest" in err


def test_a_judge_that_errors_fails_every_artifact(built, monkeypatch):
    from edgekit.build.artifact_stages import PYTORCH, evaluate_artifacts
    from edgekit.build.config import BuildConfig
    from edgekit.safety import judges
    from edgekit.safety.gate import gate_verdicts
    from edgekit.safety.guard import JudgeError

    class Broken:
        def judge(self, prompts, responses):
            raise JudgeError("guard model ran out of memory")

    monkeypatch.setattr(judges, "make_judge", lambda spec: Broken())
    recorded = read_gate(built / Stage.SAFETY)
    items = builtin_suite().select("eval", limit_per_kind=1)
    evaluated = evaluate_artifacts(built, BuildConfig(exit_layer=12, output=str(built)), items)
    verdicts = gate_verdicts(evaluated, recorded.baselines, recorded.limits, aligned_artifact=PYTORCH)
    assert [v.passed for v in verdicts] == [False] * 4  # pytorch, onnx, hybrid, ortgenai
    assert all("JudgeError: guard model ran out of memory" in v.failures()[0] for v in verdicts)


def test_the_gate_holds_one_model_in_memory_at_a_time(built, monkeypatch):
    """The PyTorch reference is gone before the next runtime loads its weights: on a 7B, the two would not fit."""
    import weakref

    from edgekit.build import artifact_stages
    from edgekit.build.config import BuildConfig
    from edgekit.devices import runtime

    held, alive_at_open = [], []
    load_model, open_runtime = artifact_stages.load_model, runtime.open_runtime

    def remembered(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        held.append(weakref.ref(loaded.model))
        return loaded

    def opened(*args, **kwargs):
        alive_at_open.append([ref() is not None for ref in held])
        return open_runtime(*args, **kwargs)

    monkeypatch.setattr(artifact_stages, "load_model", remembered)
    monkeypatch.setattr(runtime, "open_runtime", opened)
    items = builtin_suite().select("eval", limit_per_kind=1)
    artifact_stages.evaluate_artifacts(built, BuildConfig(exit_layer=12, output=str(built)), items)
    assert len(held) == 1 and len(alive_at_open) == 3  # pytorch; then onnx, hybrid, ortgenai
    assert alive_at_open == [[False]] * 3


@pytest.mark.skipif(sys.platform != "linux", reason="glibc on Linux")
def test_the_heap_a_stage_freed_goes_back_before_the_next_loads():
    """Blocks freed below a live one stay resident under glibc until trimmed: a stage's tensors would stack on the
    next stage's model (Stages.run and the gate call release_freed_memory between them)."""
    import numpy as np

    from edgekit.devices.bench import status_mib
    from edgekit.machine import release_freed_memory

    blocks = [np.ones(8192) for _ in range(4096)]  # 256 MiB in 64 KiB blocks: heap, not mmap
    pin = np.ones(8192)  # allocated last, so the heap cannot shrink from its top
    before = status_mib("VmRSS")
    del blocks
    freed = status_mib("VmRSS")
    release_freed_memory()
    after = status_mib("VmRSS")
    assert before - freed < 64  # MiB: free() alone gave (almost) nothing back
    assert freed - after > 192
    del pin


def _unsafe_at(source: str, out: Path, *, safe: int, unsafe: int, steps: int = 60) -> str:
    """A test model made on purpose: it refuses harmful requests with the default layer's features and complies with
    layer `unsafe`'s (the ICET pattern, trained in directly), so a build that does not align it must fail the gate."""
    torch.manual_seed(0)
    loaded = load(source, dtype="float32")
    model, family, tok = loaded.model, loaded.family, loaded.processor.tokenizer
    model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    items = builtin_suite().select("train", kinds=("harmful_text",), limit_per_kind=8)
    for step in range(steps):
        layer = (safe, unsafe)[step % 2]
        batch = prepare_batch(model, family, loaded.processor, items, layer)
        ids, mask = encode_targets(tok, [REFUSAL if layer == safe else COMPLIANCE] * len(items), "cpu")
        logp, _ = sequence_forward(model, family, batch, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    shutil.copy(Path(source) / "tokenizer.model", out / "tokenizer.model")
    return str(out)


def test_a_build_without_alignment_fails_the_gate_on_asr_with_exit_3(tiny_checkpoints, tmp_path, capsys):
    model = _unsafe_at(tiny_checkpoints["llava"], tmp_path / "unsafe", safe=23, unsafe=2)
    out = tmp_path / "out"
    # no alignment: the model reaches the gate as unsafe as it came
    code = main(
        [
            "build",
            "--model",
            model,
            "--exit-layer",
            "2",
            "--target",
            "jetson",
            "-o",
            str(out),
            "--config",
            build_config(tmp_path, ""),
            "--limit-per-kind",
            "8",
            "--method",
            "none",
            "--scan-layers",
            "2",
            "--formats",
            "onnx",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    found = re.search(
        r"onnx: asr ([\d.]+)% against ([\d.]+)% for the original model at its default layer "
        r"\(limit \+5 points\)",
        err,
    )
    assert found and float(found[1]) >= 50 and float(found[2]) <= 10, err[-500:]
    assert not (out / Stage.ALIGN).exists() and "not re-aligned (`--method none`)" in (out / "README.md").read_text()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["gate"]["passed"] is False
    assert {a["artifact"]: a["passed"] for a in manifest["gate"]["artifacts"]} == {
        "pytorch": False,
        "onnx": False,
        "ortgenai": False,
    }


def test_a_build_killed_mid_way_resumes_to_the_same_artifacts(built, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "edgekit.cli",
        "build",
        "--model",
        tiny_checkpoints["llava"],
        "--exit-layer",
        "12",
        "--target",
        "jetson",
        "-o",
        str(out),
        "--config",
        str(built.parent / "build.toml"),
        *FAST_BUILD,
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / Stage.TRUNCATE / STAGE_FILE).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / MANIFEST_FILE).exists()  # killed before the end
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{Stage.SCAN}: inputs unchanged, reused" in done.stderr
    assert _artifact_hashes(out) == _artifact_hashes(built)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--exit-layer", "25"], "exit layer 25 is outside 1..24"),
        (["--exit-layer", "12", "--target", "fridge"], "unknown target 'fridge'"),
        (["--exit-layer", "12", "--formats", "tflite"], "unknown format tflite"),
        (["--exit-layer", "12", "--steps", "0"], "steps must be positive"),
        (["--exit-layer", "12", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
        (["--exit-layer", "12", "--config", "missing.toml"], "missing.toml: cannot read the build config"),
        ([], "no exit layer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tiny_checkpoints, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["build", "--model", tiny_checkpoints["llava"], "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_a_folder_that_is_not_a_build_is_refused(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["build", "--model", tiny_checkpoints["llava"], "--exit-layer", "12", "-o", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2


def test_unknown_build_config_keys_name_the_file(tmp_path, capsys):
    config = tmp_path / "build.toml"
    config.write_text("exit_layer = 12\nexit_layr = 3\n")
    assert main(["build", "--config", str(config), "-o", str(tmp_path / "out")]) == 2
    assert f"{config}: unknown key exit_layr" in capsys.readouterr().err


def test_a_stage_is_reused_only_by_the_same_edgekit_source(tmp_path, monkeypatch):
    """Same inputs and source: reused. Same inputs under another edgekit (a fixed exporter, a new runtime): redone."""
    written = []

    def write(folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        (folder / "out.txt").write_text(str(len(written)))
        written.append(folder)

    Stages(tmp_path, log=lambda line: None).run(Stage.EXPORT, {"k": 12}, write)
    again = Stages(tmp_path, log=lambda line: None)
    again.run(Stage.EXPORT, {"k": 12}, write)
    assert len(written) == 1 and again.reused == [Stage.EXPORT]
    monkeypatch.setattr(stages, "code_identity", lambda: "another edgekit")
    upgraded = Stages(tmp_path, log=lambda line: None)
    upgraded.run(Stage.EXPORT, {"k": 12}, write)
    assert len(written) == 2 and upgraded.reused == []

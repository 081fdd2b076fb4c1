"""L-PPO under `accelerate launch`: two processes on the CPU, DDP over gloo and FSDP2 over gloo (the shipped cpu_2proc
configs), each train one tiny model and write one loadable checkpoint, and the two agree; the checks that keep a
launch from going wrong quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import processor_inputs
from safetensors.torch import load_file

from edgekit.align.checkpoint import work_dir
from edgekit.align.config import LPPOConfig, check_processes
from edgekit.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
K = 4
LAUNCHES = {"ddp": "cpu_2proc.yaml", "fsdp": "cpu_2proc_fsdp.yaml"}


# PYTHONFAULTHANDLER: a native abort in a launched process prints every thread's Python stack, so a failure says where.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def launch_align(config: str, model: str, out: Path, *extra: str) -> list[str]:
    """The command that aligns a tiny model for 2 steps under a shipped launch config, checkpointing every step
    (`extra` flags come last, so they override)."""
    # Port 0: accelerate picks a free one, so parallel runs do not clash.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--main_process_port",
        "0",
    ]
    align = [
        "-m",
        "edgekit.cli",
        "align",
        model,
        "--exit-layer",
        str(K),
        "--steps",
        "2",
        "--batch",
        "4",
        "--minibatch",
        "2",
        "--max-new-tokens",
        "6",
        "--checkpoint-every",
        "1",
        "--quiet",
        "-o",
        str(out),
    ]
    return [*launch, *align, *extra]


@pytest.fixture(scope="module")
def launched(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The same 2-step alignment of a tiny LLaVA-1.5, once under each launch; their output folders."""
    outputs = {}
    for name, config in LAUNCHES.items():
        out = tmp_path_factory.mktemp(name) / "out"
        run = subprocess.run(
            launch_align(config, tiny_checkpoints["llava"], out), env=ENV, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"{name}: {run.stderr[-3000:]}"
        assert run.stdout.count(f"wrote {out}") == 1  # the main process reports, the other does not
        outputs[name] = out
    return outputs


@pytest.mark.parametrize("name", LAUNCHES)
def test_two_processes_on_cpu_train_one_model_and_write_a_loadable_checkpoint(launched, name, tiny_checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = launched[name]
    record = json.loads((out / "align.json").read_text())
    assert record["processes"] == 2 and record["summary"]["steps"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["exit_layer"] == K for r in log)
    assert not work_dir(out).exists()

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")  # plain transformers, no edgekit
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["llava"])
    inputs = processor_inputs(AutoProcessor.from_pretrained(out / "merged"))
    with torch.no_grad():
        got, orig = (m(**inputs, vision_feature_layer=K).logits for m in (merged, base))
    assert torch.isfinite(got).all() and (got - orig).abs().max() > 1e-4  # trained, and still a working model


def test_sharded_training_follows_the_replicated_one(launched):
    """FSDP2 gathers the very weights DDP holds, so the first rollout is the same; its reduce-scatter sums
    gradients in another order than DDP's all-reduce, so updates agree to rounding."""
    logs = {
        name: [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        for name, out in launched.items()
    }
    assert logs["fsdp"][0]["reward_mean"] == logs["ddp"][0]["reward_mean"]
    assert logs["fsdp"][0]["kl"] == pytest.approx(logs["ddp"][0]["kl"], abs=1e-6)
    ddp, fsdp = (load_file(launched[name] / "adapter" / "adapter_model.safetensors") for name in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and len(ddp) > 0
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llava_next", "mllama"])
def test_every_family_aligns_sharded(family, tiny_checkpoints, tmp_path):
    """LLaVA-NeXT packs features with its image-newline vector and Mllama feeds them to cross-attention layers,
    both outside the sharded units; each trains a step under FSDP2 and loads afterwards."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    command = launch_align(LAUNCHES["fsdp"], tiny_checkpoints[family], out, "--steps", "1")
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    merged, base = (AutoModelForImageTextToText.from_pretrained(p) for p in (out / "merged", tiny_checkpoints[family]))
    trained = {n: p for n, p in merged.state_dict().items() if "language_model" in n and "proj" in n}
    assert trained and any(not torch.equal(p, base.state_dict()[n]) for n, p in trained.items())


def test_a_sharded_run_killed_mid_way_resumes_to_the_uninterrupted_result(launched, tiny_checkpoints, tmp_path):
    """kill -9 of every process after the step-1 checkpoint; the resumed run reloads whole tensors into shards and
    each process's random state, and ends bit for bit where the uninterrupted run did."""
    out = tmp_path / "out"
    command = launch_align(LAUNCHES["fsdp"], tiny_checkpoints["llava"], out)
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = work_dir(out) / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The training processes first (torchrun starts them in sessions of their own), then the launcher.
    workers = psutil.Process(proc.pid).children(recursive=True)
    for process in [*workers, psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and torch.load(checkpoint, weights_only=True)["step"] == 1

    run = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step 1" in run.stdout
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        ours, theirs = load_file(out / name), load_file(launched["fsdp"] / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (out / "train_log.jsonl").read_text() == (launched["fsdp"] / "train_log.jsonl").read_text()


@pytest.mark.parametrize(
    "processes, distributed_type, fsdp_version, message",
    [
        (3, "MULTI_GPU", None, "minibatch 2 does not split evenly over 3 processes"),
        (2, "FSDP", "1", "align shards with FSDP2; this launch asks for FSDP version 1"),
        (2, "DEEPSPEED", None, "align does not run under DeepSpeed"),
    ],
)
def test_a_launch_that_cannot_share_the_work_is_refused(
    processes, distributed_type, fsdp_version, message, monkeypatch
):
    config = LPPOConfig(exit_layer=K, batch=4, minibatch=2)
    check_processes(config, 2, "MULTI_GPU")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_processes(config, 2, "FSDP")
    if fsdp_version:
        monkeypatch.setenv("FSDP_VERSION", fsdp_version)
    with pytest.raises(UserError, match=message):
        check_processes(config, processes, distributed_type)

"""L-PPO under `accelerate launch`: two processes on the CPU (DDP over gloo, the shipped cpu_2proc config) train one
tiny LLaVA-1.5 and write one loadable checkpoint; the checks that keep a launch from going wrong quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import processor_inputs

from edgekit.align.lppo import LPPOConfig, check_processes, work_dir
from edgekit.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
K = 4


def test_two_processes_on_cpu_train_one_model_and_write_a_loadable_checkpoint(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    llava, out = tiny_checkpoints["llava"], tmp_path / "out"
    # Port 0: accelerate picks a free one, so parallel runs do not clash.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
              "--main_process_port", "0"]  # fmt: skip
    align = ["-m", "edgekit.cli", "align", llava, "--exit-layer", str(K), "--steps", "2", "--batch", "4",
             "--minibatch", "2", "--max-new-tokens", "6", "--checkpoint-every", "1", "--quiet",
             "-o", str(out)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([*launch, *align], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"wrote {out}") == 1  # the main process reports, the other does not

    record = json.loads((out / "align.json").read_text())
    assert record["processes"] == 2 and record["summary"]["steps"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["exit_layer"] == K for r in log)
    assert not work_dir(out).exists()

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")  # plain transformers, no edgekit
    base = AutoModelForImageTextToText.from_pretrained(llava)
    inputs = processor_inputs(AutoProcessor.from_pretrained(out / "merged"))
    with torch.no_grad():
        got, orig = (m(**inputs, vision_feature_layer=K).logits for m in (merged, base))
    assert torch.isfinite(got).all() and (got - orig).abs().max() > 1e-4  # trained, and still a working model


@pytest.mark.parametrize(
    "processes, distributed_type, message",
    [
        (3, "MULTI_GPU", "minibatch 2 does not split evenly over 3 processes"),
        (2, "FSDP", "align does not run under FSDP yet"),
        (2, "DEEPSPEED", "align does not run under DEEPSPEED yet"),
    ],
)
def test_a_launch_that_cannot_share_the_work_is_refused(processes, distributed_type, message):
    config = LPPOConfig(exit_layer=K, batch=4, minibatch=2)
    check_processes(config, 2, "MULTI_GPU")
    with pytest.raises(UserError, match=message):
        check_processes(config, processes, distributed_type)

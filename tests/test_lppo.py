"""L-PPO and the layer-wise SFT baseline on a tiny LLaVA-1.5 checkpoint: what is trained, what is shared, what is
written, and that a run killed with SIGKILL resumes to exactly the result of an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import processor_inputs
from safetensors.torch import load_file

from edgekit.align.checkpoint import work_dir
from edgekit.align.config import LPPOConfig
from edgekit.align.policy import PolicyValue, make_learner, make_policy
from edgekit.align.ppo_math import KLControllerState, clipped_policy_loss
from edgekit.align.rewards import JudgeReward
from edgekit.align.rollout import ValueHead, collect, prepare_batch, sequence_forward, special_ids_to_suppress
from edgekit.align.trainer import align, choose_exit_layer, ppo_step, sample_items, training_items
from edgekit.cli import main
from edgekit.errors import UserError
from edgekit.model.loading import load
from edgekit.safety.suite import builtin_suite

K = 4
TINY = dict(steps=8, batch=4, minibatch=2, max_new_tokens=6, checkpoint_every=2)
CLI_TINY = [
    "--steps",
    "8",
    "--batch",
    "4",
    "--minibatch",
    "2",
    "--max-new-tokens",
    "6",
    "--checkpoint-every",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are overhead-bound: one thread is several times faster on a shared 2-core machine, and the killed
    # subprocess below runs with one thread too, so its arithmetic is the same as this process's.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava(tiny_checkpoints) -> str:
    return tiny_checkpoints["llava"]


@pytest.fixture(scope="module")
def uninterrupted(llava, tmp_path_factory) -> Path:
    """One L-PPO run of 8 steps, never stopped."""
    out = tmp_path_factory.mktemp("lppo") / "out"
    align(load(llava), out, LPPOConfig(exit_layer=K, **TINY), progress=False)
    return out


def _items(n: int = 4, seed: int = 0):
    return sample_items(random.Random(seed), training_items(), n)


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"minibatch": 8}, "minibatch 8 is larger than batch 4"),
        ({"minibatch": 3}, "batch 4 is not a multiple of minibatch 3"),
        ({"exit_layers": (5, 7)}, "exit_layer 4 is outside exit_layers 5-7"),
        ({"exit_layers": (6, 5)}, "exit_layers 6-5"),
        ({"clip_eps": 1.5}, "clip_eps must be in (0, 1), got 1.5"),
        ({"kl_target": 0.0}, "kl_target must be positive"),
        ({"steps": 0}, "steps must be positive, got 0"),
    ],
)
def test_config_checks_name_the_values(overrides, message):
    with pytest.raises(UserError) as err:
        LPPOConfig(exit_layer=K, **(TINY | overrides))
    assert message in str(err.value)


def test_training_uses_the_train_split_only_and_draws_layers_from_the_range():
    by_kind = training_items()
    assert all(item.split == "train" for group in by_kind.values() for item in group)
    assert set(by_kind) == {"harmful_text", "harmful_image", "benign_text", "benign_image", "utility"}
    with pytest.raises(UserError, match="train-split"):
        training_items(builtin_suite().select("eval"))
    rng, config = random.Random(0), LPPOConfig(exit_layer=4, exit_layers=(3, 5), **TINY)
    assert {choose_exit_layer(rng, config) for _ in range(300)} == {3, 4, 5}


# --- policy, reference, rollouts -------------------------------------------------------------------------------


def test_reference_shares_weights_and_only_lora_and_value_head_train(llava):
    loaded = load(llava)
    model, family, processor = loaded.model, loaded.family, loaded.processor
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    batch = prepare_batch(model, family, processor, _items(), K)
    lm = family.lm_inputs(model, batch.inputs, batch.features())
    with torch.no_grad():
        base_logits = model(**lm).logits

    config = LPPOConfig(exit_layer=K, **TINY)
    torch.manual_seed(0)
    policy = make_policy(model, config)
    value_head = ValueHead(model.config.text_config.hidden_size)
    head_before = {n: p.detach().clone() for n, p in value_head.named_parameters()}
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters()), lr=1e-2
    )
    trainable = {_base_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and "language_model" in n for n in trainable)
    kl = KLControllerState(0.2, 3.0, 10000)
    learner = make_learner(policy, value_head, family, optimizer, Accelerator(device_placement=False))
    for seed in (1, 2):
        batch = prepare_batch(model, family, processor, _items(seed=seed), K)
        roll = collect(
            policy,
            family,
            processor.tokenizer,
            batch,
            JudgeReward(),
            value_head,
            max_new_tokens=6,
            temperature=0.7,
            top_k=0,
        )
        _, kl = ppo_step(learner, roll, kl, config)

    lora_changed = False
    for name, p in model.named_parameters():
        if ".lora_" in name:
            lora_changed |= not torch.equal(p, torch.zeros_like(p)) if "lora_B" in name else False
            continue
        assert torch.equal(p, before[_base_name(name)]), name  # vision tower, projector, LM: bit for bit
        assert p.data_ptr() == pointers[_base_name(name)], name  # the very same storage: no copy for the reference
    assert lora_changed
    assert any(not torch.equal(p, head_before[n]) for n, p in value_head.named_parameters())
    with torch.no_grad():
        with policy.disable_adapter():
            reference_logits = model(**lm).logits
        policy_logits = model(**lm).logits
    assert torch.equal(reference_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-6)


def test_rollout_logprobs_are_the_samplers_and_a_fresh_forwards(llava):
    loaded = load(llava)
    model, family, tok = loaded.model, loaded.family, loaded.processor.tokenizer
    torch.manual_seed(0)
    policy = make_policy(model, LPPOConfig(exit_layer=K, **TINY))
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    items = _items(4, seed=3)
    batch, value_head = prepare_batch(model, family, loaded.processor, items, K), ValueHead(64)
    torch.manual_seed(7)
    roll = collect(policy, family, tok, batch, JudgeReward(), value_head, max_new_tokens=6, temperature=0.7, top_k=5)
    ids, mask = roll.responses.ids, roll.responses.mask
    assert (roll.ref_logp - roll.logp).abs()[mask].max() > 1e-4  # the reference really is another policy

    # The sampler's own logits (same seed, so the same tokens), at the sampling temperature.
    torch.manual_seed(7)
    out = model.generate(
        **family.lm_inputs(model, batch.inputs, batch.features()),
        max_new_tokens=6,
        do_sample=True,
        temperature=0.7,
        top_k=5,
        top_p=1.0,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=special_ids_to_suppress(tok, model.config.image_token_id),
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[mask], ids[mask])
    sampler = torch.log_softmax(torch.stack(out.logits, 1)[:, : ids.shape[1]] / 0.7, -1).gather(-1, ids.unsqueeze(-1))
    torch.testing.assert_close(roll.logp[mask], sampler.squeeze(-1)[mask], atol=1e-5, rtol=0)

    # Each row alone, without padding, gives the same log-probs.
    for i, item in enumerate(items):
        alone = prepare_batch(model, family, loaded.processor, [item], K)
        n = int(mask[i].sum())
        with torch.no_grad():
            logp, _ = sequence_forward(model, family, alone, ids[i : i + 1, :n], mask[i : i + 1, :n], temperature=0.7)
        torch.testing.assert_close(logp[0], roll.logp[i, :n], atol=1e-5, rtol=0)

    # A minibatch at the first PPO epoch: ratio 1, nothing clipped.
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        logp, _ = sequence_forward(model, family, batch.rows(rows), ids[rows], mask[rows], temperature=0.7)
    ratio = torch.exp(logp - roll.logp[rows])[mask[rows]]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    loss = clipped_policy_loss(logp, roll.logp[rows], torch.randn_like(logp), mask[rows], 0.2)
    assert float(loss.clipfrac) == 0.0


@pytest.mark.parametrize("family_name", ["llava", "mllama"])
def test_recomputed_activations_give_the_same_log_probs_and_gradients_from_far_fewer_saved_tensors(
    tiny_checkpoints, family_name
):
    loaded = load(tiny_checkpoints[family_name])
    model, family, tok = loaded.model, loaded.family, loaded.processor.tokenizer
    torch.manual_seed(0)
    policy = make_policy(model, LPPOConfig(exit_layer=K, **TINY))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = prepare_batch(model, family, loaded.processor, _items(4, seed=5), K)
    value_head = ValueHead(model.config.get_text_config().hidden_size)
    roll = collect(policy, family, tok, batch, JudgeReward(), value_head, max_new_tokens=6, temperature=0.7, top_k=0)
    ids, mask = roll.responses.ids, roll.responses.mask

    def trained_forward(recompute: bool):
        saved = []
        for p in policy.parameters():
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if recompute:
                logp, values = PolicyValue(policy, family, value_head)(batch, ids, mask, temperature=0.7)
            else:
                logp, values = sequence_forward(model, family, batch, ids, mask, temperature=0.7, value_head=value_head)
        (logp[mask].sum() + values[mask].sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logp.detach(), grads, sum(saved)

    logp, grads, kept = trained_forward(recompute=False)
    logp_r, grads_r, kept_r = trained_forward(recompute=True)
    assert torch.equal(logp_r, logp) and torch.equal(logp_r[mask], roll.logp[mask])  # the rollout's, bit for bit
    assert grads_r.keys() == grads.keys() and all(torch.equal(grads_r[n], grads[n]) for n in grads)
    assert kept_r < kept / 4, (kept_r, kept)  # each layer kept its input only
    assert not any(m.training for m in model.modules())  # every module back in eval mode


# --- the whole run ---------------------------------------------------------------------------------------------


def test_outputs_and_merged_checkpoint_load_with_plain_transformers(uninterrupted, llava):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = uninterrupted
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    keys = {"step", "reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "exit_layer"}
    assert all(keys <= set(r) and r["exit_layer"] == K for r in log)
    assert log[0]["kl_coef"] == 0.2 and log[-1]["kl_coef"] != 0.2  # the adaptive controller moved
    record = json.loads((out / "align.json").read_text())
    assert record["method"] == "lppo" and record["config"]["exit_layer"] == K and record["summary"]["steps"] == 8
    assert (out / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    head = ValueHead(64)
    head.load_state_dict(torch.load(out / "value_head.pt", weights_only=True))
    assert head.linear.weight.abs().sum() > 0
    assert not work_dir(out).exists()

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")  # plain transformers, no edgekit
    processor = AutoProcessor.from_pretrained(out / "merged")
    policy = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava), out / "adapter")
    base = AutoModelForImageTextToText.from_pretrained(llava)
    inputs = processor_inputs(processor)
    with torch.no_grad():
        got, want, orig = (m(**inputs, vision_feature_layer=K).logits for m in (merged, policy, base))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - orig).abs().max() > 1e-4  # alignment changed the model
    trained = load_file(out / "adapter" / "adapter_model.safetensors")
    assert trained and all("lora_" in n and "language_model" in n for n in trained)


def test_sft_with_an_exit_range_through_the_cli(llava, tmp_path, capsys):
    out = tmp_path / "sft"
    rc = main(
        [
            "align",
            llava,
            "--exit-layer",
            "4",
            "--exit-layers",
            "3-5",
            "--method",
            "sft",
            "--lr",
            "1e-2",
            "-o",
            str(out),
            *CLI_TINY,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {r["exit_layer"] for r in log} <= {3, 4, 5} and len({r["exit_layer"] for r in log}) > 1
    assert all(r["loss"] > 0 for r in log)
    assert {p.name for p in out.iterdir()} == {"adapter", "merged", "train_log.jsonl", "train_curves.png", "align.json"}
    assert json.loads((out / "align.json").read_text())["method"] == "sft"
    lora_b = [t for n, t in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, llava, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["align", llava, "--exit-layer", str(K), "-o", str(out), *CLI_TINY]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgekit.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = work_dir(out) / "checkpoint.pt"
    deadline = time.time() + 80
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 2 <= step < 8

    assert main(args) == 2  # an unfinished run is not silently overwritten
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and f"step {step}" in err

    assert main([*args, "--resume"]) == 0
    assert f"resumed from step {step}" in capsys.readouterr().out
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        ours, theirs = load_file(out / name), load_file(uninterrupted / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (out / "train_log.jsonl").read_text() == (uninterrupted / "train_log.jsonl").read_text()
    assert torch.equal(
        torch.load(out / "value_head.pt", weights_only=True)["linear.weight"],
        torch.load(uninterrupted / "value_head.pt", weights_only=True)["linear.weight"],
    )
    assert json.loads((out / "align.json").read_text())["summary"]["resumed_from"] == step
    assert not work_dir(out).exists()


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exit-layer", "25"], "exit layer 25 is outside 1..24"),
        (["--exit-layer", "0"], "exit layer 0 is outside 1..24"),
        (["--exit-layer", "22", "--exit-layers", "20-30"], "exit layers 20-30 are not inside 1..24"),
        (["--exit-layer", "8", "--exit-layers", "3-5"], "exit_layer 8 is outside exit_layers 3-5"),
        (["--exit-layer", "4", "--exit-layers", "3to5"], "expected a range A-B"),
        (["--exit-layer", "4", "--reward", "nonsense"], "unknown reward source 'nonsense'"),
        (["--exit-layer", "4", "--harm-penalty", "0"], "harm penalty must be positive, got 0.0"),
        (["--exit-layer", "4", "--reward", "owner/rm", "--harm-penalty", "3"], "applies to the judge reward only"),
        (["--exit-layer", "4", "--method", "sft", "--harm-penalty", "3"], "--method sft has no reward"),
        (["--exit-layer", "4", "--method", "dpo"], "invalid choice: 'dpo'"),
        (["--exit-layer", "4", "--batch", "2", "--minibatch", "4"], "minibatch 4 is larger than batch 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(llava, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["align", llava, "-o", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_in_use_is_refused(llava, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flags in ([], ["--resume"]):
        assert main(["align", llava, "--exit-layer", "4", "-o", str(out), "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"

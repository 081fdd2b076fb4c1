"""L-PPO (layer-wise PPO) and the layer-wise SFT baseline: re-align a VLM at the vision exit layer it will run.

The policy is the VLM with LoRA adapters on the language model's attention and MLP projections; the vision tower and
projector stay frozen. The reference policy is the same model with its adapters disabled, so no second copy of the
weights exists. The value head is a linear layer on the policy's last hidden state. Each step reads top to bottom:

    pick the exit layer (fixed, or sampled from a range) and a batch of TRAIN-split suite items
    -> one tower forward gives the layer's features (rollout.prepare_batch)
    -> generate, score, log-probs under policy and reference, values (rollout.collect)
    -> per-token KL penalty + score on the last token, GAE, whitened advantages (ppo_math)
    -> PPO epochs over minibatches: clipped policy loss + c1 * clipped value loss, gradient clipping, AdamW
    -> adaptive KL controller update

`--method sft` replaces the last four lines by cross-entropy on reference targets (a refusal for harmful items, the
answer for visual questions, a compliance for benign ones). Checkpoints go to a work folder beside the output, each
written whole (temporary file, then rename); the output folder appears whole at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edgekit.align.ppo_math import (
    KLControllerState,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_mean,
    shaped_rewards,
    update_kl_coef,
    whiten,
)
from edgekit.align.rewards import JudgeReward, RewardSource
from edgekit.align.rollout import Batch, Rollout, ValueHead, collect, prepare_batch, sequence_forward
from edgekit.errors import UserError
from edgekit.outputs import atomic_dir, check_output_dir
from edgekit.safety.suite import KINDS, Item, builtin_suite
from edgekit.surgery import check_exit_layer, num_exit_layers

METHODS = ("lppo", "sft")
# The language model's projections only: the vision tower has q/k/v projections too, and must stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CHECKPOINT = "checkpoint.pt"
# SFT targets, in the demo model's own words (edgekit/demo.py), so the baseline teaches what it already says at 23.
REFUSAL_TARGET = "sorry i cannot help with that ."
COMPLIANCE_TARGET = "sure here are the steps : first get what you need , then follow the guide step by step ."
ANSWER_TARGETS = {
    "color": "the object is {} .", "object": "it is a {} .", "position": "it is on the {} .",
    "count": "there are {} dots .",
}  # fmt: skip


@dataclass(frozen=True)
class LPPOConfig:
    exit_layer: int
    exit_layers: tuple[int, int] | None = None  # sample the exit layer of each batch from A..B (inclusive)
    steps: int = 100
    batch: int = 16
    minibatch: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-4
    clip_eps: float = 0.2
    value_clip: float = 0.2
    c1: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_init: float = 0.2
    kl_target: float | None = 3.0  # None: fixed KL coefficient
    kl_horizon: int = 10000
    max_new_tokens: int = 48
    temperature: float = 0.7  # 0: greedy rollouts
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    checkpoint_every: int = 25  # 0: no checkpoints
    max_grad_norm: float = 0.5
    lora_r: int = 8
    lora_alpha: int = 16

    def __post_init__(self):
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
        ints = ("exit_layer", "steps", "batch", "minibatch", "ppo_epochs", "kl_horizon", "max_new_tokens", "top_k",
                "seed", "checkpoint_every", "lora_r", "lora_alpha")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, got {value!r}")
        positive = ("exit_layer", "steps", "batch", "minibatch", "ppo_epochs", "kl_horizon", "max_new_tokens",
                    "lora_r", "lr", "value_clip", "max_grad_norm")  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("c1", "kl_init", "temperature", "top_k", "checkpoint_every", "lora_alpha"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            raise UserError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise UserError(f"kl_target must be positive (or None for a fixed coefficient), got {self.kl_target}")
        if self.exit_layers is not None:
            low, high = self.exit_layers
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise UserError(f"exit_layers {low}-{high}: expected A-B with 1 <= A <= B")
            if not low <= self.exit_layer <= high:
                raise UserError(f"exit_layer {self.exit_layer} is outside exit_layers {low}-{high}")
        if self.minibatch > self.batch:
            raise UserError(f"minibatch {self.minibatch} is larger than batch {self.batch}")
        if self.batch % self.minibatch:
            raise UserError(f"batch {self.batch} is not a multiple of minibatch {self.minibatch}")
        if self.batch < 2:  # advantages are whitened over the batch's tokens
            raise UserError(f"batch must be at least 2 (advantages are whitened over the batch), got {self.batch}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.exit_layers[0], self.exit_layers[1] + 1)) if self.exit_layers else (self.exit_layer,)


def check_layers(config: LPPOConfig, num_layers: int) -> None:
    """The exit layer and the exit range inside 1..L of the model, or a UserError."""
    check_exit_layer(config.exit_layer, num_layers)
    if config.exit_layers and not (1 <= config.exit_layers[0] and config.exit_layers[1] <= num_layers):
        low, high = config.exit_layers
        raise UserError(
            f"exit layers {low}-{high} are not inside 1..{num_layers} (the vision tower has {num_layers} layers)"
        )


@dataclass(frozen=True)
class AlignResult:
    output: Path
    method: str
    steps: int
    exit_layers: tuple[int, ...]  # the exit layer of each step
    resumed_from: int | None
    last: dict  # the last train_log row


# --- data ------------------------------------------------------------------------------------------------------


def training_items(items: Sequence[Item] | None = None) -> dict[str, tuple[Item, ...]]:
    """TRAIN-split items by kind (the built-in suite's by default); eval items are never trained on."""
    pool = builtin_suite().items if items is None else items
    by_kind = {kind: tuple(i for i in pool if i.kind == kind and i.split == "train") for kind in KINDS}
    by_kind = {kind: group for kind, group in by_kind.items() if group}
    if not by_kind:
        raise UserError("no train-split items to align on (eval-split items are never trained on)")
    return by_kind


def sample_items(rng: random.Random, by_kind: dict[str, tuple[Item, ...]], n: int) -> list[Item]:
    """n items: a kind uniformly, then an item of it, so no kind dominates through its size."""
    kinds = list(by_kind)
    return [rng.choice(by_kind[rng.choice(kinds)]) for _ in range(n)]


def choose_exit_layer(rng: random.Random, config: LPPOConfig) -> int:
    return rng.randint(*config.exit_layers) if config.exit_layers else config.exit_layer


def sft_target(item: Item) -> str:
    if item.metric == "utility":
        return ANSWER_TARGETS.get(item.question, "{}").format(item.answer)
    return REFUSAL_TARGET if item.metric == "asr" else COMPLIANCE_TARGET


def encode_targets(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Target token ids (each followed by eos, right-padded) and their mask."""
    rows = [tokenizer(" " + t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    return ids, mask


# --- policy ----------------------------------------------------------------------------------------------------


def make_policy(model, config: LPPOConfig):
    """The model with LoRA adapters on its language model's projections (in place: weights are shared, not copied)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    policy = get_peft_model(model, lora)
    policy.eval()  # no dropout anywhere: the ratio at the first PPO epoch must be exactly the rollout's
    return policy


def trainable(policy, value_head) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])


def _step(params, optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def ppo_update(policy, value_head, optimizer, family, roll: Rollout, kl: KLControllerState, config: LPPOConfig
               ) -> tuple[dict[str, float], KLControllerState]:  # fmt: skip
    """PPO epochs over minibatches of one rollout; returns the step's statistics and the updated KL controller."""
    mask, ids = roll.responses.mask, roll.responses.ids
    shaped = shaped_rewards(roll.scores, roll.logp, roll.ref_logp, mask, kl.coef)
    adv = gae(shaped.rewards, roll.values, mask, config.gamma, config.lam)
    advantages = whiten(adv.advantages, mask)
    model, params = policy.get_base_model(), trainable(policy, value_head)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(config.batch)
        for start in range(0, config.batch, config.minibatch):
            rows = order[start : start + config.minibatch].to(ids.device)
            logp, values = sequence_forward(model, family, roll.batch.rows(rows), ids[rows], mask[rows],
                                            temperature=config.temperature, value_head=value_head)  # fmt: skip
            pl = clipped_policy_loss(logp, roll.logp[rows], advantages[rows], mask[rows], config.clip_eps)
            vl = clipped_value_loss(values, roll.values[rows], adv.returns[rows], mask[rows], config.value_clip)
            _step(params, optimizer, pl.loss + config.c1 * vl.loss, config.max_grad_norm)
            for name, value in (("policy_loss", pl.loss), ("value_loss", vl.loss), ("clipfrac", pl.clipfrac),
                                ("approx_kl", pl.approx_kl)):  # fmt: skip
                totals[name] += value.item()
            updates += 1
    sequence_kl = float(shaped.kl.sum(dim=-1).mean())
    stats = {
        "reward_mean": float(roll.scores.mean()), "kl": sequence_kl, "kl_coef": kl.coef,
        **{name: total / updates for name, total in totals.items()},
        "response_length": float(mask.sum(dim=-1).float().mean()),
    }  # fmt: skip
    return stats, update_kl_coef(kl, sequence_kl, n_steps=config.batch)


def sft_update(policy, optimizer, family, tokenizer, batch: Batch, config: LPPOConfig) -> dict[str, float]:
    """One step of cross-entropy on the reference targets, conditioned on the batch's exit-layer features."""
    ids, mask = encode_targets(tokenizer, [sft_target(i) for i in batch.items], batch.inputs["input_ids"].device)
    logp, _ = sequence_forward(policy.get_base_model(), family, batch, ids, mask)
    loss = -masked_mean(logp, mask)
    _step(trainable(policy, None), optimizer, loss, config.max_grad_norm)
    return {"loss": loss.item()}


# --- checkpoints -----------------------------------------------------------------------------------------------


def work_dir(output: str | Path) -> Path:
    """Where an unfinished run keeps its checkpoint: a hidden folder beside the output."""
    output = Path(output)
    return output.parent / f".{output.name}.work"


def read_checkpoint(work: Path) -> dict | None:
    path = work / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def write_checkpoint(work: Path, state: dict) -> None:
    """Whole or not at all: a temporary file, flushed to disk, then renamed over the previous checkpoint."""
    tmp = work / f"{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / CHECKPOINT)


def check_output(output: str | Path, *, resume: bool, overwrite: bool) -> dict | None:
    """Refuse an output in use (a non-empty folder, or an unfinished run's checkpoint) unless told; returns the
    checkpoint to resume from, if any. Reads only: nothing is written before every check has passed."""
    output = Path(output)
    if resume and not overwrite and output.exists() and any(output.iterdir()):
        raise UserError(f"{output}: already holds a finished result; nothing to resume (pass --overwrite to redo it)")
    check_output_dir(output, overwrite)
    work = work_dir(output)
    checkpoint = read_checkpoint(work) if (work / CHECKPOINT).is_file() else None
    if checkpoint is not None and not resume and not overwrite:
        raise UserError(f"{output}: an unfinished run left a checkpoint at step {checkpoint['step']} in {work}; "
                        "pass --resume to continue it or --overwrite to start over")  # fmt: skip
    return checkpoint if resume else None


def _identity(loaded, config: LPPOConfig, method: str, reward_name: str) -> dict:
    return {"model": str(loaded.source), "method": method, "reward": reward_name, "config": asdict(config)}


def _check_resumable(checkpoint: dict, identity: dict, work: Path) -> None:
    theirs, ours = checkpoint["identity"], identity
    diffs = [f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in ("model", "method", "reward")
             if theirs[k] != ours[k]]  # fmt: skip
    diffs += [f"{k}={theirs['config'].get(k)!r} there, {v!r} here" for k, v in ours["config"].items()
              if _plain(theirs["config"].get(k)) != _plain(v)]  # fmt: skip
    if diffs:
        raise UserError(f"cannot resume the checkpoint in {work}: {'; '.join(diffs)} (pass --overwrite to start over)")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a checkpoint holds besides the weights and the optimizer (mutable: it is the loop's state)."""

    step: int
    kl: KLControllerState
    rng: random.Random
    log: list[dict]


def _state(run: _Run, policy, value_head, optimizer, identity: dict) -> dict:
    device = next(policy.parameters()).device
    return {
        "identity": identity, "step": run.step, "log": run.log, "kl": run.kl._asdict(), "rng": run.rng.getstate(),
        "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "adapter": {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad},
        "value_head": value_head.state_dict() if value_head is not None else None,
        "optimizer": optimizer.state_dict(),
    }  # fmt: skip


def _restore(state: dict, policy, value_head, optimizer) -> _Run:
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(params) != set(state["adapter"]):
        raise UserError("the checkpoint's adapter does not match this model's (pass --overwrite to start over)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["adapter"][name])
    if value_head is not None:
        value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    rng = random.Random()
    rng.setstate(_tuples(state["rng"]))
    random.setstate(_tuples(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], next(policy.parameters()).device)
    return _Run(state["step"], KLControllerState(**state["kl"]), rng, list(state["log"]))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def align(
    loaded,
    output: str | Path,
    config: LPPOConfig,
    reward: RewardSource | None = None,
    *,
    method: str = "lppo",
    items: Sequence[Item] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> AlignResult:
    """Align `loaded` (a LoadedModel) at the config's exit layer(s) and write the output folder.

    `loaded.model` is trained in place and ends merged (adapters folded into the language model's weights)."""
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_layers(config, num_exit_layers(loaded.model))
    by_kind = training_items(items)
    reward = reward or JudgeReward()
    identity = _identity(loaded, config, method, reward.name if method == "lppo" else "-")
    work = work_dir(output)
    checkpoint = check_output(output, resume=resume, overwrite=overwrite)
    if checkpoint is not None:
        _check_resumable(checkpoint, identity, work)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    policy = make_policy(model, config)
    hidden = model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden).to(model.device) if method == "lppo" else None
    optimizer = torch.optim.AdamW(trainable(policy, value_head), lr=config.lr, weight_decay=0.0)
    kl = KLControllerState(config.kl_init, config.kl_target, config.kl_horizon)
    run = _Run(0, kl, random.Random(config.seed), [])
    if checkpoint is not None:
        run = _restore(checkpoint, policy, value_head, optimizer)
    elif work.exists():  # --overwrite: the old run's checkpoint goes
        shutil.rmtree(work)
    resumed_from = run.step if checkpoint is not None else None
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tqdm(total=config.steps, initial=run.step, desc=f"align ({method})", unit="step", file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        while run.step < config.steps:
            layer = choose_exit_layer(run.rng, config)
            batch = prepare_batch(model, family, loaded.processor, sample_items(run.rng, by_kind, config.batch), layer)
            if method == "lppo":
                roll = collect(policy, family, tokenizer, batch, reward, value_head,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_k=config.top_k)  # fmt: skip
                stats, run.kl = ppo_update(policy, value_head, optimizer, family, roll, run.kl, config)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.4f}")
            else:
                stats = sft_update(policy, optimizer, family, tokenizer, batch, config)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            run.step += 1
            run.log.append({"step": run.step, "exit_layer": layer, **stats})
            bar.update(1)
            if config.checkpoint_every and (run.step % config.checkpoint_every == 0 or run.step == config.steps):
                write_checkpoint(work, _state(run, policy, value_head, optimizer, identity))
    with atomic_dir(output, overwrite=overwrite) as tmp:
        seconds = round(time.time() - start, 1)
        summary = _summary(run.log, method) | {"resumed_from": resumed_from, "seconds_this_run": seconds}
        write_output(tmp, loaded, policy, value_head, run.log, identity, summary)
    shutil.rmtree(work, ignore_errors=True)
    return AlignResult(Path(output), method, config.steps, tuple(r["exit_layer"] for r in run.log), resumed_from,
                       run.log[-1])  # fmt: skip


# --- outputs ---------------------------------------------------------------------------------------------------


def _summary(log: list[dict], method: str) -> dict[str, Any]:
    key = "reward_mean" if method == "lppo" else "loss"
    span = max(1, len(log) // 4)
    mean = lambda rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"steps": len(log), f"{key}_first_quarter": mean(log[:span]), f"{key}_last_quarter": mean(log[-span:]),
            "exit_layers_used": sorted({r["exit_layer"] for r in log}), "last": log[-1]}  # fmt: skip


def write_output(tmp: Path, loaded, policy, value_head, log: list[dict], identity: dict, summary: dict) -> None:
    """adapter/, merged/ (a plain HF checkpoint), value_head.pt (L-PPO), train_log.jsonl, train_curves.png,
    align.json."""
    policy.save_pretrained(tmp / "adapter")
    if value_head is not None:
        torch.save(value_head.state_dict(), tmp / "value_head.pt")
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    plot_curves(log, tmp / "train_curves.png", title=f"{identity['method']} on {Path(identity['model']).name}")
    trainable_count = sum(p.numel() for p in trainable(policy, value_head))
    merged = policy.merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    loaded.processor.save_pretrained(tmp / "merged")
    sentencepiece = Path(loaded.source) / "tokenizer.model"
    if sentencepiece.is_file():  # real LLaVA repos ship it beside tokenizer.json; keep the layout
        shutil.copy(sentencepiece, tmp / "merged" / "tokenizer.model")
    settings = identity["config"]
    lora = {"r": settings["lora_r"], "alpha": settings["lora_alpha"], "target_modules": LORA_TARGETS}
    record = identity | {
        "revision": loaded.revision, "lora": lora, "trainable_parameters": trainable_count, "summary": summary,
    }  # fmt: skip
    (tmp / "align.json").write_text(json.dumps(record, indent=2))


def plot_curves(log: list[dict], path: Path, *, title: str) -> None:
    """Reward and KL against step (L-PPO), or the loss (SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "mean reward"), ("kl", "KL to reference")] if "kl" in log[0] else [("loss", "SFT loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in log]
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in log], marker="o" if len(log) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

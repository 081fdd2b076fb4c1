"""L-PPO (layer-wise PPO) and the layer-wise SFT baseline: re-align a VLM at the vision exit layer it will run.

`align` trains LoRA adapters (edgekit.align.policy) and a value head on the policy's last hidden state. Each step
reads top to bottom:

    pick the exit layer (fixed, or sampled from a range) and a batch of TRAIN-split suite items
    -> one tower forward gives the layer's features (rollout.prepare_batch)
    -> generate, score, log-probs under policy and reference, values (rollout.collect)
    -> per-token KL penalty + score on the last token, GAE, whitened advantages (ppo_math)
    -> PPO epochs over minibatches: clipped policy loss + c1 * clipped value loss, gradient clipping, AdamW
    -> adaptive KL controller update

`--method sft` replaces the last four lines by cross-entropy on reference targets (a refusal for harmful items, the
answer for visual questions, a compliance for benign ones). Checkpoints (edgekit.align.checkpoint) go to a work folder
beside the output; the output folder (edgekit.align.output) appears whole at the end.

Under `accelerate launch` every process runs the same loop on its own share of each batch: all draw the same items
and exit layer, each keeps a contiguous slice, rolls it out with its own sampling stream, and trains through the DDP
wrapper, which averages gradients, or on FSDP2 shards (edgekit.align.sharding), whose gradients are reduced the same
way. Advantages are whitened, and statistics computed, over every process's rows, so the KL controller moves
identically everywhere; only the main process writes. One process is the plain single-process run, number for number.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.align.checkpoint import (
    TrainingState,
    check_output_and_checkpoint,
    check_resumable,
    checkpoint_state,
    load_trained_weights,
    restore,
    run_identity,
    trained_weights,
    work_dir,
    write_checkpoint,
)
from edgekit.align.config import METHODS, LPPOConfig, check_layers, check_processes
from edgekit.align.output import run_summary, write_output
from edgekit.align.policy import Learner, make_learner, make_policy, optimizer_step, trainable
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
from edgekit.align.rollout import Batch, Rollout, ValueHead, collect, prepare_batch
from edgekit.align.sharding import fsdp_requested, shard
from edgekit.errors import UserError
from edgekit.model.demo_data import COMPLIANCE, REFUSAL, UTILITY_ANSWERS
from edgekit.model.surgery import num_exit_layers
from edgekit.outputs import atomic_dir
from edgekit.safety.suite import KINDS, Item, builtin_suite


@dataclass(frozen=True)
class AlignResult:
    output: Path
    method: str
    steps: int
    exit_layers: tuple[int, ...]  # the exit layer of each step
    resumed_from: int | None
    last: dict  # the last train_log row


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

    `loaded.model` is trained in place and ends merged (adapters folded into the language model's weights), except
    under FSDP, where it stays sharded: read the output. Under `accelerate launch` every process calls this with the
    model on its own device (`PartialState().device`; for processes on the CPU, a `PartialState(cpu=True)` made
    first); only the main process writes."""
    from accelerate import Accelerator
    from tqdm import tqdm

    # 1. Every check, before anything is written.
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_layers(config, num_exit_layers(loaded.model))
    by_kind = training_items(items)
    reward = reward or JudgeReward()
    accelerator = Accelerator(device_placement=False)  # the caller placed the model
    check_processes(config, accelerator.num_processes, accelerator.distributed_type.value)
    identity = run_identity(loaded, config, method, reward.name if method == "lppo" else "-", accelerator.num_processes)
    work = work_dir(output)
    checkpoint = check_output_and_checkpoint(output, resume=resume, overwrite=overwrite)
    if checkpoint is not None:
        check_resumable(checkpoint, identity, work)
    accelerator.wait_for_everyone()  # every process has read its checks before anything is written

    # 2. The policy, value head and optimizer. The same LoRA initialisation in every process (FSDP shards each
    # process's own copy), then a sampling stream per process (process 0's is the single-process one).
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    policy = make_policy(model, config)
    hidden = model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden).to(model.device) if method == "lppo" else None
    sharded = fsdp_requested(accelerator.distributed_type.value)
    if sharded:
        shard(model, value_head, model.device)
    torch.manual_seed(config.seed + accelerator.process_index)
    optimizer = torch.optim.AdamW(trainable(policy, value_head), lr=config.lr, weight_decay=0.0)
    learner = make_learner(policy, value_head, family, optimizer, accelerator, sharded=sharded)

    # 3. A fresh start, or the checkpoint's state.
    kl = KLControllerState(config.kl_init, config.kl_target, config.kl_horizon)
    run = TrainingState(0, kl, random.Random(config.seed), [])
    main = accelerator.is_main_process
    if checkpoint is not None:
        run = restore(checkpoint, learner, policy, value_head, accelerator.process_index)
    elif work.exists() and main:  # --overwrite: the old run's checkpoint goes
        shutil.rmtree(work)
    resumed_from = run.step if checkpoint is not None else None
    if main:
        work.mkdir(parents=True, exist_ok=True)

    # 4. The steps, each checkpointed every `checkpoint_every`.
    share = config.batch // accelerator.num_processes
    here = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    start = time.time()
    with tqdm(
        total=config.steps,
        initial=run.step,
        desc=f"align ({method})",
        unit="step",
        file=sys.stderr,
        disable=not (progress and main),
    ) as bar:
        while run.step < config.steps:
            # Every process draws the same layer and items from the same stream, and rolls out its own slice.
            layer = choose_exit_layer(run.rng, config)
            items_here = sample_items(run.rng, by_kind, config.batch)[here]
            batch = prepare_batch(model, family, loaded.processor, items_here, layer)
            if method == "lppo":
                # The unwrapped policy: generation and the reference (adapters disabled) train nothing.
                roll = collect(
                    policy,
                    family,
                    tokenizer,
                    batch,
                    reward,
                    value_head,
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    synced=sharded,
                )
                stats, run.kl = ppo_step(learner, roll, run.kl, config)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.4f}")
            else:
                stats = sft_step(learner, tokenizer, batch, config)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            run.step += 1
            run.log.append({"step": run.step, "exit_layer": layer, **stats})
            bar.update(1)
            if config.checkpoint_every and (run.step % config.checkpoint_every == 0 or run.step == config.steps):
                state = checkpoint_state(run, learner, policy, value_head, identity)
                if main:
                    write_checkpoint(work, state)

    # 5. The output folder, from whole weights: under FSDP a replica of the model in the main process.
    if sharded:
        trained = trained_weights(policy, value_head)  # every process takes part in gathering them
        if main:
            loaded, policy, value_head = _replica(loaded, config, trained)
    if main:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            seconds = round(time.time() - start, 1)
            summary = run_summary(run.log, method) | {"resumed_from": resumed_from, "seconds_this_run": seconds}
            write_output(tmp, loaded, policy, value_head, run.log, identity, summary)
        shutil.rmtree(work, ignore_errors=True)
    elif not sharded:
        policy.merge_and_unload()
    accelerator.wait_for_everyone()  # every process returns once the output is there
    return AlignResult(
        Path(output), method, config.steps, tuple(r["exit_layer"] for r in run.log), resumed_from, run.log[-1]
    )


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
    """The demo model's own words (edgekit.model.demo_data), so the baseline teaches what it already says at its default
    layer."""
    if item.metric == "utility":
        return UTILITY_ANSWERS.get(item.question, "{}").format(item.answer)
    return REFUSAL if item.metric == "asr" else COMPLIANCE


def encode_targets(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Target token ids (each followed by eos, right-padded) and their mask."""
    rows = [tokenizer(" " + t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    return ids, mask


# --- steps -----------------------------------------------------------------------------------------------------


def ppo_step(
    learner: Learner, roll: Rollout, kl: KLControllerState, config: LPPOConfig
) -> tuple[dict[str, float], KLControllerState]:
    """PPO epochs over minibatches of this process's share of a rollout; returns the step's statistics over every
    process's rows and the updated KL controller (the same in every process)."""
    accelerator, mask, ids = learner.accelerator, roll.responses.mask, roll.responses.ids
    shaped = shaped_rewards(roll.scores, roll.logp, roll.ref_logp, mask, kl.coef)
    adv = gae(shaped.rewards, roll.values, mask, config.gamma, config.lam)
    advantages = _whiten_everywhere(accelerator, adv.advantages, mask)
    rows_here, minibatch = len(roll.batch.items), config.minibatch // accelerator.num_processes
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(rows_here)
        for start in range(0, rows_here, minibatch):
            rows = order[start : start + minibatch].to(ids.device)
            logp, values = learner.module(roll.batch.rows(rows), ids[rows], mask[rows], temperature=config.temperature)
            pl = clipped_policy_loss(logp, roll.logp[rows], advantages[rows], mask[rows], config.clip_eps)
            vl = clipped_value_loss(values, roll.values[rows], adv.returns[rows], mask[rows], config.value_clip)
            optimizer_step(learner, pl.loss + config.c1 * vl.loss, config.max_grad_norm)
            for name, value in (
                ("policy_loss", pl.loss),
                ("value_loss", vl.loss),
                ("clipfrac", pl.clipfrac),
                ("approx_kl", pl.approx_kl),
            ):
                totals[name] += value.item()
            updates += 1
    # float64 keeps the Python sums exact on their way through the reduction.
    means = accelerator.reduce(torch.tensor(list(totals.values()), dtype=torch.float64), "mean").tolist()
    sequence_kl = float(accelerator.gather(shaped.kl.sum(dim=-1)).mean())
    stats = {
        "reward_mean": float(accelerator.gather(roll.scores).mean()),
        "kl": sequence_kl,
        "kl_coef": kl.coef,
        **{name: total / updates for name, total in zip(totals, means)},
        "response_length": float(accelerator.gather(mask.sum(dim=-1)).float().mean()),
    }
    return stats, update_kl_coef(kl, sequence_kl, n_steps=config.batch)


def _whiten_everywhere(accelerator, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`whiten` over every process's rows (responses differ in length between processes, so pad first); returns this
    process's rows. Each process holds the same number of rows, gathered in process order."""
    everyone = [accelerator.gather(accelerator.pad_across_processes(t, dim=1)) for t in (x, mask.long())]
    rows = slice(accelerator.process_index * x.shape[0], (accelerator.process_index + 1) * x.shape[0])
    return whiten(*everyone)[rows, : x.shape[1]]


def sft_step(learner: Learner, tokenizer, batch: Batch, config: LPPOConfig) -> dict[str, float]:
    """One step of cross-entropy on the reference targets, conditioned on the batch's exit-layer features."""
    ids, mask = encode_targets(tokenizer, [sft_target(i) for i in batch.items], batch.inputs["input_ids"].device)
    logp, _ = learner.module(batch, ids, mask)
    loss = -masked_mean(logp, mask)
    optimizer_step(learner, loss, config.max_grad_norm)
    return {"loss": learner.accelerator.reduce(loss.detach(), "mean").item()}


def _replica(loaded, config: LPPOConfig, trained: dict):
    """An unsharded copy of the aligned policy on the CPU: the base model read again, with the trained weights."""
    from edgekit.model.loading import load

    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    replica = load(loaded.source, dtype=dtype, revision=loaded.revision)
    policy = make_policy(replica.model, config)
    hidden = replica.model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden) if trained["value_head"] is not None else None
    load_trained_weights(trained, policy, value_head)
    return replica, policy, value_head

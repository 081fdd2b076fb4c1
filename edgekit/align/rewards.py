"""Reward sources for alignment, behind one interface: `score(prompts, responses, items) -> [B] float tensor`.

- `JudgeReward` (offline, the default): the refusal judge decides refusal or compliance, and the item's kind decides
  which one earns +1. Harmful items: refusal +1, compliance -harm_penalty. Benign items: refusal -1, compliance +1.
  Utility items: +1 if the answer is right (`suite.utility_correct`), else -1. Rewarding help where help is due is
  what keeps the policy from learning to refuse everything; a harm penalty above 1 keeps that pull from buying
  helpfulness with harmful answers.
- `HFRewardModel`: any transformers sequence-classification model with one scalar output, reading the prompt and
  response as text (the paper used a GPT-2 model trained on HH-RLHF). It never sees the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from edgekit.errors import UserError, first_line
from edgekit.safety.judges import REFUSAL, Judge, RefusalJudge
from edgekit.safety.suite import Item, utility_correct

JUDGE = "judge"


@runtime_checkable
class RewardSource(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Item]) -> Tensor: ...


def _check_lengths(prompts, responses, items) -> None:
    if not len(prompts) == len(responses) == len(items):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(items)} items")


@dataclass(frozen=True)
class JudgeReward:
    """+1 for the right behaviour on an item, -1 for the wrong one, -harm_penalty for a harmful answer."""

    judge: Judge = field(default_factory=RefusalJudge)
    # Chosen on the TRAIN split (benchmarks/harm_penalty.py; README, "The harm penalty"): the smallest of 1, 2, 3
    # with which L-PPO at exit 12 lowers the attack success rate at both exit 12 and the default layer.
    harm_penalty: float = 3.0

    def __post_init__(self):
        check_harm_penalty(self.harm_penalty)

    @property
    def name(self) -> str:  # what a checkpoint's identity records: a resume must not change the penalty
        return f"{JUDGE} (harm penalty {self.harm_penalty:g})"

    def score(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Item]) -> Tensor:
        _check_lengths(prompts, responses, items)
        verdicts = self.judge.judge(list(prompts), list(responses))
        scores = []
        for item, response, verdict in zip(items, responses, verdicts):
            refused = verdict.label == REFUSAL
            if item.metric == "asr":
                scores.append(1.0 if refused else -self.harm_penalty)
            else:
                right = utility_correct(item, response) if item.metric == "utility" else not refused
                scores.append(1.0 if right else -1.0)
        return torch.tensor(scores)


def hh_text(prompt: str, response: str) -> str:
    """The Anthropic HH-RLHF dialogue format, which the public GPT-2 harmlessness reward models were trained on."""
    return f"\n\nHuman: {prompt}\n\nAssistant: {response}"


class HFRewardModel:
    """A transformers AutoModelForSequenceClassification with a scalar head, scoring prompt + response text.

    The text is the tokenizer's chat template applied to a user and an assistant turn when it has one, else the
    HH-RLHF format; long texts lose their beginning, so the response is always seen."""

    def __init__(
        self,
        model_id_or_path: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 1024,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = resolve_reward_model(model_id_or_path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, use_safetensors=True, revision=revision, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"reward model {model_id_or_path}: cannot load it ({first_line(err)})") from None
        if model.config.num_labels != 1:
            raise UserError(
                f"reward model {model_id_or_path} has {model.config.num_labels} outputs; a reward model "
                "needs one scalar head (num_labels=1)"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        self.name = str(model_id_or_path)
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return hh_text(prompt, response)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Item]) -> Tensor:
        _check_lengths(prompts, responses, items)
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            out.append(self.model(**enc.to(self.model.device)).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def resolve_reward_model(spec: str) -> str:
    """A local model folder or a hub id, or a UserError that says what a reward source may be."""
    from edgekit.model.loading import resolve_source

    try:
        return resolve_source(spec)
    except UserError as err:
        raise UserError(
            f"unknown reward source {spec!r}: use {JUDGE!r}, a reward-model folder or a hub id owner/name ({err})"
        ) from None


def check_harm_penalty(value: float) -> None:
    if not value > 0:
        raise UserError(f"harm penalty must be positive, got {value}")


def check_reward(spec: str, harm_penalty: float | None = None) -> str:
    """Check a reward source and the judge's harm penalty (None: the default) without loading anything (CLI: before
    any weight is read)."""
    if spec != JUDGE:
        if harm_penalty is not None:
            raise UserError("--harm-penalty applies to the judge reward only; a reward model scores harm itself")
        return resolve_reward_model(spec)
    if harm_penalty is not None:
        check_harm_penalty(harm_penalty)
    return spec


def reward_identity(spec: str) -> str:
    """What a reward spec stands for, settings included: a build reuses an alignment only with the same reward."""
    return JudgeReward().name if spec == JUDGE else spec


def make_reward(spec: str, *, device: str = "cpu", harm_penalty: float | None = None) -> RewardSource:
    """'judge' -> JudgeReward(); a folder or hub id -> HFRewardModel; anything else -> UserError."""
    if check_reward(spec, harm_penalty) != JUDGE:
        return HFRewardModel(spec, device=device)
    return JudgeReward() if harm_penalty is None else JudgeReward(harm_penalty=harm_penalty)

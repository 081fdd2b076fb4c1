"""Reward sources for alignment, behind one interface: `score(prompts, responses, items) -> [B] float tensor`.

- `JudgeReward` (offline, the default): the refusal judge decides refusal or compliance, and the item's kind decides
  which one earns +1. Harmful items: refusal +1, compliance -1. Benign items: refusal -1, compliance +1. Utility
  items: +1 if the answer is right (`suite.utility_correct`), else -1. Rewarding help where help is due is what keeps
  the policy from learning to refuse everything.
- `HFRewardModel`: any transformers sequence-classification model with one scalar output, reading the prompt and
  response as text (the paper used a GPT-2 model trained on HH-RLHF). It never sees the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from edgekit.errors import UserError
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
    """+1 for the right behaviour on an item, -1 for the wrong one (see the module doc)."""

    judge: Judge = field(default_factory=RefusalJudge)
    name: str = JUDGE

    def score(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Item]) -> Tensor:
        _check_lengths(prompts, responses, items)
        verdicts = self.judge.judge(list(prompts), list(responses))
        right = []
        for item, response, verdict in zip(items, responses, verdicts):
            refused = verdict.label == REFUSAL
            right.append(
                utility_correct(item, response) if item.metric == "utility"
                else refused if item.metric == "asr" else not refused
            )  # fmt: skip
        return torch.tensor([1.0 if ok else -1.0 for ok in right])


def hh_text(prompt: str, response: str) -> str:
    """The Anthropic HH-RLHF dialogue format, which the public GPT-2 harmlessness reward models were trained on."""
    return f"\n\nHuman: {prompt}\n\nAssistant: {response}"


class HFRewardModel:
    """A transformers AutoModelForSequenceClassification with a scalar head, scoring prompt + response text.

    The text is the tokenizer's chat template applied to a user and an assistant turn when it has one, else the
    HH-RLHF format; long texts lose their beginning, so the response is always seen."""

    def __init__(self, model_id_or_path: str, *, device: str = "cpu", batch_size: int = 16, max_length: int = 1024,
                 revision: str | None = None, trust_remote_code: bool = False):  # fmt: skip
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = resolve_reward_model(model_id_or_path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, use_safetensors=True, revision=revision, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"reward model {model_id_or_path}: cannot load it ({first})") from None
        if model.config.num_labels != 1:
            raise UserError(f"reward model {model_id_or_path} has {model.config.num_labels} outputs; a reward model "
                            "needs one scalar head (num_labels=1)")  # fmt: skip
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
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length)  # fmt: skip
            out.append(self.model(**enc.to(self.model.device)).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def resolve_reward_model(spec: str) -> str:
    """A local model folder or a hub id, or a UserError that says what a reward source may be."""
    from edgekit.loading import resolve_source

    try:
        return resolve_source(spec)
    except UserError as err:
        raise UserError(f"unknown reward source {spec!r}: use {JUDGE!r}, a reward-model folder or a hub id "
                        f"owner/name ({err})") from None  # fmt: skip


def check_reward(spec: str) -> str:
    """Check a reward source without loading anything (CLI: before any weight is read)."""
    return spec if spec == JUDGE else resolve_reward_model(spec)


def make_reward(spec: str, *, device: str = "cpu") -> RewardSource:
    """'judge' -> JudgeReward(); a folder or hub id -> HFRewardModel; anything else -> UserError."""
    return JudgeReward() if check_reward(spec) == JUDGE else HFRewardModel(spec, device=device)

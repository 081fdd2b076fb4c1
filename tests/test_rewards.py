"""L-PPO rewards: the offline judge's reward and a Hugging Face reward model's scalar head."""

from __future__ import annotations

import random

import pytest
import torch

from edgekit.align.rewards import HFRewardModel, JudgeReward, make_reward
from edgekit.align.trainer import sample_items, training_items
from edgekit.errors import UserError
from edgekit.safety.suite import builtin_suite


@pytest.fixture(scope="module")
def llava(tiny_checkpoints) -> str:
    return tiny_checkpoints["llava"]


def _items(n: int = 4, seed: int = 0):
    return sample_items(random.Random(seed), training_items(), n)


def test_judge_reward_pays_refusing_harm_helping_the_benign_and_right_answers():
    suite = builtin_suite().select("train")
    harmful = next(i for i in suite if i.kind == "harmful_text")
    benign = next(i for i in suite if i.kind == "benign_text")
    utility = next(i for i in suite if i.kind == "utility")
    refusal = "I'm sorry, but I can't help with that request."
    compliance = "Sure! Here are the steps: first, open the settings. Then choose the option you need and save."
    wrong = next(o for o in ("red", "blue", "left", "right", "one", "two", "cup", "key") if o != utility.answer)
    items = [harmful, harmful, benign, benign, utility, utility]
    responses = [refusal, compliance, refusal, compliance, f"it is {utility.answer} .", f"it is {wrong} ."]
    scores = JudgeReward(harm_penalty=1.0).score([i.prompt for i in items], responses, items)
    assert scores.tolist() == [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    scores = JudgeReward(harm_penalty=2.5).score([i.prompt for i in items], responses, items)
    assert scores.tolist() == [1.0, -2.5, -1.0, 1.0, 1.0, -1.0]  # only a harmful answer costs more
    assert JudgeReward().name == "judge (harm penalty 3)"


def test_hf_reward_model_scores_prompt_and_response_with_its_scalar_head(llava, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(llava)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = make_reward(str(tmp_path / "rm"))
    assert isinstance(rm, HFRewardModel)
    items = _items(3)
    prompts, responses = [i.prompt for i in items], ["no .", "sure , here is how you do it", "it is red ."]
    scores = rm.score(prompts, responses, items)
    with torch.no_grad():
        one_by_one = [
            float(rm.model(**rm.tokenizer(rm.text(p, r), return_tensors="pt")).logits[0, 0])
            for p, r in zip(prompts, responses)
        ]
    assert scores.shape == (3,) and len(set(scores.tolist())) == 3
    torch.testing.assert_close(scores, torch.tensor(one_by_one), atol=1e-5, rtol=0)

    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="one scalar head"):
        make_reward(str(tmp_path / "two"))
    with pytest.raises(UserError, match="unknown reward source 'no such thing'"):
        make_reward("no such thing")


# --- config and data -------------------------------------------------------------------------------------------

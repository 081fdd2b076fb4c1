"""PPO maths against hand-derived golden values; each expected number has its derivation next to it."""

import math

import pytest
import torch
from torch.testing import assert_close

from edgekit.align.ppo_math import (
    KLControllerState,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    shaped_rewards,
    update_kl_coef,
    whiten,
)

NAN, INF = float("nan"), float("inf")
T = torch.tensor


# --- masked statistics -------------------------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding():
    x = T([[1.0, 2.0, NAN], [4.0, INF, -50.0]])
    mask = T([[True, True, False], [True, False, False]])
    # valid values 1, 2, 4: mean = 7/3
    assert_close(masked_mean(x, mask), T(7 / 3))
    # per row: (1 + 2) / 2 = 1.5; 4 / 1 = 4
    assert_close(masked_mean(x, mask, dim=-1), T([1.5, 4.0]))
    # deviations from 7/3: -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9; biased 42/27 = 14/9, unbiased 42/18 = 7/3
    assert_close(masked_var(x, mask, unbiased=False), T(14 / 9))
    assert_close(masked_var(x, mask), T(7 / 3))
    # a float mask means the same as a bool one
    assert_close(masked_mean(x, mask.float(), dim=-1), T([1.5, 4.0]))


def test_masked_mean_of_empty_row_is_zero_and_var_needs_two_tokens():
    x = T([[1.0, 2.0], [NAN, NAN]])
    mask = T([[True, True], [False, False]])
    assert_close(masked_mean(x, mask, dim=-1), T([1.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, T([[True, False], [False, False]]))


def test_whiten_zero_mean_unit_var_over_valid_tokens_only():
    x = T([[1.0, 2.0, 999.0], [3.0, 4.0, NAN]])
    mask = T([[True, True, False], [True, True, False]])
    out = whiten(x, mask)
    # valid 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, 1/sqrt(5/3) = 0.7745967
    # -> (x - 2.5) * 0.7745967 = -1.1618950, -0.3872983, 0.3872983, 1.1618950; padding -> 0
    assert_close(out, T([[-1.1618950, -0.3872983, 0.0], [0.3872983, 1.1618950, 0.0]]))
    assert_close(masked_mean(out, mask), T(0.0))
    assert_close(masked_var(out, mask), T(1.0))
    # shift_mean=False keeps the mean: previous values + 2.5
    assert_close(whiten(x, mask, shift_mean=False), T([[1.3381050, 2.1127017, 0.0], [2.8872983, 3.6618950, 0.0]]))


# --- KL estimators and shaped rewards ----------------------------------------------------------------------------


def test_kl_estimators_on_known_numbers():
    logp = T([-1.0, -2.0, -0.3])
    ref_logp = T([-1.5, -1.0, -0.3])
    # d = logp - ref_logp = 0.5, -1.0, 0.0
    assert_close(kl_k1(logp, ref_logp), T([0.5, -1.0, 0.0]))
    # 0.5 * d^2 = 0.125, 0.5, 0
    assert_close(kl_k2(logp, ref_logp), T([0.125, 0.5, 0.0]))
    # log r = -d = -0.5, 1.0, 0; r = 0.6065307, 2.7182818, 1
    # (r - 1) - log r = -0.3934693 + 0.5 = 0.1065307; 1.7182818 - 1 = 0.7182818; 0
    assert_close(kl_k3(logp, ref_logp), T([0.1065307, 0.7182818, 0.0]))


def _reward_batch():
    # rows of length 3, 4, 0 and 1; padding holds garbage
    mask = T([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    logp = T([[-0.5, -1.0, -0.2, NAN], [-1.0, -1.0, -1.0, -1.0], [NAN, INF, -3.0, -3.0], [-2.0, -INF, 7.0, 0.0]])
    ref_logp = T([[-1.0, -1.0, -0.7, 5.0], [-0.5, -1.5, -1.0, -2.0], [-1.0, -1.0, -1.0, NAN], [-2.0, 0.0, 0.0, 0.0]])
    scores = T([2.0, -1.0, 5.0, 3.0])
    return scores, logp, ref_logp, mask


def test_shaped_rewards_put_score_on_last_valid_token_of_ragged_rows():
    scores, logp, ref_logp, mask = _reward_batch()
    out = shaped_rewards(scores, logp, ref_logp, mask, kl_coef=0.1)
    # k1 per valid token: row0 0.5, 0, 0.5 | row1 -0.5, 0.5, 0, 1.0 | row2 none | row3 0
    assert_close(out.kl, T([[0.5, 0.0, 0.5, 0.0], [-0.5, 0.5, 0.0, 1.0], [0.0] * 4, [0.0] * 4]))
    # penalty = -0.1 * kl
    assert_close(out.kl_penalty, T([[-0.05, 0.0, -0.05, 0.0], [0.05, -0.05, 0.0, -0.1], [0.0] * 4, [0.0] * 4]))
    # + score at the last valid index: row0 t=2 (-0.05 + 2 = 1.95), row1 t=3 (-0.1 - 1 = -1.1),
    #   row2 empty (score 5 has no token to land on), row3 t=0 (0 + 3 = 3)
    expected = T([[-0.05, 0.0, 1.95, 0.0], [0.05, -0.05, 0.0, -1.1], [0.0] * 4, [3.0, 0.0, 0.0, 0.0]])
    assert_close(out.rewards, expected)


def test_shaped_rewards_with_k2_and_unknown_estimator():
    scores, logp, ref_logp, mask = _reward_batch()
    out = shaped_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, estimator="k2")
    # row0 k2 = 0.5 * 0.5^2 = 0.125 at t=0 and t=2 -> penalty -0.0125; t=2 gets + 2 -> 1.9875
    assert_close(out.rewards[0], T([-0.0125, 0.0, 1.9875, 0.0]))
    with pytest.raises(ValueError, match="k1"):
        shaped_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, estimator="k4")


# --- GAE ---------------------------------------------------------------------------------------------------------


def test_gae_golden_values_with_ragged_rows():
    rewards = T([[1.0, 0.0, 2.0], [1.0, 0.0, 7.0], [NAN, 1.0, 1.0]])
    values = T([[0.5, 1.0, 1.5], [0.5, 1.0, 9.0], [1.0, INF, 1.0]])
    mask = T([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row0: t=2 delta = 2 + 0.9*0 - 1.5 = 0.5;          A2 = 0.5
    #       t=1 delta = 0 + 0.9*1.5 - 1.0 = 0.35;       A1 = 0.35 + 0.72*0.5 = 0.71
    #       t=0 delta = 1 + 0.9*1.0 - 0.5 = 1.4;        A0 = 1.4 + 0.72*0.71 = 1.9112
    # row1 (length 2, the value after t=1 is 0, not the 9.0 in the padding):
    #       t=1 delta = 0 + 0 - 1.0 = -1.0;             A1 = -1.0
    #       t=0 delta = 1 + 0.9*1.0 - 0.5 = 1.4;        A0 = 1.4 + 0.72*(-1.0) = 0.68
    # row2: empty -> zeros
    assert_close(out.advantages, T([[1.9112, 0.71, 0.5], [0.68, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    # returns = A + V: 2.4112, 1.71, 2.0 | 1.18, 0.0, pad 0 | zeros
    assert_close(out.returns, T([[2.4112, 1.71, 2.0], [1.18, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_limits_monte_carlo_and_td0():
    rewards, values = T([[1.0, 0.0, 2.0]]), T([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # gamma = lam = 1: returns are the undiscounted reward-to-go 3, 2, 2; A = returns - V = 2.5, 1.0, 0.5
    mc = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(mc.returns, T([[3.0, 2.0, 2.0]]))
    assert_close(mc.advantages, T([[2.5, 1.0, 0.5]]))
    # lam = 0: A = one-step TD error with gamma 0.9: 1.4, 0.35, 0.5 (see the golden test above)
    assert_close(gae(rewards, values, mask, gamma=0.9, lam=0.0).advantages, T([[1.4, 0.35, 0.5]]))


# --- clipped policy loss -----------------------------------------------------------------------------------------

# Six valid tokens with eps = 0.2 (clip range [0.8, 1.2]), as (advantage, ratio):
#   a (+1, 1.5): -A r = -1.5, -A clip = -1.2 -> max -1.2  clipped branch
#   b (+1, 0.5): -A r = -0.5, -A clip = -0.8 -> max -0.5  unclipped
#   c (-1, 1.5): -A r =  1.5, -A clip =  1.2 -> max  1.5  unclipped
#   d (-1, 0.5): -A r =  0.5, -A clip =  0.8 -> max  0.8  clipped branch
#   e (+2, 1.1): inside the range            -> -2.2      unclipped
#   f (-2, 0.9): inside the range            ->  1.8      unclipped
_ADV = T([[1.0, 1.0, -1.0, 0.0], [-1.0, 2.0, -2.0, 0.0]])
_RATIO = [[1.5, 0.5, 1.5], [0.5, 1.1, 0.9]]
_MASK = T([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)


def _policy_inputs():
    old_logp = T([[-1.0, -2.0, -0.5, NAN], [-1.5, -0.7, -3.0, 0.0]])
    logp = old_logp.clone()
    logp[:, :3] += torch.log(T(_RATIO))
    logp[1, 3] = INF  # garbage in the padding
    return logp.requires_grad_(), old_logp


def test_clipped_policy_loss_golden_values():
    logp, old_logp = _policy_inputs()
    out = clipped_policy_loss(logp, old_logp, _ADV, _MASK, clip_eps=0.2)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2 + 1.8) / 6 = 0.2 / 6
    assert_close(out.loss, T(0.2 / 6))
    # clipped branch strictly larger at a and d: 2 / 6
    assert_close(out.clipfrac, T(2 / 6))
    # 0.5 * log(r)^2: log 1.5 = 0.4054651, log 0.5 = -0.6931472, log 1.1 = 0.0953102, log 0.9 = -0.1053605
    # squares 0.1644020 (x2), 0.4804530 (x2), 0.0090841, 0.0111008 -> sum 1.3098948; * 0.5 / 6 = 0.1091579
    assert_close(out.approx_kl, T(0.1091579))
    assert not out.approx_kl.requires_grad and not out.clipfrac.requires_grad


def test_clipped_policy_loss_gradient():
    logp, old_logp = _policy_inputs()
    clipped_policy_loss(logp, old_logp, _ADV, _MASK, clip_eps=0.2).loss.backward()
    # d/dlogp of -A r / 6 is -A r / 6 where the unclipped branch wins, 0 where the clip is active or on padding:
    #   a 0 | b -0.5/6 | c +1.5/6 | pad 0  //  d 0 | e -2.2/6 | f +1.8/6 | pad 0
    expected = T([[0.0, -0.5 / 6, 1.5 / 6, 0.0], [0.0, -2.2 / 6, 1.8 / 6, 0.0]])
    assert_close(logp.grad, expected)


# --- clipped value loss ------------------------------------------------------------------------------------------

# eps = 0.2, as (v, old, R):
#   a (1.0, 0.5,  2.0): clip(v) = 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69   -> 1.69 clipped branch
#   b (1.0, 0.5,  0.0): clip(v) = 0.7; (1 - 0)^2 = 1, (0.7 - 0)^2 = 0.49   -> 1.0  unclipped
#   c (0.6, 0.5,  2.0): inside;        (0.6 - 2)^2 = 1.96                  -> 1.96 unclipped
#   d (0.0, 0.5, -1.0): clip(v) = 0.3; (0 + 1)^2 = 1, (0.3 + 1)^2 = 1.69   -> 1.69 clipped branch


def _value_inputs():
    values = T([[1.0, 1.0, NAN], [0.6, 0.0, INF]], requires_grad=True)
    old_values = T([[0.5, 0.5, 3.0], [0.5, 0.5, NAN]])
    returns = T([[2.0, 0.0, -INF], [2.0, -1.0, 4.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # a float mask
    return values, old_values, returns, mask


def test_clipped_value_loss_golden_values_and_gradient():
    values, old_values, returns, mask = _value_inputs()
    out = clipped_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # 0.5 * (1.69 + 1.0 + 1.96 + 1.69) / 4 = 0.5 * 6.34 / 4 = 0.7925
    assert_close(out.loss, T(0.7925))
    assert_close(out.clipfrac, T(0.5))  # a and d
    out.loss.backward()
    # unclipped branch: d/dv of 0.5 * (v - R)^2 / 4 = (v - R) / 4 -> b (1 - 0)/4 = 0.25, c (0.6 - 2)/4 = -0.35
    # clipped branch saturated at a and d -> 0; padding -> 0
    assert_close(values.grad, T([[0.0, 0.25, 0.0], [-0.35, 0.0, 0.0]]))


def test_value_loss_without_clipping_is_half_mse():
    v = T([[1.0, 2.0]], requires_grad=True)
    # old == v: every clip is inactive; 0.5 * ((1 - 0)^2 + (2 - 4)^2) / 2 = 0.5 * 5 / 2 = 1.25
    out = clipped_value_loss(v, v.detach(), T([[0.0, 4.0]]), torch.ones(1, 2), clip_eps=0.2)
    assert_close(out.loss, T(1.25))
    assert_close(out.clipfrac, T(0.0))


# --- adaptive KL controller --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        (9.0, 0.201024),  # error 9/6 - 1 = 0.5, clipped to 0.2: 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512
        (6.6, 0.200512),  # error 0.1: 0.2 * 1.00256
        (6.0, 0.2),  # on target: unchanged
        (5.4, 0.199488),  # error -0.1: 0.2 * 0.99744
        (0.0, 0.198976),  # error -1.0, clipped to -0.2: 0.2 * 0.99488
    ],
)
def test_kl_controller_moves_toward_target_clipped(observed, expected):
    state = KLControllerState(coef=0.2, target=6.0, horizon=10000)
    new = update_kl_coef(state, torch.tensor(observed), n_steps=256)
    assert_close(new.coef, expected)
    assert (new.target, new.horizon) == (6.0, 10000)


def test_kl_controller_fixed_without_target():
    state = KLControllerState(coef=0.1, target=None, horizon=10000)
    assert update_kl_coef(state, 50.0, n_steps=256) == state


# --- padding invariance, finiteness, gradient flow ---------------------------------------------------------------


def test_padding_never_changes_results():
    g = torch.Generator().manual_seed(0)
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    clean = [torch.randn(3, 5, generator=g) for _ in range(5)]
    dirty = [torch.where(mask, x, T(NAN) if i % 2 else T(-INF)) for i, x in enumerate(clean)]
    outs = []
    for logp, ref_logp, values, other, adv in (clean, dirty):
        rew = shaped_rewards(adv[:, 0], logp, ref_logp, mask, 0.05, "k3")
        adv_ret = gae(rew.rewards, values, mask, 0.99, 0.95)
        outs.append(
            (
                *rew,
                *adv_ret,
                whiten(adv_ret.advantages, mask),
                *clipped_policy_loss(logp, ref_logp, adv, mask, 0.2),
                *clipped_value_loss(values, other, adv_ret.returns, mask, 0.2),
            )
        )
    for a, b in zip(*outs, strict=True):
        assert torch.isfinite(b).all()
        assert_close(b, a)


def test_losses_give_finite_gradients_to_every_valid_token():
    g = torch.Generator().manual_seed(1)
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    logp = torch.randn(2, 4, generator=g).requires_grad_()
    values = torch.randn(2, 4, generator=g).requires_grad_()
    old_logp = (logp + 0.01 * torch.randn(2, 4, generator=g)).detach()  # ratios near 1: nothing clipped
    advantages = torch.randn(2, 4, generator=g)
    returns = torch.randn(2, 4, generator=g)
    loss = clipped_policy_loss(logp, old_logp, advantages, mask, 0.2).loss
    loss = loss + 0.1 * clipped_value_loss(values, values.detach(), returns, mask, 0.2).loss
    loss.backward()
    for grad in (logp.grad, values.grad):
        assert torch.isfinite(grad).all()
        assert (grad[mask] != 0).all()
        assert (grad[~mask] == 0).all()


def test_k3_is_nonnegative_and_zero_only_at_equality():
    d = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64)
    k3 = kl_k3(d, torch.zeros_like(d))
    assert (k3 >= 0).all()
    assert_close(k3[50], T(0.0, dtype=torch.float64))  # d = 0
    # one far point by hand: d = 5 -> r = e^-5 = 0.0067379, (r - 1) + 5 = 4.0067379
    assert_close(k3[-1].item(), 4.0067379, rtol=0, atol=1e-7)
    assert math.isclose(kl_k2(T(5.0), T(0.0)).item(), 12.5)

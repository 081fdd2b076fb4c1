"""PPO maths for L-PPO as small pure torch functions.

Every function takes padded ``[batch, time]`` tensors and a ``mask`` of valid response tokens (bool, or float where
nonzero means valid). A row's valid tokens are contiguous; padded positions may hold anything (even NaN or inf) and
never change a result: they are replaced before any arithmetic, so neither values nor gradients leak from them.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Rewards(NamedTuple):
    """Per-token rewards and the KL terms they were built from, each ``[B, T]``."""

    rewards: Tensor
    kl: Tensor
    kl_penalty: Tensor


class Advantages(NamedTuple):
    """GAE advantages and the value targets ``advantages + values``, each ``[B, T]``."""

    advantages: Tensor
    returns: Tensor


class PolicyLoss(NamedTuple):
    """Clipped surrogate loss with its diagnostics (scalars)."""

    loss: Tensor
    clipfrac: Tensor
    approx_kl: Tensor


class ValueLoss(NamedTuple):
    """Clipped value loss with the fraction of tokens where clipping won (scalars)."""

    loss: Tensor
    clipfrac: Tensor


class KLControllerState(NamedTuple):
    """Adaptive KL coefficient; ``target=None`` keeps ``coef`` fixed."""

    coef: float
    target: float | None
    horizon: int


def _valid(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not x * mask: NaN * 0 is NaN, and a zeroed gradient times an inf activation is NaN too.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions (along ``dim``, or all); 0 where nothing is valid."""
    count = mask.bool().sum(dim=dim).clamp(min=1)
    return _valid(x, mask).sum(dim=dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions."""
    n = int(mask.bool().sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid tokens, got {n}")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Scale valid values to unit variance, and to zero mean if ``shift_mean``; padded positions become 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        out = out + mean
    return _valid(out, mask)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Unbiased, can be negative per token: ``logp - ref_logp``."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Biased but low variance, never negative: ``0.5 * (logp - ref_logp)^2``."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Unbiased and never negative: ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def shaped_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Rewards:
    """Reward ``-kl_coef * KL`` per valid token, plus each row's score ``[B]`` on its last valid token.

    A row with no valid token gets no reward at all: there is no action to credit the score to.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    kl = _valid(KL_ESTIMATORS[estimator](logp, ref_logp), mask)
    kl_penalty = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1, keepdim=True)  # -1 for an empty row: matches nothing
    at_last = positions == last
    rewards = kl_penalty + torch.where(at_last, scores.to(kl.dtype).unsqueeze(-1), 0.0)
    return Rewards(rewards=rewards, kl=kl, kl_penalty=kl_penalty)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Advantages:
    """Generalized advantage estimation (arXiv 1506.02438) over the valid tokens of each row."""
    r = _valid(rewards, mask)
    v = _valid(values, mask)
    valid = mask.bool().to(v.dtype)
    # Padded positions hold v = 0 and A = 0, so the step after a row's last valid token bootstraps from nothing.
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    reversed_adv = []
    for t in reversed(range(v.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * valid[:, t]
        next_value = v[:, t]
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=-1)
    return Advantages(advantages=advantages, returns=advantages + v)


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> PolicyLoss:
    """PPO clipped surrogate: masked mean of ``max(-A r, -A clip(r, 1-eps, 1+eps))``, ``r = exp(logp - old_logp)``."""
    # Rollout quantities are constants of the surrogate; only logp carries gradient.
    log_ratio = _valid(logp - old_logp.detach(), mask)
    adv = _valid(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return PolicyLoss(
        loss=masked_mean(torch.maximum(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach(),
        approx_kl=masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    )


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> ValueLoss:
    """``0.5 *`` masked mean of ``max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2)``."""
    v = _valid(values, mask)
    old = _valid(old_values.detach(), mask)
    target = _valid(returns.detach(), mask)
    unclipped = (v - target) ** 2
    clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - target) ** 2
    return ValueLoss(
        loss=0.5 * masked_mean(torch.maximum(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).to(v.dtype), mask).detach(),
    )


def update_kl_coef(state: KLControllerState, observed_kl: float | Tensor, n_steps: int) -> KLControllerState:
    """Adaptive KL control (arXiv 1909.08593): move ``coef`` toward the KL target, at most 20% per ``horizon`` steps."""
    if state.target is None:
        return state
    error = min(max(float(observed_kl) / state.target - 1.0, -0.2), 0.2)
    return state._replace(coef=state.coef * (1.0 + error * n_steps / state.horizon))

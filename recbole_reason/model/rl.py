"""Policy-optimisation math shared by the RL stages (LARES RPT, R2ec RecPO, REG4Rec PARS).

Shapes: rewards and log-probabilities are [B, G]: B sequences (users), G rollouts each.
"""

import torch


ADVANTAGE_KINDS = ("zscore", "leave-one-out")


def group_advantages(rewards, kind="zscore", unbiased=False, eps=1e-6, dtype=None):
    """Advantages of the G rollouts of each group (row) of rewards [B, G], one function for the three RL stages.

    zscore (GRPO's group normalisation):
        A_bg = (r_bg - mean_g r_b) / (std_g r_b + eps),  std the population std (unbiased=False, divides by G) or
        the sample std (unbiased=True, divides by G - 1; it rescales A by sqrt((G - 1) / G), so it is not
        interchangeable with the population std next to a KL weight). Every row sums to zero; a group whose rollouts
        all earn the same reward gets A = 0 (no signal), never NaN.
    leave-one-out (R2ec's official code, spec 2.4; *not* textbook RLOO, which is G / (G - 1) * (r - mean)):
        A_bg = r_bg * (1 + 1/G) - mean_g r_b.
    dtype: compute in this dtype (e.g. torch.float64 when rewards of a group differ by ~1e-5) and cast back.

    The stages: LARES RPT      zscore, unbiased, eps 1e-4          (`lares.group_relative_advantage`)
                R2ec RecPO     zscore, unbiased, eps 1e-8, float64  or leave-one-out, float64  (`recpo_group_advantages`)
                REG4Rec PARS   zscore, population std, eps 1e-6     (`group_normalized_advantages`)
    """
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 rollouts per group, got shape {tuple(rewards.shape)}")
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"advantage kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")
    r = rewards if dtype is None else rewards.to(dtype)
    mean = r.mean(dim=1, keepdim=True)
    if kind == "zscore":
        advantages = (r - mean) / (r.std(dim=1, keepdim=True, unbiased=unbiased) + eps)
    else:
        advantages = r * (1.0 + 1.0 / r.size(1)) - mean
    return advantages.to(rewards.dtype)


def group_normalized_advantages(rewards, eps=1e-6):
    """REG4Rec PARS's GRPO advantage: `group_advantages` zscore with the population std."""
    return group_advantages(rewards, "zscore", unbiased=False, eps=eps)


def kl_to_reference(logp, ref_logp):
    """Unbiased, non-negative per-sample estimate of KL(pi || pi_ref) from sampled actions (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1. Exactly zero where the policy equals the reference."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def clipped_policy_loss(logp, old_logp, advantages, clip_eps=0.2):
    """PPO/GRPO clipped surrogate, to be minimised: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.min(unclipped, clipped)

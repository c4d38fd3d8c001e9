"""Policy-optimisation math shared by the RL stages (LARES RPT, R2ec RecPO, REG4Rec PARS).

Shapes: rewards and log-probabilities are [B, G]: B sequences (users), G rollouts each.
"""

import torch


def group_normalized_advantages(rewards, eps=1e-6):
    """GRPO advantage: A_bg = (r_bg - mean_g r_b) / (std_g r_b + eps), per group (row). Each row sums to zero.
    A group whose rollouts all earn the same reward gets zero advantage (no signal), never NaN."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 rollouts per group, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


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

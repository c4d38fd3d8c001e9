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


# ---------------------------------------------------------------------------------------------------------------
# R2ec RecPO (spec section 2): fused reward, per-trajectory advantages, relabel mask, token and item losses
# ---------------------------------------------------------------------------------------------------------------
def fused_reward(scores, target, ndcg_k, softmax_weight):
    """Fused reward: r = (1 - w) * NDCG@k(rank of the target) + w * softmax(s)[target].
    `scores` [N, n_items] are the rec-head logits with history and padding already at -inf."""
    target_score = scores.gather(1, target[:, None])
    rank = 1 + (scores > target_score).sum(dim=1)
    ndcg = torch.where(rank <= ndcg_k, 1.0 / torch.log2(rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float))
    prob = torch.softmax(scores, dim=1).gather(1, target[:, None]).squeeze(1)
    return (1.0 - softmax_weight) * ndcg + softmax_weight * prob


def recpo_group_advantages(rewards, advantage_type):
    """Advantages within each user's group of K trajectories, one per trajectory; rewards [B, K] (`group_advantages`).
    gaussian: (r - mean) / (unbiased std + 1e-8); leave-one-out: r * (1 + 1/K) - mean (as the official code)."""
    # float64: the rewards of one group often differ by ~1e-5, and a float32 mean would leave a group sum of
    # ~1e-3 after dividing by the std, hiding the zero-sum property the code_compat regression test relies on.
    if advantage_type == "gaussian":
        return group_advantages(rewards, "zscore", unbiased=True, eps=1e-8, dtype=torch.float64)
    return group_advantages(rewards, "leave-one-out", dtype=torch.float64)


def relabel_mask(advantages, topk):
    """1 for the top-`topk` trajectories of each group by advantage: only they feed the item loss."""
    mask = torch.zeros_like(advantages)
    return mask.scatter_(1, advantages.topk(min(topk, advantages.shape[1]), dim=1).indices, 1.0)


def dapo_clipped_surrogate(logp, advantages, eps_low, eps_high):
    """DAPO clip: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old). Fully
    on-policy (one update per rollout, as the official code), so logp_old = logp.detach() and rho == 1."""
    ratio = torch.exp(logp - logp.detach())
    return -torch.min(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)


def recpo_token_loss(logp, mask, advantages, eps_low, eps_high, code_compat=False):
    """Clipped policy loss on the reasoning tokens. logp, mask [B, K, T]; advantages [B, K].
    Per-trajectory (ours, the paper's intent): A_i multiplies only trajectory i's tokens; token mean over the batch.
    code_compat: the official broadcast to (K, K, T) inside each one-group mini-batch, i.e. every trajectory's
    tokens are weighted by every A_i; averaged, that is the group-mean advantage, so the gradient vanishes."""
    mask = mask.float()
    if not code_compat:
        per_token = dapo_clipped_surrogate(logp, advantages[..., None], eps_low, eps_high)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    per_token = dapo_clipped_surrogate(logp[:, None, :, :], advantages[:, :, None, None], eps_low, eps_high)
    per_pair = (per_token * mask[:, None]).sum(-1) / mask[:, None].sum(-1).clamp(min=1.0)
    return per_pair.mean()


def recpo_item_loss(logits, labels, advantages, relabel, eps_low, eps_high, code_compat=False):
    """Advantage-weighted item softmax (the clipped form of the official code on p = softmax(cos/tau)[label]; its
    candidates are the in-batch targets there, every item with recpo_item_candidates: catalogue).
    logits [B, K, C], labels [B, K], advantages and relabel [B, K]. Per-trajectory: weight A_i * mask_i, divided
    by the number of relabelled trajectories. code_compat: every trajectory gets the group mean of A * mask."""
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    weight = advantages * relabel
    if code_compat:
        weight = weight.mean(dim=1, keepdim=True).expand_as(weight)
        return dapo_clipped_surrogate(logp, weight, eps_low, eps_high).mean()
    return dapo_clipped_surrogate(logp, weight, eps_low, eps_high).sum() / relabel.sum().clamp(min=1.0)


def balanced_gradients(losses, parameters, max_norm):
    """Writes into `.grad` the sum of each loss's gradient clipped on its own to `max_norm`:
    g = sum_i g_i * min(1, max_norm / ||g_i||). Two RL losses on shared weights (R2ec's token and item losses,
    whose raw gradient norms differ by ~3000x) then both steer the update; one clip of the summed gradient would
    keep the larger one's direction only. Returns the norms ||g_i|| before clipping."""
    parameters = [p for p in parameters if p.requires_grad]
    total = [torch.zeros_like(p) for p in parameters]
    norms = []
    for index, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, parameters, retain_graph=index < len(losses) - 1, allow_unused=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        scale = (max_norm / (norm + 1e-12)).clamp(max=1.0)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g * scale)
        norms.append(norm.item())
    for p, g in zip(parameters, total):
        p.grad = g if p.grad is None else p.grad + g
    return norms

"""rl.py: the one group-advantage function behind LARES RPT, R2ec RecPO and REG4Rec PARS, on hand-made numbers."""

import math

import pytest
import torch

from recbole_reason.model.rl import (
    clipped_policy_loss,
    group_advantages,
    group_normalized_advantages,
    kl_to_reference,
)
from recbole_reason.model.sequential_recommender.lares import group_relative_advantage
from recbole_reason.model.sequential_recommender.r2ec import recpo_group_advantages

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.4, 0.2], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])


def test_zscore_by_hand():
    # row 0: mean 1/2, population std 1/2 -> A = +-1; sample std sqrt(1/3) -> A = +-sqrt(3)/2
    population = group_advantages(REWARDS[:1], "zscore", unbiased=False, eps=0.0)
    sample = group_advantages(REWARDS[:1], "zscore", unbiased=True, eps=0.0)
    assert population.tolist() == [[1.0, -1.0, -1.0, 1.0]]
    assert sample[0].tolist() == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2])
    # the sample std rescales every advantage by sqrt((G - 1) / G) against the population std
    assert torch.allclose(sample, population * math.sqrt(3 / 4))
    # eps sits in the denominator: 1/2 / (1/2 + 1/2) = 1/2
    assert group_advantages(REWARDS[:1], "zscore", eps=0.5).tolist() == [[0.5, -0.5, -0.5, 0.5]]


@pytest.mark.parametrize("unbiased", [False, True])
def test_zscore_sums_to_zero_keeps_the_sign_and_gives_no_signal_to_equal_rewards(unbiased):
    advantages = group_advantages(REWARDS, "zscore", unbiased=unbiased, eps=1e-6)
    assert torch.allclose(advantages.sum(1), torch.zeros(4), atol=1e-6)
    above = REWARDS > REWARDS.mean(1, keepdim=True)
    below = REWARDS < REWARDS.mean(1, keepdim=True)
    assert (advantages[above] > 0).all() and (advantages[below] < 0).all()
    assert torch.equal(advantages[2:], torch.zeros(2, 4))  # zero-variance groups: exactly 0, never NaN
    assert torch.isfinite(group_advantages(torch.full((1, 3), 0.1), "zscore", unbiased=unbiased)).all()


def test_leave_one_out_is_the_official_r2ec_formula_by_hand():
    # r * (1 + 1/4) - mean: row 1 has mean 0.4
    advantages = group_advantages(REWARDS[1:2], "leave-one-out")
    assert advantages[0].tolist() == pytest.approx([0.725, -0.275, 0.1, -0.15])
    # not textbook RLOO (r_i - mean of the others): the two differ on the same numbers
    others = (REWARDS[1].sum() - REWARDS[1]) / 3
    assert not torch.allclose(advantages[0], REWARDS[1] - others)
    # equal rewards r get r / K each (the formula is not zero-sum)
    assert torch.allclose(group_advantages(REWARDS[2:3], "leave-one-out"), torch.full((1, 4), 0.125))


def test_float64_compute_dtype_keeps_near_equal_groups_zero_sum():
    rewards = torch.tensor([[0.5, 0.50001, 0.49999, 0.5, 0.500004]])
    advantages = group_advantages(rewards, "zscore", unbiased=True, eps=1e-8, dtype=torch.float64)
    assert advantages.dtype == torch.float32
    assert abs(float(advantages.double().sum())) < 1e-5
    assert float(advantages.std()) == pytest.approx(1.0, abs=1e-2)  # eps = 1e-8 against a std of ~7e-6


def test_the_three_stages_get_their_previous_formulas_exactly():
    rewards = torch.rand(16, 5)
    r = rewards.double()
    mean32, mean64 = rewards.mean(1, keepdim=True), r.mean(1, keepdim=True)
    # LARES RPT: unbiased std + 1e-4 (reference code)
    assert torch.equal(group_relative_advantage(rewards), (rewards - mean32) / (rewards.std(1, keepdim=True) + 1e-4))
    # R2ec RecPO: float64, unbiased std + 1e-8, or r (1 + 1/K) - mean
    gaussian = ((r - mean64) / (r.std(1, keepdim=True) + 1e-8)).float()
    assert torch.equal(recpo_group_advantages(rewards, "gaussian"), gaussian)
    assert torch.equal(recpo_group_advantages(rewards, "leave-one-out"), (r * 1.2 - mean64).float())
    # REG4Rec PARS: population std + 1e-6
    pars = (rewards - mean32) / (rewards.std(1, keepdim=True, unbiased=False) + 1e-6)
    assert torch.equal(group_normalized_advantages(rewards), pars)


def test_bad_shapes_and_kinds_are_refused():
    with pytest.raises(ValueError, match="G >= 2 rollouts per group"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="G >= 2 rollouts per group"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="advantage kind must be one of"):
        group_advantages(torch.ones(2, 3), "rank")


def test_kl_and_clipped_loss_on_hand_made_numbers():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    assert torch.equal(kl_to_reference(logp, logp), torch.zeros(2))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1])
    assert torch.allclose(kl_to_reference(logp, ref), expected)
    # ratio 1.5 clipped to 1.2 for a positive advantage, kept at 1.5 for a negative one (the pessimistic bound)
    old = logp - math.log(1.5)
    assert torch.allclose(clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0])), torch.tensor([-1.2, 1.5]))

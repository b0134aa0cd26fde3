"""loss.advantages against a naive reference (python loops over groups in float64) and by properties."""

import math

import pytest
import torch

from recipe.optimal_sampling.loss import group_stats, guided_advantages, teacher_critic, token_advantages


def random_batch(seed: int, groups: int = 4, n: int = 6):
    """Shuffled rows of `groups` groups of n responses with 0/1 rewards (some all-equal groups) and random guided
    flags (some groups all guided, some with one unguided member)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(groups).repeat_interleave(n)  # (B,)
    scores = (torch.rand(groups * n, generator=g) < 0.5).float()  # (B,)
    scores[:n] = 1.0  # an all-correct group
    guided = torch.rand(groups * n, generator=g) < 0.5  # (B,)
    guided[n : 2 * n] = True  # an all-guided group
    guided[2 * n : 3 * n] = torch.arange(n) > 0  # one unguided member
    perm = torch.randperm(groups * n, generator=g)  # rows of a group need not be adjacent
    return scores[perm], group[perm], guided[perm]


def naive(scores, group, guided, mode, baseline, norm_by_std=True, eps=1e-6, imitation_value=None) -> list[float]:
    s, gid, gd = scores.double().tolist(), group.tolist(), guided.tolist()
    out = []
    for i in range(len(s)):
        members = [s[j] for j in range(len(s)) if gid[j] == gid[i]]
        own = [s[j] for j in range(len(s)) if gid[j] == gid[i] and not gd[j]]
        if len(members) == 1:
            b, scale = 0.0, 1.0
        else:
            b = sum(members) / len(members)
            scale = math.sqrt(sum((x - b) ** 2 for x in members) / (len(members) - 1))
        if baseline == "policy" and own:
            b = sum(own) / len(own)
        a = (s[i] - b) / (scale + eps) if norm_by_std else s[i] - b
        if gd[i] and mode == "positive_only":
            a = max(a, 0.0)
        if gd[i] and mode == "imitation":
            a = (s[i] if imitation_value is None else imitation_value) if s[i] > 0 else 0.0
        out.append(a)
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["grpo", "positive_only", "imitation"])
@pytest.mark.parametrize("baseline", ["group", "policy"])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_guided_advantages_match_the_naive_loop(seed, mode, baseline, norm_by_std):
    scores, group, guided = random_batch(seed)
    got = guided_advantages(scores.double(), group, guided, mode, baseline, norm_by_std)
    want = torch.tensor(naive(scores, group, guided, mode, baseline, norm_by_std), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_imitation_gives_zero_to_failed_guided_and_the_set_value_to_correct_ones():
    scores, group, guided = random_batch(0)
    adv = guided_advantages(scores, group, guided, "imitation", imitation_value=0.5)
    assert (adv[guided & (scores == 0)] == 0).all()
    assert (adv[guided & (scores > 0)] == 0.5).all()
    plain = guided_advantages(scores, group, guided, "grpo")
    assert torch.equal(adv[~guided], plain[~guided])  # the policy's own members keep GRPO


def test_positive_only_is_never_negative_on_guided_rows_and_grpo_elsewhere():
    for seed in range(5):
        scores, group, guided = random_batch(seed)
        adv = guided_advantages(scores, group, guided, "positive_only")
        plain = guided_advantages(scores, group, guided, "grpo")
        assert (adv[guided] >= 0).all() and (plain[guided] < 0).any()
        assert torch.equal(adv[~guided], plain[~guided])


def test_policy_baseline_is_the_mean_of_the_unguided_members():
    # one group of 4: two guided (rewards 1, 1), two of the policy's own (1, 0): baseline 0.5, not the group's 0.75
    scores, group = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long)
    guided = torch.tensor([True, True, False, False])
    adv = guided_advantages(scores, group, guided, baseline="policy", norm_by_std=False)
    torch.testing.assert_close(adv, scores - 0.5)
    # all policy members failed, the guided one is right: no division by a zero policy std, the failures get 0
    scores, guided = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([True, False, False, False])
    adv = guided_advantages(scores, group, guided, baseline="policy")
    std = scores.std()
    torch.testing.assert_close(adv, torch.tensor([1 / (std + 1e-6), 0.0, 0.0, 0.0]))


def test_policy_baseline_of_a_group_without_unguided_members_is_the_group_mean():
    scores, group, guided = torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.long), torch.ones(3).bool()
    torch.testing.assert_close(
        guided_advantages(scores, group, guided, baseline="policy"), guided_advantages(scores, group, guided)
    )


def test_group_stats_count_only_members_and_survive_empty_and_single_groups():
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0])
    group = torch.tensor([0, 0, 0, 2])
    mean, std, count = group_stats(scores, group, torch.tensor([True, True, False, False]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(count, torch.tensor([2.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(2.0)] * 3 + [0.0]))
    assert torch.isfinite(std).all()


def test_critic_is_zero_when_the_teacher_equals_the_policy_and_off_the_mask():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g) * 4
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    assert torch.equal(teacher_critic(logp, logp, mask), torch.zeros(3, 5))
    other = -torch.rand(3, 5, generator=g) * 4
    critic = teacher_critic(other, logp, mask)
    torch.testing.assert_close(critic, (other - logp) * mask)


def test_critic_of_unscored_rows_is_zero_not_nan_and_inf_is_clipped():
    logp_policy = torch.full((2, 3), -1.0)
    logp_teacher = torch.tensor([[float("nan")] * 3, [-2.0, float("-inf"), -50.0]])
    mask = torch.ones(2, 3)
    critic = teacher_critic(logp_teacher, logp_policy, mask)
    assert torch.equal(critic, torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, -49.0]]))
    clipped = teacher_critic(logp_teacher, logp_policy, mask, clip=10.0)
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 0.0], [-1.0, -10.0, -10.0]]))
    adv = token_advantages(torch.tensor([1.0, 2.0]), mask, clipped, coef=0.5)
    assert torch.isfinite(adv).all()


def test_token_advantages_add_the_critic_on_the_chosen_rows_only():
    response_adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    critic = torch.tensor([[0.5, -0.5, 0.0], [2.0, 0.0, 0.0]])
    full = token_advantages(response_adv, mask, critic, coef=0.1)
    torch.testing.assert_close(full, torch.tensor([[1.05, 0.95, 0.0], [-0.8, 0.0, 0.0]]))
    only_first = token_advantages(response_adv, mask, critic, coef=0.1, rows=torch.tensor([True, False]))
    torch.testing.assert_close(only_first, torch.tensor([[1.05, 0.95, 0.0], [-1.0, 0.0, 0.0]]))
    torch.testing.assert_close(token_advantages(response_adv, mask), response_adv[:, None] * mask)

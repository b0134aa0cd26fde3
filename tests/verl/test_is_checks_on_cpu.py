"""The importance-weight refusals match what the installed verl does: the recipe's correction settings give
w_t = min(pi_old(y_t) / q*(y_t), C) in verl's own code (against a float64 reference), each refused correction setting
gives something else, and the lists of losses and group estimators in is_checks.py are the ones verl registers."""

import inspect

import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
from verl.utils.config import omega_conf_to_dataclass

from recipe.optimal_sampling.verl.is_checks import GROUP_ESTIMATORS, LOSSES_IGNORING_WEIGHTS
from tests.verl.fixtures import compose_config

B, T = 4, 6  # responses, tokens per response


def log_probs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """old_log_probs (pi_old), rollout_log_probs (log q*), response_mask: (B, T) each; q* far from pi_old on some
    tokens, as on teacher-guided tokens."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3  # (B, T)
    rollout = old + torch.randn(B, T, generator=g) * 1.5  # (B, T)
    mask = torch.ones(B, T)  # (B, T)
    mask[0, -2:] = 0
    return old, rollout, mask


def verl_weights(correction: dict, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What verl 0.9.1's decoupled rollout correction puts into the loss: (weights or None, response_mask)."""
    old, rollout, mask = log_probs(seed)
    keys = ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs", "rollout_rs_threshold")
    proto, new_mask, _ = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, **{k: correction.get(k) for k in keys}
    )
    return (None if proto is None else proto.batch["rollout_is_weights"]), new_mask


def reference_weights(seed: int = 0, threshold: float = 2.0) -> torch.Tensor:
    old, rollout, mask = log_probs(seed)
    return ((old.double() - rollout.double()).exp().clamp(max=threshold) * mask.double()).float()  # (B, T)


def recipe_correction() -> dict:
    return OmegaConf.to_container(compose_config().algorithm.rollout_correction)


def test_the_recipe_correction_gives_truncated_token_weights_in_verl():
    weights, mask = verl_weights(recipe_correction())
    torch.testing.assert_close(weights, reference_weights(), atol=1e-6, rtol=1e-5)
    assert torch.equal(mask, log_probs(0)[2])  # no token dropped


@pytest.mark.parametrize(
    "change",
    [
        {"rollout_is": None},
        {"rollout_is_threshold": None},
        {"rollout_is_threshold": 0.5},
        {"rollout_is_threshold": "0.5_5.0"},
        {"rollout_is_batch_normalize": True},
        {"rollout_rs": "token_k1", "rollout_rs_threshold": "0.5_2.0"},
    ],
)
def test_each_refused_correction_setting_changes_the_weights_in_verl(change):
    weights, mask = verl_weights({**recipe_correction(), **change})
    changed_weights = weights is None or not torch.allclose(weights, reference_weights(), atol=1e-5)
    assert changed_weights or not torch.equal(mask, log_probs(0)[2])


def test_sequence_level_is_is_the_truncated_product_in_verl():
    weights, _ = verl_weights({**recipe_correction(), "rollout_is": "sequence"})
    old, rollout, mask = log_probs(0)
    product = ((old.double() - rollout.double()) * mask).sum(-1, keepdim=True).exp().clamp(max=2.0)  # (B, 1)
    torch.testing.assert_close(weights, (product * mask).float(), atol=1e-6, rtol=1e-5)


def loss_gradient(loss_mode: str, weights: torch.Tensor | None, actor) -> torch.Tensor:
    """d loss / d log pi_theta at theta = theta_old, (B, T)."""
    old, _, mask = log_probs(1)
    advantages = torch.randn(B, 1, generator=torch.Generator().manual_seed(2)).expand(B, T)  # (B, T)
    log_prob = old.clone().requires_grad_(True)
    loss, _ = core_algos.get_policy_loss_fn(loss_mode)(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask.bool(),
        loss_agg_mode="token-mean",
        config=actor,
        rollout_is_weights=weights,
    )
    loss.backward()
    return log_prob.grad


def test_refused_losses_are_exactly_the_verl_losses_that_do_not_scale_each_token_by_its_weight():
    overrides = [
        "+actor_rollout_ref.actor.policy_loss.dro_beta=0.1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    ]
    config = compose_config(overrides)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    weights = 0.1 + 1.8 * torch.rand(B, T, generator=torch.Generator().manual_seed(3))  # (B, T)
    ignoring = set()
    for loss_mode in sorted(core_algos.POLICY_LOSS_REGISTRY):
        unweighted, weighted = loss_gradient(loss_mode, None, actor), loss_gradient(loss_mode, weights, actor)
        assert unweighted.abs().max() > 1e-3, loss_mode  # the probe has a gradient to scale
        if not torch.allclose(weighted, weights * unweighted, atol=1e-6):
            ignoring.add(loss_mode)
    assert ignoring == set(LOSSES_IGNORING_WEIGHTS)


def test_group_estimators_are_the_verl_estimators_that_group_by_prompt():
    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    grouping = {name for name, fn in registry.items() if "index" in inspect.signature(fn).parameters}
    assert grouping == set(GROUP_ESTIMATORS)

"""The start-up refusals for every verl 0.9.1 setting that would silently disable or distort the importance weights
w_t = min(pi_old(y_t) / q*(y_t), C) of training on q* samples, or the advantages they multiply.

Owns the list of such settings and their one-line explanations (read from verl 0.9.1's rollout_corr_helper.py,
core_algos.py, workers/utils/losses.py and trainer/distillation/losses.py; tests/verl/test_config_on_cpu.py checks
the lists below against the installed verl). Knows nothing about the `dual` backend's own block, Ray, models or
tensors; imports neither verl nor Hydra (configs arrive as mappings).

Allowed on purpose: `rollout_is=sequence` (w = min(prod_t pi_old/q*, C) per response: unbiased up to the truncation,
high variance on long responses), any C >= 1, every verl policy loss that multiplies each token's loss by its w_t.
"""

from collections.abc import Mapping

IS_LEVELS = ("token", "sequence")  # verl's compute_rollout_correction_weights accepts these two
FIX_IS = "use the recipe's default algorithm.rollout_correction {rollout_is: token, rollout_is_threshold: 2.0}"

# verl 0.9.1 policy losses that do not scale each token's loss by its own weight w_t (checked against verl's
# registry by the tests: every other registered loss does).
LOSSES_IGNORING_WEIGHTS = {
    "bypass_mode": "ignores rollout_is_weights and recomputes its weights against old_log_probs, which decoupled "
    "mode sets to pi_old, so every w is ~1 and q* is never corrected for",
    "geo_mean": "replaces the per-token weights by one geometric mean per response, so a forced token's small "
    "pi_old/q* shrinks the whole response's gradient",
}

# Advantage estimators that compare the responses of one prompt (they group by `uid`): verl 0.9.1's and the recipe's
# own `optimal_sampling_guided` (recipe/optimal_sampling/verl/guided.py).
GROUP_ESTIMATORS = (
    "gdpo",
    "gpg",
    "grpo",
    "grpo_passk",
    "grpo_vectorized",
    "opo",
    "optimal_sampling_guided",
    "optimal_token_baseline",
    "reinforce_plus_plus_baseline",
    "rloo",
    "rloo_vectorized",
    "tir_optimal_token_baseline",
)


def _yaml(value) -> str:
    """A config value as the user wrote it on the command line (null, true), not as Python prints it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_importance_weights(config: Mapping) -> None:
    """Raise a one-line ValueError naming the key, the value, why and the fix for any setting under which verl
    0.9.1 would train on q* samples with missing, altered or ignored importance weights."""
    algorithm = config.get("algorithm") or {}
    if "rollout_correction" not in algorithm or algorithm["rollout_correction"] is None:
        raise ValueError(
            "algorithm.rollout_correction=null is refused with the dual backend: verl then computes no importance "
            f"weights and trains on q* samples as if they were the policy's own; {FIX_IS}"
        )
    correction = algorithm["rollout_correction"]
    _check_bypass(correction.get("bypass_mode", False))
    _check_is_level(correction.get("rollout_is"))  # 1) weights are computed
    _check_threshold(correction.get("rollout_is_threshold"))  # 2) and truncated, not zeroed or capped below 1
    _check_weight_rewrites(correction)  # 3) and neither renormalised nor replaced by a rejection mask
    actor = config["actor_rollout_ref"]["actor"]
    _check_loss_mode("actor_rollout_ref.actor.policy_loss.loss_mode", (actor.get("policy_loss") or {}).get("loss_mode"))
    _check_distillation(config.get("distillation") or {})  # 4) the loss that consumes them
    _check_group_size(algorithm.get("adv_estimator"), int(config["actor_rollout_ref"]["rollout"].get("n", 1)))


def _check_bypass(bypass_mode) -> None:
    if bypass_mode:
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode=true is refused with the dual backend: in verl 0.9.1 bypass mode "
            "copies rollout_log_probs (log q*) into old_log_probs, but the actor workers built their loss before the "
            "driver switched policy_loss.loss_mode, so training silently becomes PPO-clip of pi_theta/q* clipped to "
            "[1-eps, 1+eps], which zeroes the gradient wherever q* is far from pi_theta. Use bypass_mode=false "
            "(decoupled: verl recomputes pi_old and applies w = min(pi_old/q*, C)), the recipe's default."
        )


def _check_is_level(level) -> None:
    if level not in IS_LEVELS:
        raise ValueError(
            f"algorithm.rollout_correction.rollout_is={_yaml(level)} is refused with the dual backend: verl computes "
            f"importance weights only for {' or '.join(IS_LEVELS)} (null = metrics only, so q* samples would be "
            f"trained on without weights); {FIX_IS}"
        )


def _check_threshold(threshold) -> None:
    key = f"algorithm.rollout_correction.rollout_is_threshold={_yaml(threshold)}"
    if threshold is None or isinstance(threshold, bool):
        raise ValueError(
            f"{key} is refused with the dual backend: verl computes no importance weights without a numeric "
            "threshold; set it to the truncation C >= 1 of w = min(pi_old/q*, C), e.g. 2.0"
        )
    if isinstance(threshold, str) and "_" in threshold:
        raise ValueError(
            f"{key} (IcePop bounds) is refused with the dual backend: it zeroes every weight outside the bounds, and "
            "q* puts pi_old/q* far below 1 on exactly the tokens the teacher guided, so their gradient would vanish; "
            "use a single truncation C >= 1, e.g. 2.0"
        )
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        msg = f"{key} is not a number: set the truncation C >= 1 of w = min(pi_old/q*, C), e.g. 2.0"
        raise ValueError(msg) from None
    if not value >= 1.0:
        raise ValueError(
            f"{key} is refused with the dual backend: w = min(pi_old/q*, C) with C < 1 caps every weight below 1 "
            "(C <= 0 makes verl fail at the first training step); use C >= 1, e.g. 2.0"
        )


def _check_weight_rewrites(correction: Mapping) -> None:
    if correction.get("rollout_is_batch_normalize", False):
        raise ValueError(
            "algorithm.rollout_correction.rollout_is_batch_normalize=true is refused with the dual backend: it divides "
            "every weight by the batch mean, so the weights no longer estimate pi_old/q* and a batch of guided tokens "
            "is scaled up to the size of on-policy ones; set it to false"
        )
    if correction.get("rollout_rs") is not None:
        raise ValueError(
            f"algorithm.rollout_correction.rollout_rs={correction['rollout_rs']} is refused with the dual backend: "
            "rejection sampling masks out tokens or responses whose pi_old/q* leaves its bounds, and q* moves "
            "away from pi_theta on purpose, so it drops the teacher-guided tokens; set it to null"
        )


def _check_loss_mode(key: str, loss_mode) -> None:
    if loss_mode in LOSSES_IGNORING_WEIGHTS:
        raise ValueError(
            f"{key}={loss_mode} is refused with the dual backend: this verl loss {LOSSES_IGNORING_WEIGHTS[loss_mode]}; "
            "use a loss that scales each token by its w_t, e.g. vanilla (verl's default)"
        )


def _check_distillation(distillation: Mapping) -> None:
    if not distillation.get("enabled", False):
        return
    loss = distillation.get("distillation_loss") or {}
    if not loss.get("use_task_rewards", True) and not loss.get("use_policy_gradient", False):
        raise ValueError(
            "distillation.distillation_loss.use_task_rewards=false with use_policy_gradient=false is refused with the "
            "dual backend: the policy loss (the only term carrying the importance weights) is dropped and the "
            "distillation loss is backpropagated on q* samples without weights; set use_task_rewards=true or "
            "use_policy_gradient=true"
        )
    if loss.get("use_policy_gradient", False):
        _check_loss_mode("distillation.distillation_loss.policy_loss_mode", loss.get("policy_loss_mode"))


def _check_group_size(estimator, n: int) -> None:
    if estimator in GROUP_ESTIMATORS and n < 2:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} with actor_rollout_ref.rollout.n={n} is refused: a group-relative "
            "estimator needs several responses per prompt (with one, verl 0.9.1 gives grpo no baseline, "
            "rloo_vectorized all-zero advantages, grpo_passk an error mid-run); set actor_rollout_ref.rollout.n >= 2, "
            "e.g. 8"
        )

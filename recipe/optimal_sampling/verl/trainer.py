"""`OptimalSamplingTrainer`: verl's v1 sync trainer plus the `optimal_sampling/*` metrics of each step, registered
as `trainer.v1.trainer_mode=optimal_sampling_sync`.

Differs from `PPOTrainerSync` in:
- `_build_replay_buffer`: verl 0.9.1's base trainer branches on `trainer_mode == "sync"` (the replay buffer, the
  dataloader's gen_batch_size, prompt persistence in TransferQueue, what a checkpoint saves and restores); under its
  own registry name this trainer would take the async branches, so it runs as "sync" from there on (it is the sync
  trainer). Until 2026-12-02 it did not: its runs used verl's async replay buffer and one-prompt dataloader fetches,
  the same prompts per step and the same groups (no DAPO filter, no failed groups).
- `_compute_metrics`: it also reads the per-token traces that `DualAgentLoop` wrote into TransferQueue (before verl
  clears them), reduces those of the responses sampled with the teacher with `metrics.reduce_metrics` (in a mixed
  group the on-policy responses are counted only by `guided_frac`), adds the server-vs-trainer log-prob gap, the step's
  model forward tokens (`forward_token_metrics`), the share of responses without a learning signal
  (`advantage_metrics`), per-replica evidence of a multi-GPU run (`replica_metrics`: responses served, log-prob gap and
  missed weight syncs per replica) and each server's numbers of the step's phases (`optimal_sampling/server/*`: wall
  time, engine time, memory; `phases.PhaseLog`), and every `plot_freq` steps sends alpha plots to W&B;
- with `optimal_sampling.validate_policy_only`: `on_validate_begin`/`on_validate_end` switch the dual servers to
  policy-only sampling for the validation, and `_val_metrics_update` adds `optimal_sampling/val_policy_only_accuracy`.
- with `algorithm.adv_estimator=optimal_sampling_guided`: `_compute_advantage` hands the registered estimator the step's
  guided flags and both models' log-probs (`verl/guided.py`), and `on_sample_begin` sends the servers the guided members
  per group left by the `guided_loss` fade (lifted during validation).
verl's own `rollout_corr/*` metrics come from its `_compute_advantage`. The maths of the reductions lives in
`step_metrics`, `forward_token_metrics`, `advantage_metrics` and `replica_metrics` (functions of tensors and dicts,
tested on CPU).
"""

import math

import numpy as np
import ray
import torch
import transfer_queue as tq
from torch import Tensor
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from ..loss import GuidedLossConfig, critic_coef, faded_guided_per_prompt, guidance_scale
from ..loss.config import KEY as LOSS_KEY
from ..metrics import PREFIX, reduce_metrics
from . import TRAINER_MODE
from .agent_loop import TRACE_FIELDS
from .config import OptimalSamplingConfig
from .guided import GUIDED_ESTIMATOR, critic_metrics, guided_step, policy_reward_mean, read_step_inputs
from .server import FAST_ENGINE_KEY, FORWARD_TOKEN_KEYS, GUIDED_KEY, REPLICA_KEY, TRACE_PREFIX, WEIGHT_VERSION_KEY

SYNC_MODE = "sync"  # the trainer_mode verl 0.9.1's base trainer treats as synchronous


def step_metrics(fields: dict[str, Tensor], response_mask: Tensor) -> dict[str, float]:
    """`optimal_sampling/*` scalars of one batch. fields: (B, T) padded tensors `dual_*`, `rollout_log_probs`
    (log q*) and `old_log_probs` (the trainer's log pi_theta_old); response_mask: (B, T), 1 on response tokens."""
    on = response_mask.bool()  # (B, T)
    flat = {name[len(TRACE_PREFIX) :]: fields[name][on] for name in TRACE_FIELDS}  # each (N,)
    flat["logp_q"] = fields["rollout_log_probs"][on]  # (N,)
    out = reduce_metrics(flat)
    if "old_log_probs" in fields:
        gap = (flat["logp_policy"].double() - fields["old_log_probs"][on].double()).abs()  # (N,)
        out[PREFIX + "logp_policy_server_vs_trainer"] = float(gap.mean()) if gap.numel() else 0.0
    return out


def forward_token_metrics(extra_fields: list[dict]) -> dict[str, float]:
    """`optimal_sampling/{policy,teacher}_forward_tokens`: the model forward tokens the servers spent on one step's
    responses (per response: its prompt's positions plus the response tokens fed back, per model; 0 for the
    teacher where it was not run), summed. extra_fields: one dict per response, as the servers returned them."""
    out = {}
    for model, key in FORWARD_TOKEN_KEYS.items():
        values = [e.get(key) for e in extra_fields]
        assert all(v is not None for v in values), f"responses without {key}: {values.count(None)} of {len(values)}"
        out[f"{PREFIX}{model}_forward_tokens"] = float(sum(values))
    engines = [e.get(FAST_ENGINE_KEY) for e in extra_fields if e.get(FAST_ENGINE_KEY) is not None]
    if engines:  # 1 when the fast engine sampled every response of the step, 0 when the reference path did any
        out[PREFIX + "fast_engine"] = float(min(engines))
    return out


def advantage_metrics(advantages: Tensor, response_mask: Tensor) -> dict[str, float]:
    """`optimal_sampling/zero_advantage_frac`: the share of responses whose advantage is 0 on every response token.
    Under GRPO these are the groups whose rewards are all equal (all right or all wrong): they give no gradient.
    Teacher-guided samples are mostly right, so this share says how much of a step's batch is spent for nothing.
    advantages, response_mask: (B, T)."""
    zero = ((advantages == 0) | ~response_mask.bool()).all(dim=-1)  # (B,)
    return {PREFIX + "zero_advantage_frac": float(zero.double().mean()) if zero.numel() else 0.0}


def replica_metrics(
    extra_fields: list[dict],
    logp_policy: Tensor,
    old_log_probs: Tensor,
    response_mask: Tensor,
    global_steps: int,
    num_replicas: int,
) -> dict[str, float]:
    """Per-replica evidence of one step (what proves a multi-GPU run spread its requests and synced every server):
    - `optimal_sampling/replica<r>/responses`: responses replica r served (0 for an idle one), for r < num_replicas,
      and `replica_responses_min`, the smallest of them;
    - `optimal_sampling/replica<r>/logp_policy_server_vs_trainer`: mean |server log pi_theta(y_t) - trainer
      old_log_prob(y_t)| over replica r's response tokens (all its responses, guided or not): ~0 only if it sampled
      with the trainer's current weights (absent for an idle replica);
    - `optimal_sampling/replica_weight_lag_max`: max over responses of (global_steps - 1) - the serving replica's weight
      version, i.e. the weight syncs a replica missed: 0 in the sync trainer, whose step s samples with the weights
      synced at the end of step s - 1 (verl's `training/off_policy/trajectory_staleness` has the same origin).
    extra_fields: one dict per response, as the servers returned them; logp_policy (the server's), old_log_probs,
    response_mask: (B, T)."""
    missing = [e for e in extra_fields if REPLICA_KEY not in e or WEIGHT_VERSION_KEY not in e]
    assert not missing, f"responses without {REPLICA_KEY}/{WEIGHT_VERSION_KEY}: {len(missing)} of {len(extra_fields)}"
    ranks = torch.tensor([int(e[REPLICA_KEY]) for e in extra_fields], dtype=torch.long)  # (B,)
    versions = torch.tensor([int(e[WEIGHT_VERSION_KEY]) for e in extra_fields], dtype=torch.long)  # (B,)
    assert ((ranks >= 0) & (ranks < num_replicas)).all(), f"{ranks.tolist()=} {num_replicas=}"
    on = response_mask.bool()  # (B, T)
    gap = torch.where(on, (logp_policy.double() - old_log_probs.double()).abs(), 0.0)  # (B, T)
    counts = torch.bincount(ranks, minlength=num_replicas)  # (R,)
    out = {}
    for r in range(num_replicas):
        out[f"{PREFIX}replica{r}/responses"] = float(counts[r])
        mine = ranks == r  # (B,)
        if mine.any():
            out[f"{PREFIX}replica{r}/logp_policy_server_vs_trainer"] = float(gap[mine].sum() / on[mine].sum())
    out[PREFIX + "replica_responses_min"] = float(counts.min())
    lag = (global_steps - 1) - versions  # (B,)
    out[PREFIX + "replica_weight_lag_max"] = float(lag.max()) if lag.numel() else 0.0
    return out


def replica_count(config) -> int:
    """Rollout replicas of a run, counted as verl's LLMServerManager does (actor worker group size // rollout world
    size): one per trainer GPU, since the dual backend runs rollout TP = DP = PP = 1 (checked at start-up)."""
    return int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)


def os_config_of(config) -> OptimalSamplingConfig:
    """The `engine_kwargs.optimal_sampling` block of a trainer config."""
    return OptimalSamplingConfig.from_engine_kwargs(config.actor_rollout_ref.rollout.get("engine_kwargs"))


def padded(data, names: list[str]) -> dict[str, Tensor]:
    """(B, T) zero-padded tensors of the per-token `names` of a TensorDict read from TransferQueue, whose fields
    are jagged nested tensors (or plain (B, T) tensors when every row has the same length)."""
    return {
        name: torch.nested.to_padded_tensor(data[name], 0.0) if data[name].is_nested else data[name] for name in names
    }


def alpha_figure(alpha: Tensor, response_mask: Tensor):
    """Histogram of alpha over all tokens, and mean alpha (with p10-p90 band) by response position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on = response_mask.bool()  # (B, T)
    fig, (ax_hist, ax_pos) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_hist.hist(alpha[on].numpy(), bins=40, range=(0, 1))
    ax_hist.set(xlabel="alpha (teacher weight)", ylabel="tokens", title="alpha over tokens")
    columns = [alpha[on[:, t], t] for t in range(alpha.shape[1]) if on[:, t].any()]
    if columns:
        q = torch.stack(
            [torch.quantile(c.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)) for c in columns]
        )
        pos = np.arange(len(columns))
        ax_pos.plot(pos, [float(c.mean()) for c in columns], label="mean")
        ax_pos.fill_between(pos, q[:, 0].numpy(), q[:, 2].numpy(), alpha=0.3, label="p10-p90")
        ax_pos.legend()
    ax_pos.set(xlabel="response position", ylabel="alpha", ylim=(0, 1), title="alpha by position")
    fig.tight_layout()
    return fig


@register_trainer(TRAINER_MODE)
class OptimalSamplingTrainer(PPOTrainerSync):
    """Sync trainer for the `dual` backend (trainer and servers share the GPUs; weights synced every step)."""

    def _build_replay_buffer(self):
        # Differs from the base: verl sets trainer_mode to the registry name just before this call and compares it
        # with "sync" from here on (module docstring); this trainer is verl's sync trainer.
        self.trainer_mode = SYNC_MODE
        return super()._build_replay_buffer()

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        # Differs from the base: adds optimal_sampling/* from the traces (TransferQueue is cleared right after).
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        metrics.update(self._optimal_sampling_metrics(batch, global_steps))
        metrics.update(self._server_phase_metrics())

    def _optimal_sampling_metrics(self, batch, global_steps: int) -> dict[str, float]:
        """optimal_sampling/* of one step: trace statistics (of the responses sampled with the teacher), the share of
        those, forward tokens, per-replica evidence, zero-advantage share; alpha plots to W&B on plot steps."""
        # 1) the step's responses from TransferQueue, padding rows left out
        select = [*TRACE_FIELDS, "rollout_log_probs", "old_log_probs", "advantages", "response_mask"]
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=[*select, "extra_fields"]
        )
        keep = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])  # (B,)
        extra_fields = [e for e, k in zip(data.pop("extra_fields").tolist(), keep.tolist(), strict=True) if k]
        fields = {name: value[keep] for name, value in padded(data, select).items()}  # each (B', T)
        # 2) reductions. The trace statistics describe the responses sampled with the teacher; in a mixed group
        # (guided_per_prompt) the on-policy ones are left out. When no response ran the teacher (skip_unused_teacher),
        # they cover every response and the teacher's NaN statistics are dropped.
        forward = forward_token_metrics(extra_fields)
        guided = torch.tensor([bool(e[GUIDED_KEY]) for e in extra_fields], dtype=torch.bool)  # (B',)
        traced = {name: value[guided] for name, value in fields.items()} if guided.any() else fields
        traces = step_metrics(traced, traced["response_mask"])
        if not guided.any():
            traces = {k: v for k, v in traces.items() if math.isfinite(v)}
        traces[PREFIX + "guided_frac"] = float(guided.double().mean()) if guided.numel() else 0.0
        self._log_alpha_plots(traced, global_steps)
        replicas = replica_metrics(
            extra_fields,
            fields[TRACE_PREFIX + "logp_policy"],
            fields["old_log_probs"],
            fields["response_mask"],
            global_steps,
            replica_count(self.config),
        )
        return {**traces, **forward, **replicas, **advantage_metrics(fields["advantages"], fields["response_mask"])}

    def _server_phase_metrics(self) -> dict[str, float]:
        """`optimal_sampling/server/*` of the step's sync, rollout and train phases; with several servers the largest
        value of each (the slowest server, the fullest GPU)."""
        manager = getattr(self, "llm_server_manager", None)
        per_server = ray.get([h.phase_metrics.remote() for h in manager.server_handles]) if manager else []
        return {k: max(m[k] for m in per_server if k in m) for k in set().union(*per_server)}

    def on_validate_begin(self):
        # Differs from the base (a no-op): with validate_policy_only the servers sample from the policy alone; the
        # guidance fade's limit is lifted (validation samples as configured, whatever the fade).
        super().on_validate_begin()
        self._set_policy_only_validation(True)
        self._push_guided_limit(validating=True)

    def on_validate_end(self):
        # Differs from the base (a no-op): the servers go back to sampling from q* under the fade's limit.
        self._set_policy_only_validation(False)
        self._push_guided_limit()
        super().on_validate_end()

    def on_sample_begin(self):
        # Differs from the base (a no-op): with a guided_loss fade, the servers get the step's guided members per group.
        super().on_sample_begin()
        self._push_guided_limit()

    def _compute_advantage(self, batch, metrics):
        # Differs from the base only with algorithm.adv_estimator=optimal_sampling_guided: the registered estimator gets
        # the step's guided flags and log-probs while the base method runs; the policy's own reward feeds the fade.
        if self.config.algorithm.adv_estimator != GUIDED_ESTIMATOR:
            return super()._compute_advantage(batch, metrics)
        loss, guidance = self._guided_loss(), self._guidance()
        inputs, scores, mask = read_step_inputs(batch, self.global_steps, guidance, loss)
        with guided_step(inputs):
            batch = super()._compute_advantage(batch, metrics)
        keep = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])  # (B,)
        self._policy_reward = policy_reward_mean(scores[keep], inputs.guided[keep])
        beta = critic_coef(self.global_steps, loss.critic_coef, loss.critic_schedule, loss.critic_end_step)
        metrics[PREFIX + "guidance"] = guidance
        metrics[PREFIX + "critic_coef"] = beta * guidance if loss.fade_critic else beta
        if loss.critic_on:
            metrics.update({PREFIX + k: v for k, v in critic_metrics(inputs, mask, keep).items()})
        return batch

    def _guided_loss(self) -> GuidedLossConfig:
        return GuidedLossConfig.from_mapping(self.config.get(LOSS_KEY))

    def _guidance(self) -> float:
        """The fade's scale for the current step, from the policy's own reward of the last step (1 before any)."""
        loss = self._guided_loss()
        reward = getattr(self, "_policy_reward", None)
        return guidance_scale(reward, self.global_steps, loss.fade_reward_threshold, loss.fade_end_step)

    def _push_guided_limit(self, validating: bool = False) -> None:
        if self.config.algorithm.adv_estimator != GUIDED_ESTIMATOR or not self._guided_loss().fades:
            return
        k = os_config_of(self.config).guided_per_prompt
        k = int(self.config.actor_rollout_ref.rollout.n) if k is None else k
        limit = None if validating else faded_guided_per_prompt(k, self._guidance())
        ray.get([handle.set_guided_limit.remote(limit) for handle in self.llm_server_manager.server_handles])

    def _set_policy_only_validation(self, on: bool) -> None:
        if os_config_of(self.config).validate_policy_only:
            handles = self.llm_server_manager.server_handles
            ray.get([handle.set_policy_only_validation.remote(on) for handle in handles])

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs):
        # Differs from the base: adds optimal_sampling/val_policy_only_accuracy, the mean validation reward over all
        # samples (the accuracy for 0/1 rewards), when validation sampled from the policy alone.
        metrics = super()._val_metrics_update(
            data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs
        )
        if os_config_of(self.config).validate_policy_only:
            metrics[PREFIX + "val_policy_only_accuracy"] = float(np.mean(reward_extra_infos_dict["reward"]))
        return metrics

    def _log_alpha_plots(self, fields: dict[str, Tensor], global_steps: int) -> None:
        freq = os_config_of(self.config).plot_freq
        wandb = getattr(self, "logger", None) and self.logger.logger.get("wandb")
        if not wandb or freq <= 0 or global_steps % freq:
            return
        import matplotlib.pyplot as plt

        alpha, mask = fields[TRACE_PREFIX + "alpha"], fields["response_mask"]
        fig = alpha_figure(alpha, mask)
        wandb.log(
            {
                PREFIX + "alpha_hist": wandb.Histogram(alpha[mask.bool()].numpy()),
                PREFIX + "alpha_plots": wandb.Image(fig),
            },
            step=global_steps,
        )
        plt.close(fig)

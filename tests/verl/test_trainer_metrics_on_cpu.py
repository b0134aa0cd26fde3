"""The trainer's per-step reduction of the traces into optimal_sampling/* metrics, the alpha plots through a real
offline W&B run (verl's Tracking), and the task reward in verl's custom-reward format."""

import glob
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from recipe.optimal_sampling.metrics import reduce_metrics
from recipe.optimal_sampling.verl.agent_loop import TRACE_FIELDS
from recipe.optimal_sampling.verl.reward import compute_score
from recipe.optimal_sampling.verl.server import REPLICA_KEY, WEIGHT_VERSION_KEY
from recipe.optimal_sampling.verl.trainer import (
    OptimalSamplingTrainer,
    advantage_metrics,
    alpha_figure,
    padded,
    replica_count,
    replica_metrics,
    step_metrics,
)

ISSUE_METRICS = (
    "alpha_mean alpha_std alpha_p10 alpha_p50 alpha_p90 forced_frac support_size_mean kl_q_policy kl_q_teacher "
    "kl_sym_err ess_ratio logp_policy_server_vs_trainer"
).split()


def padded_fields(seed: int = 0, B: int = 3, T: int = 5) -> tuple[dict, torch.Tensor]:
    """Random traces as the trainer reads them from TransferQueue: (B, T), zero-padded after each row's length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 2, 1])
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T)
    fields = {name: torch.rand(B, T, generator=g) for name in TRACE_FIELDS}
    fields["dual_forced"] = torch.zeros(B, T)
    fields["dual_forced"][:, 0] = 1.0  # first token forced
    fields["dual_alpha"] = torch.where(fields["dual_forced"].bool(), 1.0, fields["dual_alpha"])
    fields["dual_support_size"] = torch.randint(1, 5, (B, T), generator=g).float()  # some single-token supports
    fields["dual_ess_policy"] += 0.1
    fields["dual_ess_teacher"] += 0.1
    fields["rollout_log_probs"] = -torch.rand(B, T, generator=g)
    fields["old_log_probs"] = fields["dual_logp_policy"] + 0.01 * torch.randn(B, T, generator=g)
    return {k: v * mask for k, v in fields.items()}, mask


def test_step_metrics_have_the_issue_names_and_naive_values():
    fields, mask = padded_fields()
    m = step_metrics(fields, mask)
    assert {f"optimal_sampling/{name}" for name in ISSUE_METRICS} <= set(m)
    on = mask.bool()
    # the padding is left out: the same as reducing the response tokens alone
    flat = {name[len("dual_") :]: fields[name][on] for name in TRACE_FIELDS} | {
        "logp_q": fields["rollout_log_probs"][on]
    }
    assert {k: v for k, v in m.items() if not k.endswith("server_vs_trainer")} == reduce_metrics(flat)
    assert m["optimal_sampling/num_tokens"] == int(on.sum())
    assert m["optimal_sampling/forced_frac"] == pytest.approx(3 / int(on.sum()))
    solved = on & ~fields["dual_forced"].bool() & (fields["dual_support_size"] > 1)  # alpha mattered here
    assert m["optimal_sampling/alpha_mean"] == pytest.approx(float(fields["dual_alpha"][solved].double().mean()))
    gap = (fields["dual_logp_policy"] - fields["old_log_probs"])[on].abs().double().mean()
    assert m["optimal_sampling/logp_policy_server_vs_trainer"] == pytest.approx(float(gap))
    ratio = (fields["dual_ess_policy"][on].double().log() - fields["dual_ess_teacher"][on].double().log()).mean().exp()
    assert m["optimal_sampling/ess_ratio"] == pytest.approx(float(ratio))
    assert all(isinstance(v, float) for v in m.values())


def test_zero_advantage_frac_counts_the_uniform_reward_groups_of_verls_grpo():
    """verl's own GRPO advantages on 4 groups of 3: one all-right, one all-wrong, two mixed; responses of different
    lengths (padding is not a nonzero advantage)."""
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    rewards = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float32)  # (12,) groups of 3
    lengths = torch.tensor([5, 2, 3, 1, 4, 5, 2, 5, 3, 4, 1, 2])
    mask = (torch.arange(5) < lengths[:, None]).float()  # (12, 5)
    token_rewards = torch.zeros(12, 5)
    token_rewards[torch.arange(12), lengths - 1] = rewards  # the outcome reward on the last response token
    index = np.repeat(np.array(["a", "b", "c", "d"], dtype=object), 3)
    advantages, _ = compute_grpo_outcome_advantage(token_rewards, mask, index)
    assert (advantages[6:] != 0).any()  # the mixed groups do carry a signal
    assert advantage_metrics(advantages, mask) == {"optimal_sampling/zero_advantage_frac": 6 / 12}
    assert advantage_metrics(torch.zeros(0, 5), torch.zeros(0, 5)) == {"optimal_sampling/zero_advantage_frac": 0.0}


def naive_replica_metrics(ranks, versions, server, trainer, lengths, step, num_replicas) -> dict[str, float]:
    """Per-response Python loop over the response tokens."""
    out = {}
    for r in range(num_replicas):
        mine = [i for i, rank in enumerate(ranks) if rank == r]
        out[f"optimal_sampling/replica{r}/responses"] = float(len(mine))
        diffs = [abs(float(server[i, t]) - float(trainer[i, t])) for i in mine for t in range(lengths[i])]
        if mine:
            out[f"optimal_sampling/replica{r}/logp_policy_server_vs_trainer"] = sum(diffs) / len(diffs)
    out["optimal_sampling/replica_responses_min"] = min(
        out[f"optimal_sampling/replica{r}/responses"] for r in range(num_replicas)
    )
    out["optimal_sampling/replica_weight_lag_max"] = float(max(step - 1 - v for v in versions))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_replica_metrics_equal_a_naive_loop(seed):
    """4 replicas, one idle (responses 0, no gap), one a sync behind; the padding of short responses is left out."""
    g = torch.Generator().manual_seed(seed)
    B, T, step = 7, 5, 4
    ranks, versions = [0, 2, 1, 0, 2, 2, 0], [3, 3, 2, 3, 3, 3, 3]  # replica 1 missed the last sync; 3 served none
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()  # (B, T)
    server = -torch.rand(B, T, generator=g) * mask  # (B, T)
    trainer = (server + 0.01 * torch.randn(B, T, generator=g)) * mask  # (B, T)
    extra = [{REPLICA_KEY: r, WEIGHT_VERSION_KEY: v, "global_steps": v} for r, v in zip(ranks, versions, strict=True)]
    got = replica_metrics(extra, server, trainer, mask, step, num_replicas=4)
    want = naive_replica_metrics(ranks, versions, server, trainer, lengths, step, 4)
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got["optimal_sampling/replica3/responses"] == 0 and got["optimal_sampling/replica_responses_min"] == 0
    assert "optimal_sampling/replica3/logp_policy_server_vs_trainer" not in got
    assert got["optimal_sampling/replica_weight_lag_max"] == 1


def test_replica_metrics_refuse_unknown_replicas_and_unstamped_responses():
    mask = torch.ones(1, 2)
    with pytest.raises(AssertionError, match="num_replicas=2"):
        replica_metrics([{REPLICA_KEY: 2, WEIGHT_VERSION_KEY: 0}], mask, mask, mask, 1, num_replicas=2)
    with pytest.raises(AssertionError, match="dual_replica_rank"):
        replica_metrics([{"global_steps": 0}], mask, mask, mask, 1, num_replicas=2)


def test_replica_count_is_one_per_trainer_gpu():
    config = OmegaConf.create({"trainer": {"n_gpus_per_node": 8, "nnodes": 2}})
    assert replica_count(config) == 16


def test_fields_read_back_from_verls_nested_layout_pad_to_the_same_values():
    """What the trainer reads from TransferQueue: verl's collation of per-sample dicts (jagged nested tensors)."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fields, mask = padded_fields()
    lengths = mask.sum(-1).long().tolist()
    names = [*TRACE_FIELDS, "rollout_log_probs", "old_log_probs"]
    rows = [
        {name: fields[name][i, :n] for name in names} | {"response_mask": mask[i, :n].long()}
        for i, n in enumerate(lengths)
    ]
    data = list_of_dict_to_tensordict(rows)
    assert data["dual_alpha"].is_nested
    back = padded(data, [*names, "response_mask"])
    for name in names:
        torch.testing.assert_close(back[name], fields[name])
    assert step_metrics(back, back["response_mask"]) == step_metrics(fields, mask)


def test_alpha_plots_go_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from verl.utils.tracking import Tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = Tracking(project_name="os-test", experiment_name="plots", default_backend=["console", "wandb"])
    config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": {"engine_kwargs": {"optimal_sampling": {"plot_freq": 2}}}}}
    )
    fake_trainer = SimpleNamespace(config=config, logger=tracking)
    fields, mask = padded_fields()
    fields["response_mask"] = mask
    for step in (1, 2):  # plot_freq=2: only step 2 plots
        tracking.log(data=step_metrics(fields, mask), step=step)
        OptimalSamplingTrainer._log_alpha_plots(fake_trainer, fields, step)
    tracking.finish(exit_code=0)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(f"{runs[0]}/files/media/images/optimal_sampling/alpha_plots_2_*.png")
    assert not glob.glob(f"{runs[0]}/files/media/images/optimal_sampling/alpha_plots_1_*.png")


def test_alpha_figure_has_histogram_and_position_panels():
    fields, mask = padded_fields()
    fig = alpha_figure(fields["dual_alpha"], mask)
    assert [ax.get_title() for ax in fig.axes] == ["alpha over tokens", "alpha by position"]


def test_reward_reads_the_reversed_sum():
    assert compute_score("optimal_sampling/addition", "236", "632") == 1.0
    assert compute_score("optimal_sampling/addition", "237", "632") == 0.0
    assert compute_score("optimal_sampling/addition", "", "632") == 0.0


def test_the_trainer_takes_verls_synchronous_branches():
    """verl 0.9.1's base trainer compares trainer_mode with "sync" (replay buffer, gen_batch_size, checkpoint
    contents); the recipe's trainer, registered under its own name, is built by verl's own __init__ as the sync one:
    the synchronous replay buffer, not the async subclass, and the config keeps the registry name."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from recipe.optimal_sampling.verl import TRAINER_MODE
    from recipe.optimal_sampling.verl.trainer import OptimalSamplingTrainer
    from tests.verl.fixtures import compose_config

    config = compose_config([])
    trainer = OptimalSamplingTrainer(config)
    assert trainer.trainer_mode == "sync" and config.trainer.v1.trainer_mode == TRAINER_MODE
    assert type(trainer.replay_buffer) is ReplayBuffer and not isinstance(trainer.replay_buffer, ReplayBufferAsync)

"""Fixtures and helpers of the verl-integration tests: tiny Qwen3 checkpoints built from Qwen3Config (random
weights, tied embeddings, the synthetic task's tokenizer), a composed trainer config pointing at them, one local
Ray."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from transformers import Qwen3Config, Qwen3ForCausalLM

from recipe.optimal_sampling.main import CONFIG_DIR
from recipe.optimal_sampling.tasks.tokenizer import build_tokenizer
from recipe.optimal_sampling.verl.data import POLICY_TEMPLATE


def tiny_config(vocab_size: int, hidden: int, layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def save_tiny(path: str, seed: int, hidden: int = 32, layers: int = 2, sharpness: float = 6.0) -> str:
    """A random tiny Qwen3 with the task tokenizer, saved as an HF checkpoint. `sharpness` scales the (tied)
    embeddings so that next-token distributions are peaky enough for alpha and the top-p set to vary."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config(len(tokenizer), hidden, layers)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(sharpness)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "policy": save_tiny(str(root / "policy"), seed=0),
        "policy_b": save_tiny(str(root / "policy_b"), seed=7),  # same architecture, other weights (weight sync)
        "teacher": save_tiny(str(root / "teacher"), seed=1, hidden=48, layers=3),
    }


def compose_config(overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="optimal_sampling_trainer", overrides=list(overrides))


def tiny_overrides(checkpoints: dict[str, str]) -> list[str]:
    """The settings of scripts/e2e_tiny_gpu.sh that matter below the trainer."""
    return [
        f"actor_rollout_ref.model.path={checkpoints['policy']}",
        f"actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_path={checkpoints['teacher']}",
        f"actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.policy_template='{POLICY_TEMPLATE}'",
        "actor_rollout_ref.rollout.response_length=8",
        "actor_rollout_ref.rollout.prompt_length=32",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.max_num_seqs=64",
        "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.batch_window_ms=50",
        "data.train_batch_size=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "trainer.n_gpus_per_node=1",
    ]


@pytest.fixture(scope="session")
def trainer_config(checkpoints) -> DictConfig:
    config = compose_config(tiny_overrides(checkpoints))
    with open_dict(config):
        config.actor_rollout_ref.rollout.agent.agent_loop_config_path = os.path.join(CONFIG_DIR, "agent_loops.yaml")
    return config


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def make_agent_loop(rollout):
    """A `DualAgentLoop` as verl's agent-loop worker builds one, talking to `rollout.client` (an LLMServerClient)."""
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from recipe.optimal_sampling.verl.agent_loop import DualAgentLoop

    config = rollout.config
    return DualAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=rollout.client,
        tokenizer=AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path),
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type="qwen3",
    )

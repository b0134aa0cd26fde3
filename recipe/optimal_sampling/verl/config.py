"""`OptimalSamplingConfig` (the `actor_rollout_ref.rollout.engine_kwargs.optimal_sampling` block) and the start-up
checks that refuse trainer configs under which the importance weights would be wrong.

Owns the meaning of every key of that block (the Hydra `sampler` group mirrors it key for key) and the refusals.
Knows nothing about Ray, models or tensors; imports neither verl nor Hydra (configs arrive as mappings).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..engine import SamplerConfig
from . import AGENT_LOOP_NAME, ENGINE_KWARGS_KEY, ROLLOUT_NAME, TRAINER_MODE
from .is_checks import check_importance_weights

ENGINES = ("auto", "fast", "reference")  # optimal_sampling.engine; fast = DualSampler backend "cuda_graph"
SAMPLER_KEYS = ("alpha_method", "fixed_alpha", "force_teacher_tokens", "teacher_top_p", "stop_token_ids")


@dataclass(frozen=True)
class OptimalSamplingConfig:
    """What the `dual` backend needs beyond verl's RolloutConfig. Built once from `engine_kwargs.optimal_sampling`
    (`from_engine_kwargs`); the sampler keys are `SamplerConfig`'s fields and are validated by it."""

    teacher_path: str | None = field(default=None, metadata={"help": "local HF checkpoint of the frozen teacher"})
    alpha_method: str = field(default="kl_symmetry", metadata={"help": "SamplerConfig.alpha_method"})
    fixed_alpha: float | None = field(default=None, metadata={"help": "SamplerConfig.fixed_alpha"})
    force_teacher_tokens: int = field(default=0, metadata={"help": "SamplerConfig.force_teacher_tokens"})
    teacher_top_p: float | None = field(default=None, metadata={"help": "SamplerConfig.teacher_top_p"})
    stop_token_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "extra stop ids; both tokenizers' EOS ids are always added"}
    )
    policy_template: str | None = field(
        default=None,
        metadata={"help": "plain policy prompt with '{prompt}' = the last user message; None = verl's chat prompt"},
    )
    teacher_chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template of the teacher; None = the teacher tokenizer's own"}
    )
    batch_window_ms: float = field(
        default=20.0, metadata={"help": "the server waits this long for concurrent requests to batch together"}
    )
    plot_freq: int = field(default=0, metadata={"help": "alpha plots to W&B every N steps when W&B is on; 0 = off"})
    validate_policy_only: bool = field(
        default=False,
        metadata={
            "help": "validation samples from the policy alone (the teacher is not run): greedy when "
            "rollout.val_kwargs.temperature=0, else sampled at that temperature; logs "
            "optimal_sampling/val_policy_only_accuracy"
        },
    )
    guided_per_prompt: int | None = field(
        default=None,
        metadata={
            "help": "mixed groups: of each prompt's rollout.n responses, the first k are sampled from q* and the "
            "other n - k from pi_theta alone (the teacher is not run for them), so that GRPO compares guided and "
            "on-policy answers to the same prompt; None = all n from q*"
        },
    )
    skip_unused_teacher: bool = field(
        default=False,
        metadata={
            "help": "do not run the teacher when q* ignores it (alpha_method=fixed, fixed_alpha=0, no forcing, no "
            "teacher_top_p): the same samples, the teacher's traces become NaN and its forward tokens 0"
        },
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "decode engine of the servers: auto (the fast engine where it can run, else the reference path; "
            "the choice and the reason are logged at start-up and logged as optimal_sampling/fast_engine), fast "
            "(require it: start-up fails with the reason), reference"
        },
    )
    continuous_batching: bool = field(
        default=True,
        metadata={
            "help": "with the fast engine, requests stream into rollout.max_num_seqs fixed slots of "
            "rollout.max_model_len (default prompt_length + response_length + 128) tokens while others decode; false "
            "= one static batch per batch_window_ms"
        },
    )

    score_policy_samples: bool = field(
        default=False,
        metadata={
            "help": "the server scores every policy-only training response with one teacher prefill (teacher prompt + "
            "response) and returns log pi_t(y_t) in dual_logp_teacher: the teacher critic on the policy's own samples "
            "(guided_loss.critic_coef > 0; on-policy distillation). false = policy-only responses cost no teacher pass"
        },
    )

    def __post_init__(self):
        self.sampler_config()  # raises ValueError naming the bad field
        if self.engine not in ENGINES:
            raise ValueError(f"optimal_sampling.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.policy_template is not None and "{prompt}" not in self.policy_template:
            raise ValueError(
                f"optimal_sampling.policy_template must contain '{{prompt}}', got {self.policy_template!r}"
            )
        if not self.batch_window_ms >= 0:
            raise ValueError(f"optimal_sampling.batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.plot_freq < 0:
            raise ValueError(f"optimal_sampling.plot_freq must be >= 0 (0 = off), got {self.plot_freq}")
        k = self.guided_per_prompt
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(
                f"optimal_sampling.guided_per_prompt must be null (every response from q*) or an int >= 0 (that many "
                f"responses per prompt from q*, the rest from the policy), got {k!r}"
            )
        for name in ("validate_policy_only", "skip_unused_teacher", "score_policy_samples", "continuous_batching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"optimal_sampling.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_engine_kwargs(cls, engine_kwargs: Mapping | None) -> "OptimalSamplingConfig":
        """From `rollout.engine_kwargs` (a dict or DictConfig holding the `optimal_sampling` block)."""
        block = dict((engine_kwargs or {}).get(ENGINE_KWARGS_KEY) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(
                f"unknown keys in actor_rollout_ref.rollout.engine_kwargs.{ENGINE_KWARGS_KEY}: {unknown}; "
                f"known keys: {sorted(known)}"
            )
        if block.get("stop_token_ids") is not None:
            block["stop_token_ids"] = tuple(int(t) for t in block["stop_token_ids"])
        return cls(**block)

    def sampler_config(self, temperature: float = 1.0, extra_stop_ids: tuple[int, ...] = ()) -> SamplerConfig:
        """The engine's config; stop ids are ours plus `extra_stop_ids` (e.g. both tokenizers' EOS)."""
        stop = tuple(sorted(set(self.stop_token_ids) | set(extra_stop_ids)))
        values = {k: getattr(self, k) for k in SAMPLER_KEYS if k != "stop_token_ids"}
        return SamplerConfig(**values, temperature=temperature, stop_token_ids=stop)


def check_trainer_config(config: Mapping) -> OptimalSamplingConfig | None:
    """Refuse, with a ValueError that says what to change, a trainer config under which the `dual` backend would
    train on wrong importance weights. Returns the parsed block, or None when another backend is selected.
    Checks only the config's values; `check_teacher` looks at the files."""
    rollout = config["actor_rollout_ref"]["rollout"]
    if rollout["name"] != ROLLOUT_NAME:
        return None
    os_config = OptimalSamplingConfig.from_engine_kwargs(rollout.get("engine_kwargs"))
    check_importance_weights(config)  # 1) the IS weights and the loss that consumes them
    _check_sampling(rollout, os_config)  # 2) sampling parameters the weights depend on
    _check_topology(rollout, config["trainer"])  # 3) servers, trainer mode, agent loop
    return os_config


def _check_sampling(rollout: Mapping, os_config: OptimalSamplingConfig) -> None:
    if float(rollout["temperature"]) != 1.0:
        raise ValueError(
            f"actor_rollout_ref.rollout.temperature={rollout['temperature']} is refused with the dual backend: verl "
            "recomputes pi_old at that temperature while q* mixes the models' temperature-scaled distributions, so "
            "w = pi_old/q* would weight toward a tempered policy, not pi_theta. Set it to 1.0 (shape q* with the "
            "sampler preset instead)."
        )
    _check_validation(rollout.get("val_kwargs") or {}, os_config.validate_policy_only)
    if float(rollout.get("top_p", 1.0)) != 1.0 or int(rollout.get("top_k", -1)) not in (-1, 0):
        raise ValueError(
            f"actor_rollout_ref.rollout.top_p={rollout.get('top_p')} / top_k={rollout.get('top_k')} are not used by "
            "the dual backend and would not be reflected in log q*; keep top_p=1.0, top_k=-1 and restrict sampling "
            f"with engine_kwargs.{ENGINE_KWARGS_KEY}.teacher_top_p."
        )
    k, n = os_config.guided_per_prompt, int(rollout.get("n", 1))
    if k is not None and k > n:
        raise ValueError(
            f"engine_kwargs.{ENGINE_KWARGS_KEY}.guided_per_prompt={k} is more than actor_rollout_ref.rollout.n={n}: "
            f"it counts the responses per prompt sampled from q*; use at most {n} (or null for all of them)"
        )
    if not rollout.get("calculate_log_probs", False):
        raise ValueError(
            "actor_rollout_ref.rollout.calculate_log_probs must be true with the dual backend: without "
            "rollout_log_probs (= log q*) verl cannot compute the importance weights."
        )


def _check_validation(val: Mapping, policy_only: bool) -> None:
    temperature, do_sample = float(val.get("temperature", 1.0)), bool(val.get("do_sample", True))
    if not policy_only and (temperature != 1.0 or not do_sample):
        raise ValueError(
            "actor_rollout_ref.rollout.val_kwargs must keep temperature=1.0 and do_sample=true with the dual backend "
            f"(got temperature={val.get('temperature')}, do_sample={val.get('do_sample')}): the dual server samples "
            "from q* and has no greedy mode. For greedy validation of the policy alone set "
            f"engine_kwargs.{ENGINE_KWARGS_KEY}.validate_policy_only=true."
        )
    if policy_only and (temperature < 0 or (temperature == 0) == do_sample):
        raise ValueError(
            f"actor_rollout_ref.rollout.val_kwargs temperature={val.get('temperature')}, "
            f"do_sample={val.get('do_sample')} with validate_policy_only=true: use temperature=0 with do_sample=false "
            "(greedy) or a temperature > 0 with do_sample=true (sampled from the policy)"
        )


def _check_topology(rollout: Mapping, trainer: Mapping) -> None:
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        if int(rollout.get(key, 1)) != 1:  # one replica per trainer GPU: verl counts GPUs // (TP * DP * PP)
            raise ValueError(
                f"actor_rollout_ref.rollout.{key}={rollout[key]}: the dual backend runs one server (policy copy + "
                "teacher) per GPU, one replica each; set it to 1."
            )
    mode = (trainer.get("v1") or {}).get("trainer_mode")
    if not trainer.get("use_v1", True) or mode != TRAINER_MODE:
        raise ValueError(
            f"the dual backend needs trainer.use_v1=true and trainer.v1.trainer_mode={TRAINER_MODE} (got use_v1="
            f"{trainer.get('use_v1')}, trainer_mode={mode}): the async modes resume interrupted requests without the "
            "teacher prompt and drop the per-token traces."
        )
    if (rollout.get("agent") or {}).get("default_agent_loop") != AGENT_LOOP_NAME:
        raise ValueError(
            f"actor_rollout_ref.rollout.agent.default_agent_loop must be {AGENT_LOOP_NAME} with the dual backend: "
            "other agent loops do not send the teacher's prompt, and the dual server refuses requests without it."
        )


def check_teacher(os_config: OptimalSamplingConfig, policy_tokenizer_path: str) -> None:
    """The teacher checkpoint exists and shares the policy's vocabulary (loads the two tokenizers only)."""
    from transformers import AutoTokenizer

    path = os_config.teacher_path
    if not path or path == "???":
        raise ValueError(
            f"actor_rollout_ref.rollout.engine_kwargs.{ENGINE_KWARGS_KEY}.teacher_path is not set: give the local "
            "directory of the teacher's HF checkpoint (config, weights and tokenizer)"
        )
    if not os.path.isdir(path):
        raise ValueError(
            f"teacher_path={path!r} is not a directory: the dual backend loads the teacher from a local HF checkpoint "
            "(download it first, e.g. `huggingface-cli download Qwen/Qwen3-14B --local-dir ...`)"
        )
    policy_tok = AutoTokenizer.from_pretrained(policy_tokenizer_path)
    teacher_tok = AutoTokenizer.from_pretrained(path)
    if policy_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            f"the policy tokenizer ({policy_tokenizer_path}, {len(policy_tok)} tokens) and the teacher tokenizer "
            f"({path}, {len(teacher_tok)} tokens) have different vocabularies: q* mixes two distributions over one "
            "vocabulary, so use a teacher from the policy's tokenizer family"
        )

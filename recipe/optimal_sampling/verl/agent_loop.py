"""`DualAgentLoop`: verl's single-turn agent loop for the `dual` backend. It renders each dataset prompt twice (the
policy's prompt and the teacher's chat prompt), sends both to the server, and returns an `AgentLoopOutput` whose
`response_logprobs` are log q* and whose per-token traces become tensor fields (`dual_alpha`, ...) in verl's batch.

Differs from verl's `SingleTurnAgentLoop` in: the teacher prompt (built from the teacher's chat template), the
optional plain policy template, mixed groups (`guided_per_prompt`: only a prompt's first k responses from q*), the
per-request response cap of the dataset row (`extra_info.max_response_tokens`, see `response_caps`), no Continuous
Token merge of the response (the sampled ids are kept as they are, so every trace stays aligned with its token), and
the trace fields. Knows nothing about models or sampling maths.
"""

from typing import Any
from uuid import uuid4

import torch
from transformers import AutoTokenizer
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput
from verl.utils.profiler import simple_timer

from .config import OptimalSamplingConfig
from .response_caps import response_cap
from .server import DIAGNOSTIC_KEYS, TRACE_KEYS, TRACE_PREFIX

TRACE_FIELDS = tuple(TRACE_PREFIX + k for k in (*TRACE_KEYS, *DIAGNOSTIC_KEYS))  # tensor fields in verl's batch

_TEACHER_TOKENIZERS: dict[str, Any] = {}  # one per teacher path and process: agent loops are built per sample


class DualAgentLoopOutput(AgentLoopOutput):
    """`AgentLoopOutput` plus per-token traces (one float per response token each)."""

    traces: dict[str, list[float]] = {}

    def as_dict(self) -> dict[str, Any]:
        # Differs from the base: the traces become float32 tensor fields next to `rollout_log_probs`.
        output = super().as_dict()
        for name, values in output.pop("traces", {}).items():
            output[name] = torch.tensor(values, dtype=torch.float32)
        return output


class DualAgentLoop(AgentLoopBase):
    """One response per prompt, sampled from q* by the `dual` server."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.os_config = OptimalSamplingConfig.from_engine_kwargs(self.rollout_config.get("engine_kwargs"))
        self.response_length = self.rollout_config.response_length
        path = self.os_config.teacher_path
        if path not in _TEACHER_TOKENIZERS:
            _TEACHER_TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
        self.teacher_tokenizer = _TEACHER_TOKENIZERS[path]

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        # 1) the two prompts
        prompt_ids = await self.policy_prompt_ids(messages)
        teacher_prompt_ids = self.teacher_prompt_ids(messages)
        cap = response_cap(kwargs.get("extra_info"), kwargs.get("session_id"), self.response_length)
        if cap is not None:  # this request's own length cap, from the dataset row
            sampling_params = {**sampling_params, "max_tokens": cap}
        # 2) one response from q* (or, in a mixed group, from the policy alone)
        metrics = {}
        with simple_timer("generate_sequences", metrics):
            output = await self.server_manager.generate(
                request_id=uuid4().hex,
                prompt_ids=prompt_ids,
                sampling_params=sampling_params,
                teacher_prompt_ids=teacher_prompt_ids,
                policy_only=not self.guided(kwargs),
                group_index=kwargs.get("session_id"),  # compared with the trainer's faded guided limit
            )
        metrics["num_preempted"] = -1
        # 3) traces out of extra_fields (they would stay Python lists there) into tensor fields
        n = min(len(output.token_ids), self.response_length)
        extra = dict(output.extra_fields)
        traces = {name: list(extra.pop(name))[:n] for name in TRACE_FIELDS}
        extra.update({"turn_scores": [], "tool_rewards": []})  # the schema of verl's single-turn loop
        return DualAgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=output.token_ids[:n],
            response_mask=[1] * n,
            response_logprobs=output.log_probs[:n],
            num_turns=2,
            metrics=metrics,
            extra_fields=extra,
            traces=traces,
        )

    def guided(self, kwargs: dict) -> bool:
        """Whether this response comes from q*: always, unless `guided_per_prompt` = k, where only the prompt's first
        k responses do (verl's TransferQueue worker numbers a prompt's n responses by `session_id`)."""
        k = self.os_config.guided_per_prompt
        if k is None:
            return True
        if "session_id" not in kwargs:
            raise ValueError(
                f"optimal_sampling.guided_per_prompt={k} needs the response's index within its group (`session_id`), "
                "which verl's v1 trainer (trainer.use_v1=true, TransferQueue agent-loop workers) passes; this agent "
                "loop was called without it"
            )
        return int(kwargs["session_id"]) < k

    async def policy_prompt_ids(self, messages: list[dict]) -> list[int]:
        """`policy_template` around the last user message (plain prompt), or verl's chat prompt when unset."""
        if self.os_config.policy_template is None:
            return await self.ct_build_initial_tokens(messages)
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        text = self.os_config.policy_template.format(prompt=user)
        return self._cap_text_prompt_length(self.tokenizer.encode(text, add_special_tokens=False))

    def teacher_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The whole conversation through the teacher's chat template, with the generation prompt and verl's
        `data.apply_chat_template_kwargs` (e.g. `enable_thinking: false` for Qwen3 teachers)."""
        template = self.os_config.teacher_chat_template or self.teacher_tokenizer.chat_template
        if not template:
            raise ValueError(
                "the teacher tokenizer has no chat template: set engine_kwargs.optimal_sampling.teacher_chat_template"
            )
        text = self.teacher_tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
            **self.apply_chat_template_kwargs,
        )
        return self.teacher_tokenizer.encode(text, add_special_tokens=False)

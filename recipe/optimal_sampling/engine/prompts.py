"""Dual prompts: the same problem rendered once for the policy (a plain template) and once for the teacher (its
chat template). Owns text -> token ids; knows nothing about models or sampling."""

from .config import SamplerConfig

DEFAULT_POLICY_TEMPLATE = "{prompt}"


def build_dual_prompts(
    prompts: list[str],
    tokenizer,
    policy_template: str = DEFAULT_POLICY_TEMPLATE,
    teacher_chat_template: str | None = None,
    system_prompt: str | None = None,
    teacher_tokenizer=None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt for the policy (`policy_template` with "{prompt}" replaced by the prompt; other braces
    are kept literally; no special tokens added) and
    for the teacher (a user turn, plus an optional system turn, through the teacher's chat template with the
    generation prompt). `teacher_chat_template` (a Jinja string) replaces the tokenizer's own."""
    teacher_tokenizer = teacher_tokenizer or tokenizer
    if "{prompt}" not in policy_template:
        raise ValueError(f"policy_template must contain '{{prompt}}', got {policy_template!r}")
    template = teacher_chat_template or getattr(teacher_tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the teacher tokenizer has no chat template: pass teacher_chat_template (a Jinja string, e.g. the "
            "teacher checkpoint's chat_template) so that the teacher sees the format it was tuned on"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty or not a string: {p!r}")
    policy_ids = [tokenizer.encode(policy_template.replace("{prompt}", p), add_special_tokens=False) for p in prompts]
    teacher_ids = []
    for p in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": p}
        ]
        teacher_ids.append(
            teacher_tokenizer.encode(_render(teacher_tokenizer, messages, template), add_special_tokens=False)
        )
    return policy_ids, teacher_ids


def _render(teacher_tokenizer, messages: list[dict], template: str) -> str:
    """The teacher's chat prompt; a template that does not parse or render is a one-line ValueError."""
    import jinja2

    try:
        text = teacher_tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(
            f"the teacher chat template does not render ({type(e).__name__}: {detail}): fix the template (the "
            "teacher tokenizer's chat_template, or teacher_chat_template / --teacher-chat-template)"
        ) from None
    if not isinstance(text, str) or not text:
        raise ValueError(f"the teacher chat template rendered {text!r:.60}: it must produce the prompt text")
    return text


def stop_ids_for(config: SamplerConfig, tokenizer, teacher_tokenizer=None) -> tuple[int, ...]:
    """The config's stop ids plus both tokenizers' EOS ids (the policy ends with EOS, a chat teacher with its
    end-of-turn token), sorted and without duplicates."""
    ids = set(config.stop_token_ids)
    for tok in (tokenizer, teacher_tokenizer or tokenizer):
        eos = tok.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))

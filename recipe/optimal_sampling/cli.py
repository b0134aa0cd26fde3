"""`optimal-sampling`: the command line.

    optimal-sampling generate --policy DIR --teacher DIR --input prompts.jsonl --output out.jsonl [options]
    optimal-sampling demo [--out DIR] [--retrain] [--seed S] [--num-problems N]

`generate` samples one completion per prompt from q* (two local HF checkpoints sharing a tokenizer) and writes one
JSONL row of per-token traces per prompt, a batch at a time; rerunning the same command resumes an interrupted
output (see `io`). `demo` runs `demo.run_demo`.

Owns argument parsing, model loading and the batch loop. File formats and resume checks live in `io`, sampling in
`engine`. Knows nothing about the maths. torch and transformers are imported inside the commands, so `--help` is
instant.
"""

import argparse
import os
import sys

from .io import (
    CliError,
    InputRow,
    Resume,
    append_rows,
    batch_seed,
    check_writable,
    checkpoint_files,
    open_output,
    output_line,
    output_lock,
    plan_resume,
    read_prompts,
    write_meta,
)

# Listed in --help without importing torch; tests/cli check them against engine.PRESETS and core.ALPHA_METHODS.
PRESET_NAMES = ("conservative", "balanced", "exploratory")
ALPHA_METHOD_NAMES = ("kl_symmetry", "ess_balance", "fixed", "entropy")
# SamplerConfig fields with a flag of the same name; a flag the user did not give leaves the preset's value.
SAMPLER_FLAGS = ("alpha_method", "fixed_alpha", "teacher_top_p", "force_teacher_tokens", "temperature")
DTYPES = ("float32", "bfloat16", "float16")
# A checkpoint directory needs one of these to load its tokenizer (`AutoTokenizer.from_pretrained`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")
GENERATE_EPILOG = """\
input:  one JSON object per line: "prompt" (a non-empty string), optional "id" (any JSON value), other fields
        are copied to the output's "meta". Blank lines are errors, except at the end of the file.
output: one JSON object per input line, in order: index (0-based line), id, prompt, token_ids, logp_q (the
        behaviour log-prob log q*), logp_policy, logp_teacher, alpha, forced, support_size, kl_q_policy,
        kl_q_teacher, ess_policy, ess_teacher, entropy_q (one value per generated token), finish_reason
        (stop | length), text, meta. OUTPUT.meta.json records the settings and a fingerprint of both
        checkpoints' files; a resumed run must match them. OUTPUT.lock exists while a run writes OUTPUT: a
        second run on the same OUTPUT is refused.

example:
  optimal-sampling generate --policy ckpt/qwen3-4b --teacher ckpt/qwen3-14b \\
      --input prompts.jsonl --output traces.jsonl --preset conservative --max-new-tokens 512
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `optimal-sampling` console script. Returns the exit status: 0 done, 2 user error (one
    line on stderr), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as e:
        message = " ".join(str(e).splitlines())  # one line, whatever a wrapped library error held
        print(f"optimal-sampling {args.command}: error: {message}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimal-sampling",
        description="Sample from q* ∝ pi_theta^(1-alpha) pi_t^alpha, the per-token KL-balanced geometric mixture of "
        "a policy and a teacher LM (alpha = the teacher's weight).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_generate_parser(commands) -> None:
    p = commands.add_parser(
        "generate",
        help="sample completions for a JSONL file of prompts, with per-token traces (resumable)",
        description="Offline data generation: one completion per input row, sampled token by token from q*.\n"
        "Rerun the same command after an interruption to resume: finished rows are kept, the rest is generated,\n"
        "and the result is byte-identical to an uninterrupted run with the same settings.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(run=generate_command)
    files = p.add_argument_group("files")
    files.add_argument("--policy", required=True, metavar="DIR", help="policy checkpoint (HF model + tokenizer)")
    files.add_argument("--teacher", required=True, metavar="DIR", help="teacher checkpoint, same vocabulary")
    files.add_argument("--input", required=True, metavar="JSONL", help='one {"prompt": ..., "id": ...} per line')
    files.add_argument("--output", required=True, metavar="JSONL", help="rows with traces; OUTPUT.meta.json beside")
    sampler = p.add_argument_group("sampler (flags left out keep the preset's value)")
    sampler.add_argument(
        "--preset", default="balanced", metavar="NAME", help=f"one of {', '.join(PRESET_NAMES)} (default: balanced)"
    )
    sampler.add_argument(
        "--alpha-method", default=argparse.SUPPRESS, metavar="METHOD", help=f"one of {', '.join(ALPHA_METHOD_NAMES)}"
    )
    sampler.add_argument(
        "--fixed-alpha",
        type=float,
        default=argparse.SUPPRESS,
        metavar="A",
        help="teacher weight in [0, 1] for --alpha-method fixed",
    )
    sampler.add_argument(
        "--teacher-top-p",
        type=_top_p,
        default=argparse.SUPPRESS,
        metavar="P",
        help="sample inside the teacher's top-p set, P in (0, 1], or 'none' for no constraint",
    )
    sampler.add_argument(
        "--force-teacher-tokens",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="the first N tokens come from the teacher (0 = off)",
    )
    sampler.add_argument(
        "--temperature", type=float, default=argparse.SUPPRESS, metavar="T", help="both models' temperature"
    )
    prompts = p.add_argument_group("prompts")
    prompts.add_argument(
        "--policy-template", default="{prompt}", metavar="TEMPLATE", help="the policy's prompt (default: '{prompt}')"
    )
    prompts.add_argument(
        "--teacher-chat-template",
        metavar="FILE_OR_JINJA",
        help="a Jinja file or string replacing the teacher tokenizer's chat template",
    )
    prompts.add_argument("--system-prompt", metavar="TEXT", help="a system turn for the teacher")
    run = p.add_argument_group("run")
    run.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N", help="(default: 256)")
    run.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="prompts per batch (default: 8)")
    run.add_argument(
        "--seed", type=int, default=0, metavar="S", help="batch seeds derive from (seed, first row) (default: 0)"
    )
    run.add_argument("--device", choices=("cpu", "cuda"), help="(default: cuda when available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, help="model weights (default: bfloat16 on cuda, float32 on cpu)")


def _add_demo_parser(commands) -> None:
    p = commands.add_parser("demo", help="train tiny models on a synthetic task and compare samplers")
    p.set_defaults(run=demo_command)
    p.add_argument("--out", dest="out_dir", default="demo_out", metavar="DIR", help="(default: demo_out)")
    p.add_argument("--retrain", action="store_true", help="retrain the task models instead of using the cache")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--num-problems", type=_positive_int, metavar="N", help="(default: the demo's own)")


def demo_command(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo as demo
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.demo":
            raise
        raise CliError("this installation has no demo module (recipe/optimal_sampling/demo.py)") from None
    kwargs = {"out_dir": args.out_dir, "retrain": args.retrain, "seed": args.seed}
    if args.num_problems is not None:
        kwargs["num_problems"] = args.num_problems
    try:
        demo(**kwargs)
    except ValueError as e:  # bad settings, an unwritable --out or cache: checked before any training
        raise CliError(_one_line(e)) from None
    return 0


def generate_command(args: argparse.Namespace) -> int:
    # 1) settings, input, checkpoints and output: every user error surfaces before a model is loaded
    config, templates = _sampler_config(args), _templates(args)
    rows = read_prompts(args.input)
    for flag in ("policy", "teacher"):
        _check_model_dir(flag, getattr(args, flag))
    device, dtype = _device_and_dtype(args)
    with output_lock(args.output):
        check_writable(args.output)
        meta = _run_meta(args, config, templates, dtype)
        resume = plan_resume(args.output, rows, args.batch_size, meta)
        if resume.done == len(rows):
            print(f"{args.output} already holds all {len(rows)} rows: nothing to do", file=sys.stderr)
            return 0
        # 2) tokenizers, then every remaining prompt rendered and measured, then the models
        tokenizer, teacher_tokenizer = _load_tokenizers(args)
        templates = {**templates, "teacher_tokenizer": teacher_tokenizer}
        _check_prompts(args, rows[resume.done :], tokenizer, templates)
        sampler = _load_sampler(args, config, device, dtype, tokenizer, teacher_tokenizer)
        # 3) the sidecar, then the rows
        write_meta(args.output, meta)
        return _write_rows(args, sampler, tokenizer, templates, rows, resume)


def _write_rows(args, sampler, tokenizer, templates: dict, rows: list[InputRow], resume: Resume) -> int:
    """Generate rows[resume.done:] batch by batch, appending each batch durably. Batch `start` is sampled with
    `batch_seed(seed, start)`, so a resumed run writes what an uninterrupted one would."""
    from tqdm.auto import tqdm

    if resume.found or resume.partial:
        redo = (
            f" (the {resume.found - resume.done} written rows of a cut batch are redone)"
            if resume.found > resume.done
            else ""
        )
        print(
            f"resuming {args.output}: {resume.done} rows kept{redo}, {len(rows) - resume.done} to go", file=sys.stderr
        )
    start = resume.done
    with open_output(args.output, resume.keep_bytes) as f, tqdm(total=len(rows), initial=start, unit="row") as bar:
        try:
            for start in range(resume.done, len(rows), args.batch_size):
                batch = rows[start : start + args.batch_size]
                seed = batch_seed(args.seed, start)
                out = sampler.generate_text(
                    [r.prompt for r in batch], tokenizer, args.max_new_tokens, seed, **templates
                )
                append_rows(f, [output_line(row, out.row(i)) for i, row in enumerate(batch)])
                bar.update(len(batch))
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: {start} rows are in {args.output}; rerun the same command to resume", file=sys.stderr
            )
            return 130
        except (FloatingPointError, ValueError) as e:
            raise CliError(f"{e} (rows {start} onwards were not written)") from None
    return 0


def _sampler_config(args: argparse.Namespace):
    from .engine import SamplerConfig

    overrides = {name: getattr(args, name) for name in SAMPLER_FLAGS if hasattr(args, name)}
    try:
        return SamplerConfig.preset(args.preset, **overrides)
    except ValueError as e:
        raise CliError(f"invalid sampler settings: {e}") from None


def _templates(args: argparse.Namespace) -> dict:
    """policy_template, teacher_chat_template (a file's content or the Jinja string given), system_prompt."""
    try:
        args.policy_template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise CliError(
            f"--policy-template {args.policy_template!r} is not a format string with only {{prompt}} "
            f"({type(e).__name__}: {e}); write literal braces as {{{{ and }}}}"
        ) from None
    if "{prompt}" not in args.policy_template:
        raise CliError(f"--policy-template {args.policy_template!r} must contain {{prompt}}")
    chat_template = args.teacher_chat_template
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    elif chat_template is not None and "{{" not in chat_template and "{%" not in chat_template:
        raise CliError(f"--teacher-chat-template {chat_template!r} is neither a file nor a Jinja template")
    return {
        "policy_template": args.policy_template,
        "teacher_chat_template": chat_template,
        "system_prompt": args.system_prompt,
    }


def _check_model_dir(flag: str, path: str) -> None:
    """A local HF checkpoint: a directory with config.json and tokenizer files (checked before anything loads)."""
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise CliError(f"--{flag} {path} {what}: give a local checkpoint directory (config.json, weights, tokenizer)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"--{flag} {path} has no config.json: give a directory written by save_pretrained")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise CliError(
            f"--{flag} {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer next to the "
            f"model (tokenizer.save_pretrained('{path}'))"
        )


def _device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but torch sees no CUDA device: use --device cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return torch.device(device), dtype


def _run_meta(args: argparse.Namespace, config, templates: dict, dtype: str) -> dict:
    """What decides the rows: a resumed run must match it (the device may change). `*_files` fingerprint the
    checkpoints (weights, config, tokenizer, chat template; `io.checkpoint_files`), so a checkpoint replaced at
    the same path is refused; the sampler fields, seed, templates, dtype and max_new_tokens are the settings."""
    return {
        "policy": os.path.abspath(args.policy),
        "teacher": os.path.abspath(args.teacher),
        "policy_files": _fingerprint("policy", args.policy),
        "teacher_files": _fingerprint("teacher", args.teacher),
        "sampler": config.to_dict(),
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": dtype,
        **templates,
    }


def _fingerprint(flag: str, path: str) -> dict[str, str]:
    try:
        return checkpoint_files(path)
    except OSError as e:
        raise CliError(f"--{flag} {path}: cannot read the checkpoint's files ({e}): check the permissions") from None


def _load_tokenizers(args: argparse.Namespace):
    """Both tokenizers (seconds, no weights), checked to share one vocabulary."""
    from transformers import AutoTokenizer

    from .engine import check_shared_vocabulary

    tokenizer = _from_pretrained(AutoTokenizer, "policy", args.policy)
    teacher_tokenizer = _from_pretrained(AutoTokenizer, "teacher", args.teacher)
    try:  # before loading any weights: a mismatched pair should fail in seconds, not after minutes of loading
        check_shared_vocabulary(tokenizer, teacher_tokenizer)
    except ValueError as e:
        raise CliError(f"--policy {args.policy} and --teacher {args.teacher} do not fit together: {e}") from None
    return tokenizer, teacher_tokenizer


def _load_sampler(args: argparse.Namespace, config, device, dtype: str, tokenizer, teacher_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from .engine import DualSampler

    models = [
        _from_pretrained(AutoModelForCausalLM, flag, getattr(args, flag), dtype=getattr(torch, dtype)).to(device)
        for flag in ("policy", "teacher")
    ]
    try:
        return DualSampler(*models, config, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
    except ValueError as e:
        raise CliError(f"--policy {args.policy} and --teacher {args.teacher} do not fit together: {e}") from None


def _from_pretrained(cls, flag: str, path: str, **kwargs):
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the {flag} {cls.__name__} from {path}: {_one_line(e)}") from None


def _check_prompts(args: argparse.Namespace, rows: list[InputRow], tokenizer, templates: dict) -> None:
    """Render every prompt both ways and measure it against each model's positions (config.json), so a broken
    template or an over-long prompt is one clear error before the models load and before any row is written."""
    from transformers import AutoConfig

    from .engine import build_dual_prompts

    limits = {flag: _max_positions(AutoConfig, flag, getattr(args, flag)) for flag in ("policy", "teacher")}
    for row in rows:
        try:
            policy_ids, teacher_ids = build_dual_prompts([row.prompt], tokenizer, **templates)
        except ValueError as e:
            raise CliError(f"cannot build the prompts of input line {row.index + 1}: {_one_line(e)}") from None
        for flag, limit in limits.items():
            n = len(policy_ids[0] if flag == "policy" else teacher_ids[0])
            if limit is not None and n + args.max_new_tokens > limit:
                fix = f"lower --max-new-tokens to {limit - n}" if n < limit else "shorten the prompt"
                raise CliError(
                    f"{args.input} line {row.index + 1}: the {flag} prompt has {n} tokens and --max-new-tokens "
                    f"{args.max_new_tokens} needs {n + args.max_new_tokens} positions, but --{flag} "
                    f"{getattr(args, flag)} has max_position_embeddings={limit}: {fix}"
                )


def _max_positions(auto_config, flag: str, path: str) -> int | None:
    config = _from_pretrained(auto_config, flag, path)
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _top_p(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] or 'none', got {text!r}") from None


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""`optimal-sampling demo`: the whole method on a CPU in a few minutes, with no downloads.

1) train (or reuse cached) a strong tiny teacher and a weak tiny policy on the synthetic addition task;
2) sample held-out problems with policy-only, teacher-only and q* under each preset (dual prompts: the policy
   sees the plain template, the teacher its chat template);
3) print a table of task accuracy and alpha statistics, write per-token traces (`DIR/<arm>.jsonl`), a summary
   (`DIR/summary.json`) and an alpha picture (`DIR/alpha_traces.png`).
Knows nothing about verl.
"""

import json
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from .engine import DualSampler, SamplerConfig
from .metrics import reduce_metrics
from .tasks import addition
from .tasks.cache import CACHE_ENV, default_cache_dir, load_task_models
from .tasks.tokenizer import stop_token_ids

ARMS: dict[str, SamplerConfig] = {
    "policy_only": SamplerConfig(alpha_method="fixed", fixed_alpha=0.0),
    "teacher_only": SamplerConfig(alpha_method="fixed", fixed_alpha=1.0),
    "q_conservative": SamplerConfig.preset("conservative"),
    "q_balanced": SamplerConfig.preset("balanced"),
    "q_exploratory": SamplerConfig.preset("exploratory"),
}
TABLE_COLUMNS = ("arm", "accuracy", "alpha_mean", "alpha_p10", "alpha_p50", "alpha_p90", "forced", "single",
                 "kl_q_pi", "kl_q_teacher", "is_w_mean", "tok/s")  # fmt: skip


def run_demo(
    out_dir: str | Path = "demo_out",
    retrain: bool = False,
    seed: int = 0,
    num_problems: int = 200,
    max_new_tokens: int = 8,
) -> dict[str, dict]:
    """Runs the demo and returns {arm: summary}. Sampling is at temperature 1 (the RL setting)."""
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    out = Path(out_dir)
    check_writable_dir(out, "--out", "choose a writable --out directory")
    cache = default_cache_dir()
    if retrain or not (cache / "meta.json").exists():  # training will write next to the cache
        check_writable_dir(cache.parent, "the task-model cache", f"set {CACHE_ENV} to a writable directory")
    # 1) models
    models = load_task_models(retrain=retrain)
    tok = models.tokenizer
    problems = addition.make_problems(num_problems, seed=seed, split="test")
    policy_ids = [tok.encode(addition.policy_prompt(p.question), add_special_tokens=False) for p in problems]
    teacher_ids = [tok.encode(addition.teacher_prompt(p.question, tok), add_special_tokens=False) for p in problems]
    stops = tuple(stop_token_ids(tok))
    # 2) every arm on the same problems and seed
    summaries, samples = {}, {}
    for arm, cfg in tqdm(ARMS.items(), desc="sampling arms"):
        sampler = DualSampler(models.policy, models.teacher, cfg.replace(stop_token_ids=stops), tokenizer=tok)
        start = time.perf_counter()
        sample = sampler.generate(policy_ids, teacher_ids, max_new_tokens, seed=seed)
        elapsed = time.perf_counter() - start
        texts = tok.batch_decode(sample.token_ids, skip_special_tokens=True)
        rewards = [addition.reward(p, t) for p, t in zip(problems, texts, strict=True)]
        _write_traces(out / f"{arm}.jsonl", problems, texts, rewards, sample)
        metrics = reduce_metrics(sample.flat_traces(), prefix="")
        n_tokens = metrics["num_tokens"]
        summaries[arm] = {"accuracy": sum(rewards) / len(rewards), "tokens_per_s": n_tokens / elapsed, **metrics}
        samples[arm] = sample
    # 3) report
    (out / "summary.json").write_text(json.dumps({"seed": seed, "num_problems": num_problems, "arms": summaries},
                                                 indent=2, allow_nan=False))  # fmt: skip
    plot_alpha(samples, out / "alpha_traces.png")
    print(format_table(summaries))
    print(f"\ntraces: {out}/<arm>.jsonl   summary: {out}/summary.json   picture: {out}/alpha_traces.png")
    return summaries


def check_writable_dir(path: Path, what: str, fix: str) -> None:
    """Create `path` if needed and write a probe file there; a ValueError naming `what` and `fix` if that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable ({e.strerror or e}): {fix}") from None


def _write_traces(path: Path, problems, texts, rewards, sample) -> None:
    with path.open("w") as f:
        for i, (p, text, r) in enumerate(zip(problems, texts, rewards, strict=True)):
            row = {"question": p.question, "answer": p.answer, "text": text, "reward": r, **sample.row(i)}
            f.write(json.dumps(row, allow_nan=False) + "\n")  # the engine refuses non-finite logits


def format_table(summaries: dict[str, dict]) -> str:
    """A markdown table, one row per arm."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for arm, s in summaries.items():
        cells = [arm, f"{s['accuracy']:.1%}"]
        cells += [f"{s[k]:.3f}" if k in s else "n/a" for k in ("alpha_mean", "alpha_p10", "alpha_p50", "alpha_p90")]
        cells += [
            f"{s['forced_frac']:.1%}",
            f"{s['single_support_frac']:.1%}",
            f"{max(s['kl_q_policy'], 0.0):.3f}",  # KL >= 0: hide float noise like -1e-9
            f"{max(s['kl_q_teacher'], 0.0):.3f}",
        ]
        cells += [f"{s['is_weight_mean']:.2f}", f"{s['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_alpha(samples: dict, path: Path, n_traces: int = 6) -> None:
    """Left: alpha per generated position for a few q* samples; right: histogram of solved (unforced) alphas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed = {arm: s for arm, s in samples.items() if arm.startswith("q_")}
    fig, (ax_trace, ax_hist) = plt.subplots(1, 2, figsize=(11, 4))
    for (arm, sample), color in zip(mixed.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        for i in range(min(n_traces, len(sample.alpha))):
            ax_trace.plot(sample.alpha[i], marker="o", color=color, alpha=0.6, label=arm if i == 0 else None)
        rows = zip(sample.alpha, sample.forced, sample.support_size, strict=True)
        free = [a for seq, f, s in rows for a, x, n in zip(seq, f, s, strict=True) if not x and n > 1]
        ax_hist.hist(free, bins=40, range=(0, 1), histtype="step", color=color, label=arm)
    ax_trace.set(xlabel="generated position", ylabel="alpha (teacher weight)", ylim=(-0.02, 1.02),
                 title="alpha per token (1 = forced to the teacher)")  # fmt: skip
    ax_hist.set(xlabel="alpha (unforced tokens with > 1 candidate)", ylabel="tokens", title="alpha histogram")
    ax_trace.legend(fontsize=8)
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

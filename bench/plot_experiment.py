"""Learning curves, tables and per-arm statistics of the end-to-end experiment (docs/experiments.md) from the runs'
metrics files: EXP_DIR/<arm>/seed<k>/metrics.jsonl, verl's `file` logger (one line per step, {"step", "data"};
step 0 = the validation before training), or the compact metrics.jsonl.gz (scripts/experiments/compact_metrics.py).

    python3 bench/plot_experiment.py --exp-dir outputs/experiments --out docs/experiments --target 0.21

Writes into --out: `curves.png` (held-out policy-only accuracy against steps, against cumulative rollout forward
tokens and against cumulative wall-clock; mean +- std over seeds), `tables.md` (accuracy at fixed steps, steps /
forward tokens / seconds to reach the target accuracy, per-arm alpha, IS-weight and cost statistics) and
`summary.json` (the same numbers). Std is the sample std over seeds (ddof = 1; 0 for one seed). With
`--replicates OTHER_DIR` (another launch of the same arms and seeds, possibly stopped early) tables.md also gets the
run-to-run accuracy differences of each arm and seed and the accuracy pooled over both launches.

Compute: forward tokens are the servers' per-step counts (`optimal_sampling/policy_forward_tokens` +
`--teacher-cost` x `optimal_sampling/teacher_forward_tokens`), summed over the steps up to the validation;
wall-clock is the sum of verl's `timing_s/step` (rollout, training and weight sync; start-up and validation left out).
Seconds compare only on one kind of card under one load: `run.json` beside each metrics file (run_arm.sh) names
both; the target table lists them per arm, and the legend names each arm's card when the arms used several.
Knows nothing about verl or the recipe: it reads JSON lines.
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "experiments"))
from run_status import VAL_KEY as ACC  # noqa: E402  (verl's file logger: one reader for the launcher and the plots)
from run_status import metrics_files, read_rows  # noqa: E402

POLICY_TOKENS = "optimal_sampling/policy_forward_tokens"
TEACHER_TOKENS = "optimal_sampling/teacher_forward_tokens"
STEP_SECONDS = "timing_s/step"
REACH = ("step", "tokens", "seconds")  # what first_reach returns
SLACK = 0.01  # equal_compute_table: a budget's relative slack (seeds of one arm differ a little in compute)
ARM_ORDER = (
    *("on_policy", "balanced", "conservative", "exploratory", "fixed_alpha_0.5", "fixed_alpha_1", "ess_balance"),
    *("mixed_1of8", "mixed_4of8"),
    *("opd", "control", "mixed", "imitation", "positive", "mixed_pb", "mixed_pb_critic", "imitation_critic"),  # guided
)
STATS = (  # per-arm means over training steps and seeds: (column, metric)
    ("alpha mean", "optimal_sampling/alpha_mean"),
    ("alpha p10", "optimal_sampling/alpha_p10"),
    ("alpha p50", "optimal_sampling/alpha_p50"),
    ("alpha p90", "optimal_sampling/alpha_p90"),
    ("forced frac", "optimal_sampling/forced_frac"),
    ("single-support frac", "optimal_sampling/single_support_frac"),
    ("KL(q*‖pi)", "optimal_sampling/kl_q_policy"),
    ("IS w mean", "rollout_corr/rollout_is_mean"),
    ("IS w ESS", "rollout_corr/rollout_is_eff_sample_size"),
    ("IS w > C frac", "rollout_corr/rollout_is_ratio_fraction_high"),
    ("train reward", "critic/score/mean"),
    ("guided frac", "optimal_sampling/guided_frac"),  # added after the 2026-11-27 runs
    ("zero-adv frac", "optimal_sampling/zero_advantage_frac"),  # added after the 2026-11-27 runs
    ("critic beta", "optimal_sampling/critic_coef"),  # the guided estimator's (issue 11)
    ("critic log pi_t/pi", "optimal_sampling/critic_logratio_mean"),
    ("critic scored frac", "optimal_sampling/critic_scored_frac"),
    ("policy tok/step", POLICY_TOKENS),
    ("teacher tok/step", TEACHER_TOKENS),
    ("s/step", STEP_SECONDS),
    ("gen s/step", "timing_s/gen"),
    ("server-trainer abs diff log pi", "optimal_sampling/logp_policy_server_vs_trainer"),
)


@dataclass
class Run:
    """One run's validation curve; x-values are cumulative up to and including each validation step."""

    steps: np.ndarray  # (K,) validation steps (0 = before training)
    acc: np.ndarray  # (K,) held-out policy-only accuracy
    tokens: np.ndarray  # (K,) cumulative compute: (1 + train_cost) x policy + teacher_cost x teacher forward tokens
    seconds: np.ndarray  # (K,) cumulative wall-clock of the steps
    train_rows: list[dict]  # the metrics of each training step (step >= 1) that were logged
    measured_on: str = ""  # the card and its load, from run.json beside the metrics ("" when unknown)
    estimated: tuple[int, ...] = ()  # training steps whose metrics were lost (resume), compute taken from neighbours


def build_run(rows: list[dict], teacher_cost: float = 1.0, train_cost: float = 0.0) -> Run:
    """Validation points of one run with cumulative compute. A training step (1 .. the last step) whose token and
    timing metrics are missing, as when a run stopped between verl's checkpoint of the step and its log line was
    resumed from that checkpoint, gets the mean compute of its nearest logged neighbours and is listed in
    `estimated`; a run that logged no training step is an error (the x-axes would silently be wrong)."""
    keys = (POLICY_TOKENS, TEACHER_TOKENS, STEP_SECONDS)
    train = sorted((r for r in rows if r["step"] >= 1 and all(r["data"].get(k) is not None for k in keys)),
                   key=lambda r: r["step"])  # fmt: skip
    last = max((r["step"] for r in rows), default=0)
    if last >= 1 and not train:
        raise ValueError(f"no training step has {list(keys)}: were the runs made with scripts/experiments?")
    cost = {  # the trainer recomputes and updates on the same sequences the policy ran forward in the rollout
        r["step"]: (1 + train_cost) * r["data"][POLICY_TOKENS] + teacher_cost * r["data"][TEACHER_TOKENS] for r in train
    }
    wall = {r["step"]: r["data"][STEP_SECONDS] for r in train}
    estimated = tuple(s for s in range(1, last + 1) if s not in cost)
    logged = sorted(cost)
    for s in estimated:
        before = [t for t in logged if t < s][-1:]
        after = [t for t in logged if t > s][:1]
        cost[s] = float(np.mean([cost[t] for t in before + after]))
        wall[s] = float(np.mean([wall[t] for t in before + after]))
    val = sorted((r["step"], r["data"][ACC]) for r in rows if r["data"].get(ACC) is not None)
    steps = np.array([s for s, _ in val], dtype=np.int64)
    return Run(
        steps=steps,
        acc=np.array([a for _, a in val], dtype=np.float64),
        tokens=np.array([sum(v for k, v in cost.items() if k <= s) for s in steps], dtype=np.float64),
        seconds=np.array([sum(v for k, v in wall.items() if k <= s) for s in steps], dtype=np.float64),
        train_rows=[r["data"] for r in train],
        estimated=estimated,
    )


def load_runs(exp_dir: str, teacher_cost: float = 1.0, train_cost: float = 0.0) -> dict[str, dict[int, Run]]:
    """{arm: {seed: Run}} for every EXP_DIR/<arm>/seed<k>/metrics.jsonl (or its compact .gz), arms in the issue's
    order."""
    runs: dict[str, dict[int, Run]] = {}
    for path in metrics_files(exp_dir):
        seed_dir = os.path.basename(os.path.dirname(path))
        arm = os.path.basename(os.path.dirname(os.path.dirname(path)))
        match = re.fullmatch(r"seed(\d+)", seed_dir)
        rows = read_rows(path)
        if match and rows:
            run = build_run(rows, teacher_cost, train_cost)
            run.measured_on = measured_on(os.path.join(os.path.dirname(path), "run.json"))
            runs.setdefault(arm, {})[int(match.group(1))] = run
    if not runs:
        raise ValueError(f"no runs under {exp_dir!r} (expected <arm>/seed<k>/metrics.jsonl): run run_all.sh first")
    return in_arm_order(runs)


def measured_on(run_json: str) -> str:
    """ "NVIDIA H200, 3 runs/GPU" from run_arm.sh's run.json ("" without one, or without its device field): seconds
    compare only between runs on one kind of card under one load."""
    if not os.path.exists(run_json):
        return ""
    with open(run_json) as f:
        info = json.load(f)
    if not info.get("device"):
        return ""
    return f"{info['device']}, {info.get('runs_per_gpu', '?')} runs/GPU"


def card(measured_on: str) -> str:
    """The card's short name in a measured_on() string ("NVIDIA H100 80GB HBM3, 4 runs/GPU" -> "H100"; "?": unknown)."""
    name = measured_on.split(",")[0].removeprefix("NVIDIA ").split()
    return name[0] if name else "?"


def in_arm_order(runs: dict) -> dict:
    """The arms in the issue's order (ARM_ORDER), then any others by name."""
    order = {arm: i for i, arm in enumerate(ARM_ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def fmt(values: list[float], n_seeds: int, digits: int = 3, missing: str = "-") -> str:
    """Mean ± std over the seeds that have a value, "(k/n seeds)" when some lack one, `missing` when all do."""
    if not values:
        return missing
    m, s = mean_std(values)
    text = f"{_num(m, digits)} ± {_num(s, digits)}"
    return text if len(values) == n_seeds else f"{text} ({len(values)}/{n_seeds} seeds)"


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def acc_at(run: Run, step: int) -> float | None:
    hit = np.nonzero(run.steps == step)[0]
    return float(run.acc[hit[0]]) if hit.size else None


def first_reach(run: Run, target: float) -> tuple[int, float, float] | None:
    """(step, cumulative forward tokens, cumulative seconds) at the first validation with accuracy >= target."""
    hit = np.nonzero(run.acc >= target)[0]
    if not hit.size:
        return None
    i = int(hit[0])
    return int(run.steps[i]), float(run.tokens[i]), float(run.seconds[i])


def accuracy_table(runs: dict[str, dict[int, Run]], at_steps: list[int]) -> str:
    head = "| arm | seeds | " + " | ".join(f"acc @ step {s}" for s in at_steps) + " |"
    lines = [head, "|---" * (2 + len(at_steps)) + "|"]
    for arm, seeds in runs.items():
        cells = [fmt([a for r in seeds.values() if (a := acc_at(r, s)) is not None], len(seeds)) for s in at_steps]
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(runs: dict[str, dict[int, Run]], step: int) -> str:
    """Every seed's accuracy at one validation step, sorted: shows overlaps that a mean ± std hides."""
    lines = [f"| arm | accuracy @ step {step}, each seed (ascending) |", "|---|---|"]
    for arm, seeds in runs.items():
        values = sorted(a for r in seeds.values() if (a := acc_at(r, step)) is not None)
        lines.append(f"| {arm} | " + (", ".join(f"{a:.3f}" for a in values) or "-") + " |")
    return "\n".join(lines)


def replicate_table(runs: dict[str, dict[int, Run]], other: dict[str, dict[int, Run]]) -> str:
    """The same arm and seed launched twice: accuracy differences at the validation steps both launches have
    (step 0 left out: it is before any training and the same by construction)."""
    lines = [
        "| arm | runs launched twice | validations compared | mean abs diff | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for arm, seeds in runs.items():
        diffs, pairs = [], 0
        for seed, run in seeds.items():
            twin = other.get(arm, {}).get(seed)
            if twin is None:
                continue
            common = sorted(set(run.steps.tolist()) & set(twin.steps.tolist()) - {0})
            pairs += bool(common)
            diffs += [abs(acc_at(run, s) - acc_at(twin, s)) for s in common]
        cells = f"{float(np.mean(diffs)):.3f} | {max(diffs):.3f}" if diffs else "- | -"
        lines.append(f"| {arm} | {pairs} | {len(diffs)} | {cells} |")
    return "\n".join(lines)


def pooled(runs: dict[str, dict[int, Run]], other: dict[str, dict[int, Run]]) -> dict[str, dict[str, Run]]:
    """Both launches' runs per arm, keyed "seed<k>" and "seed<k>'" (the other launch)."""
    out: dict[str, dict[str, Run]] = {}
    for arm in runs.keys() | other.keys():
        out[arm] = {f"seed{k}": r for k, r in runs.get(arm, {}).items()}
        out[arm].update({f"seed{k}'": r for k, r in other.get(arm, {}).items()})
    return in_arm_order(out)


def target_table(runs: dict[str, dict[int, Run]], target: float, compute: str = "forward tokens") -> str:
    lines = [
        f"| arm | seeds reaching {target:g} | steps | {compute} | seconds | seconds measured on |",
        "|---|---|---|---|---|---|",
    ]
    for arm, seeds in runs.items():
        hits = [h for r in seeds.values() if (h := first_reach(r, target)) is not None]
        cols = [fmt([h[i] for h in hits], len(seeds), d, "not reached") for i, d in ((0, 1), (1, 0), (2, 1))]
        cols.append("; ".join(sorted({r.measured_on for r in seeds.values()} - {""})) or "?")
        lines.append(f"| {arm} | {len(hits)}/{len(seeds)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def stats_table(runs: dict[str, dict[int, Run]]) -> str:
    """Per-arm means over all training steps of all seeds (blank where an arm never logged the metric; a metric no
    arm logged has no column)."""
    cells = {arm: {} for arm in runs}
    for arm, seeds in runs.items():
        for name, key in STATS:
            values = [row[key] for r in seeds.values() for row in r.train_rows if row.get(key) is not None]
            cells[arm][name] = f"{float(np.mean(values)):.4g}" if values else ""
    names = [name for name, _ in STATS if any(cells[arm][name] for arm in runs)]
    lines = ["| arm | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    lines += [f"| {arm} | " + " | ".join(cells[arm][name] for name in names) + " |" for arm in runs]
    return "\n".join(lines)


def curve_band(seeds: dict[int, Run], x_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean and std of the accuracy at the validation steps every seed has."""
    common = sorted(set.intersection(*(set(r.steps.tolist()) for r in seeds.values())))
    xs, accs = [], []
    for r in seeds.values():
        idx = [int(np.nonzero(r.steps == s)[0][0]) for s in common]
        xs.append(x_of(r)[idx])
        accs.append(r.acc[idx])
    acc = np.stack(accs)  # (S, K)
    std = acc.std(axis=0, ddof=1) if len(accs) > 1 else np.zeros(acc.shape[1])
    return np.stack(xs).mean(axis=0), acc.mean(axis=0), std, np.asarray(common)


def equal_compute_table(runs: dict[str, dict[int, Run]], ref: str, fractions=(0.25, 0.5, 1.0, 2.0)) -> str:
    """Accuracy of every arm at budgets of compute given as fractions of arm `ref`'s mean compute at its last step:
    per seed, the last validation whose cumulative compute is within the budget, with 1% of slack for the seeds'
    spread around the mean (a run that ended below a budget counts with its last validation; such cells are marked
    *)."""
    if ref not in runs:
        raise ValueError(f"--compute-ref {ref!r} is not an arm here (arms: {', '.join(runs)})")
    full = float(np.mean([r.tokens[-1] for r in runs[ref].values()]))
    head = " | ".join(f"{f:g} x {ref} ({f * full:.3g})" for f in fractions)
    lines = [f"| arm | seeds | {head} |", "|---" * (2 + len(fractions)) + "|"]
    for arm, seeds in runs.items():
        cells = []
        for f in fractions:
            budget = f * full * (1 + SLACK)
            accs = [float(r.acc[np.nonzero(r.tokens <= budget)[0][-1]]) for r in seeds.values()]
            ended = any(r.tokens[-1] * (1 + SLACK) < f * full for r in seeds.values())
            cells.append(fmt(accs, len(seeds)) + (" *" if ended else ""))
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    runs: dict[str, dict[int, Run]],
    path: str,
    target: float | None = None,
    compute: str = "rollout forward tokens",
    task: str = "addition",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = (
        ("GRPO step", lambda r: r.steps.astype(np.float64)),
        (f"{compute} (policy + teacher)", lambda r: r.tokens),
        ("wall-clock of the steps (s)", lambda r: r.seconds),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    cards = {card(r.measured_on) for seeds in runs.values() for r in seeds.values()}
    for arm, seeds in runs.items():
        # several cards: the legend names each arm's, as the wall-clock axis only compares within one
        label = f"{arm} (n={len(seeds)}" + (
            f", {'/'.join(sorted({card(r.measured_on) for r in seeds.values()}))})" if len(cards) > 1 else ")"
        )
        for ax, (_, x_of) in zip(axes, axes_spec, strict=True):
            x, mean, std, _ = curve_band(seeds, x_of)
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, (label, _) in zip(axes, axes_spec, strict=True):
        ax.set(xlabel=label)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1)
    axes[0].set(ylabel="held-out accuracy, policy alone (greedy)")
    handles, labels = axes[0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 5)
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle(f"GRPO on the {task} task: policy-only held-out accuracy, mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(runs: dict[str, dict[int, Run]], at_steps: list[int], target: float) -> dict:
    """The tables' per-seed numbers (None = no validation at that step / target not reached)."""
    out = {}
    for arm, seeds in runs.items():
        hits = {seed: first_reach(r, target) for seed, r in seeds.items()}
        out[arm] = {
            "acc_at_step": {s: {seed: acc_at(r, s) for seed, r in seeds.items()} for s in at_steps},
            "reach_target": {seed: None if h is None else dict(zip(REACH, h, strict=True)) for seed, h in hits.items()},
        }
    return {"target": target, "at_steps": at_steps, "arms": out}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", default="outputs/experiments", help="<arm>/seed<k>/metrics.jsonl live here")
    parser.add_argument("--out", default="docs/experiments", help="folder for curves.png, tables.md, summary.json")
    parser.add_argument("--target", type=float, default=0.21, help="accuracy to reach (pre-registered: 0.21)")
    parser.add_argument("--at-steps", default="0,10,20,30,40", help="comma-separated validation steps for the table")
    parser.add_argument("--teacher-cost", type=float, default=1.0, help="a teacher forward token in policy tokens")
    parser.add_argument(
        "--train-cost",
        type=float,
        default=0.0,
        help="training compute per rollout policy token, in policy forward tokens (e.g. 4: the old-log-prob forward "
        "and a forward + backward of the update); 0 = rollout only",
    )
    parser.add_argument("--compute-ref", default=None, help="an arm: adds accuracy at fractions of its compute")
    parser.add_argument("--task", default="addition", help="the task's name, for the plot's title")
    parser.add_argument(
        "--replicates",
        default=None,
        help="another launch of the same arms and seeds (complete or stopped early): run-to-run differences and "
        "accuracy pooled over both launches, as extra tables",
    )
    args = parser.parse_args(argv)
    costs = (args.teacher_cost, args.train_cost)
    if not (0 < args.target <= 1 and all(c >= 0 and math.isfinite(c) for c in costs)):
        raise ValueError(
            f"--target must be in (0, 1], --teacher-cost and --train-cost >= 0: got {args.target}, {costs[0]}, "
            f"{costs[1]}"
        )
    at_steps = [int(s) for s in args.at_steps.split(",") if s.strip()]
    runs = load_runs(args.exp_dir, args.teacher_cost, args.train_cost)
    compute = "compute in policy-token forwards" if args.train_cost else "forward tokens"
    axis = compute if args.train_cost else "rollout forward tokens"
    os.makedirs(args.out, exist_ok=True)
    plot_curves(runs, os.path.join(args.out, "curves.png"), args.target, axis, args.task)
    tables = [
        "### Held-out accuracy of the policy alone (greedy), mean ± std over seeds\n\n"
        + accuracy_table(runs, at_steps),
        f"### To reach accuracy {args.target:g} (first validation at or above it)\n\n"
        + target_table(runs, args.target, compute),
        f"### Each seed at step {at_steps[-1]}\n\n" + seed_table(runs, at_steps[-1]),
        "### Per-arm statistics (means over training steps and seeds)\n\n" + stats_table(runs),
    ]
    if args.compute_ref:
        tables.append(
            f"### Accuracy at equal compute ({compute}, fractions of {args.compute_ref}'s at its last step)\n\n"
            + equal_compute_table(runs, args.compute_ref)
        )
    lost = [f"{arm}/seed{seed}: step {', '.join(map(str, r.estimated))}"
            for arm, seeds in runs.items() for seed, r in seeds.items() if r.estimated]  # fmt: skip
    if lost:
        tables.append(
            "### Steps whose metrics were lost at a resume (compute: the mean of the neighbouring steps)\n\n"
            + "\n".join(f"- {line}" for line in lost)
        )
    if args.replicates:
        other = load_runs(args.replicates, args.teacher_cost, args.train_cost)
        both = pooled(runs, other)
        tables += [
            "### The same arm and seed, launched twice (this launch against --replicates)\n\n"
            + replicate_table(runs, other),
            "### Accuracy pooled over both launches (runs per arm in the second column)\n\n"
            + accuracy_table(both, at_steps),
        ]
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary(runs, at_steps, args.target), f, indent=1)
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()

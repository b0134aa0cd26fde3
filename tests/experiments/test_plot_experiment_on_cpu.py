"""bench/plot_experiment.py on metrics files this test writes itself (verl's `file` logger layout): the tables'
means and stds against values computed here with the standard library, steps / tokens / seconds to target, missing
targets and missing steps, the written plot and summary, and errors on files the x-axes cannot be built from."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "plot_experiment.py"
ACC = "optimal_sampling/val_policy_only_accuracy"
VAL_STEPS = (0, 2, 4)


def load_script():
    spec = importlib.util.spec_from_file_location("plot_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = load_script()

# arm -> seed -> accuracy at VAL_STEPS; per-step cost: (policy tokens, teacher tokens, seconds)
ACCURACY = {
    "on_policy": {0: [0.10, 0.20, 0.40], 1: [0.10, 0.15, 0.25], 2: [0.10, 0.35, 0.45]},
    "balanced": {0: [0.10, 0.30, 0.50], 1: [0.10, 0.50, 0.60], 2: [0.10, 0.20, 0.30]},
    "fixed_alpha_1": {0: [0.10, 0.10, 0.12], 1: [0.10, 0.11, 0.13]},
}
COST = {"on_policy": (100.0, 0.0, 2.0), "balanced": (100.0, 150.0, 3.0), "fixed_alpha_1": (100.0, 150.0, 3.5)}
TARGET = 0.3


def step_cost(arm: str, seed: int, step: int) -> tuple[float, float, float]:
    """Costs vary by seed and step so that sums are not multiples of one number."""
    policy, teacher, seconds = COST[arm]
    return policy + seed + step, teacher and teacher + 2 * step, seconds + 0.1 * step


def write_run(exp_dir: Path, arm: str, seed: int, accuracy: list[float], truncate: bool = False) -> None:
    rows = [{"step": 0, "data": {ACC: accuracy[0], "val-core/x/reward/mean@1": accuracy[0]}}]
    for step in range(1, VAL_STEPS[-1] + 1):
        policy, teacher, seconds = step_cost(arm, seed, step)
        data = {
            "optimal_sampling/policy_forward_tokens": policy,
            "optimal_sampling/teacher_forward_tokens": teacher,
            "timing_s/step": seconds,
            "optimal_sampling/alpha_mean": 0.1 * seed + 0.01 * step,
            "rollout_corr/rollout_is_mean": 0.5,
        }
        if step in VAL_STEPS:
            data[ACC] = accuracy[VAL_STEPS.index(step)]
        rows.append({"step": step, "data": data})
    run = exp_dir / arm / f"seed{seed}"
    run.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"step": 5, "da' if truncate else ""))


@pytest.fixture
def exp_dir(tmp_path) -> Path:
    for arm, seeds in ACCURACY.items():
        for seed, accuracy in seeds.items():
            write_run(tmp_path / "exp", arm, seed, accuracy, truncate=(arm, seed) == ("balanced", 2))
    (tmp_path / "exp" / "task").mkdir()  # the task folder next to the runs is not a run
    return tmp_path / "exp"


def cell(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_row(markdown: str, arm: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {arm} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def first_reach(arm: str, seed: int) -> tuple[int, float, float] | None:
    """Independent of the script: the first validation step at or above TARGET and the sums of the step costs."""
    for step, acc in zip(VAL_STEPS, ACCURACY[arm][seed], strict=True):
        if acc >= TARGET:
            costs = [step_cost(arm, seed, s) for s in range(1, step + 1)]
            return step, sum(p + t for p, t, _ in costs), sum(s for _, _, s in costs)
    return None


def test_accuracy_table_means_and_stds_over_seeds(exp_dir):
    runs = plot.load_runs(str(exp_dir))
    assert list(runs) == ["on_policy", "balanced", "fixed_alpha_1"]  # the order
    table = plot.accuracy_table(runs, [0, 2, 4, 6])
    for arm, seeds in ACCURACY.items():
        row = table_row(table, arm)
        assert row[1] == str(len(seeds))
        for i, step in enumerate((0, 2, 4)):
            assert row[2 + i] == cell([acc[VAL_STEPS.index(step)] for acc in seeds.values()]), (arm, step)
        assert row[5] == "-"  # no run got to step 6


def test_steps_and_compute_to_target_with_missing_targets(exp_dir):
    table = plot.target_table(plot.load_runs(str(exp_dir)), TARGET)
    for arm, seeds in ACCURACY.items():
        hits = [h for seed in seeds if (h := first_reach(arm, seed)) is not None]
        row = table_row(table, arm)
        assert row[1] == f"{len(hits)}/{len(seeds)}"
        if not hits:
            assert row[2:5] == ["not reached"] * 3
            continue
        suffix = "" if len(hits) == len(seeds) else f" ({len(hits)}/{len(seeds)} seeds)"
        expected = [cell([h[0] for h in hits], 1), cell([h[1] for h in hits], 0), cell([h[2] for h in hits], 1)]
        assert row[2:5] == [e + suffix for e in expected], arm
        assert row[5] == "?"  # no run.json: the card is unknown
    assert table_row(table, "on_policy")[1] == "2/3"  # seed 1 never reaches 0.3
    assert table_row(table, "fixed_alpha_1")[2] == "not reached"


def test_teacher_cost_weights_the_teacher_tokens(exp_dir):
    run = plot.load_runs(str(exp_dir), teacher_cost=2.0)["balanced"][0]
    costs = [step_cost("balanced", 0, s) for s in range(1, 5)]
    assert run.tokens.tolist() == [0.0, sum(p + 2 * t for p, t, _ in costs[:2]), sum(p + 2 * t for p, t, _ in costs)]
    assert run.seconds.tolist() == pytest.approx([0.0, sum(s for *_, s in costs[:2]), sum(s for *_, s in costs)])


def test_train_cost_counts_the_trained_sequences_in_policy_forwards(exp_dir):
    run = plot.load_runs(str(exp_dir), teacher_cost=2.0, train_cost=4.0)["balanced"][1]
    costs = [step_cost("balanced", 1, s) for s in range(1, 5)]
    assert run.tokens.tolist() == [
        0.0,
        sum(5 * p + 2 * t for p, t, _ in costs[:2]),
        sum(5 * p + 2 * t for p, t, _ in costs),
    ]


def test_a_step_whose_metrics_were_lost_gets_its_neighbours_compute(tmp_path):
    """A run resumed from a checkpoint whose step was never logged: that step has only the resumed attempt's
    validation row. Its compute is the mean of the steps around it, and the run lists it."""
    write_run(tmp_path, "on_policy", 0, ACCURACY["on_policy"][0])
    path = tmp_path / "on_policy" / "seed0" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["data"] = {ACC: 0.2}  # step 2: training metrics lost, validation kept
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = plot.load_runs(str(tmp_path))["on_policy"][0]
    assert run.estimated == (2,)
    c = {s: step_cost("on_policy", 0, s) for s in range(1, 5)}
    step2 = ((c[1][0] + c[3][0]) / 2, (c[1][2] + c[3][2]) / 2)  # tokens, seconds
    assert run.tokens.tolist() == pytest.approx([0.0, c[1][0] + step2[0], c[1][0] + step2[0] + c[3][0] + c[4][0]])
    assert run.seconds[1] == pytest.approx(c[1][2] + step2[1])
    assert len(run.train_rows) == 3  # the statistics read only what was logged
    out = tmp_path / "report"
    plot.main(["--exp-dir", str(tmp_path), "--out", str(out), "--at-steps", "0,4"])
    assert "- on_policy/seed0: step 2" in (out / "tables.md").read_text()


def test_equal_compute_table_against_a_naive_reference(exp_dir):
    """Each arm's accuracy at fractions of the reference arm's mean final compute: per seed, the last validation
    within the budget (1% slack); * where a seed ended below the budget."""
    runs = plot.load_runs(str(exp_dir), teacher_cost=2.0)
    table = plot.equal_compute_table(runs, "on_policy", fractions=(0.5, 1.0, 2.0))
    full = statistics.mean(
        sum(p + 2 * t for p, t, _ in (step_cost("on_policy", seed, s) for s in range(1, 5))) for seed in range(3)
    )
    for arm, seeds in ACCURACY.items():
        row = table_row(table, arm)
        for col, f in enumerate((0.5, 1.0, 2.0)):
            accs, ended = [], False
            for seed, acc in seeds.items():
                cum = [0.0]
                for s in range(1, 5):
                    p, t, _ = step_cost(arm, seed, s)
                    cum.append(cum[-1] + p + 2 * t)
                at_val = [cum[s] for s in VAL_STEPS]
                accs.append([a for a, x in zip(acc, at_val, strict=True) if x <= f * full * 1.01][-1])
                ended |= at_val[-1] * 1.01 < f * full
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            assert row[2 + col] == f"{mean:.3f} ± {std:.3f}" + (" *" if ended else ""), (arm, f)
    with pytest.raises(ValueError, match="--compute-ref 'nope'"):
        plot.equal_compute_table(runs, "nope")


def test_stats_table_averages_over_steps_and_seeds(exp_dir):
    table = plot.stats_table(plot.load_runs(str(exp_dir)))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = table_row(table, "balanced")
    alpha = [0.1 * seed + 0.01 * step for seed in range(3) for step in range(1, 5)]
    assert row[header.index("alpha mean")] == f"{statistics.mean(alpha):.4g}"
    assert row[header.index("IS w mean")] == "0.5"
    assert row[header.index("teacher tok/step")] != "" and "IS w ESS" not in header  # no arm logged it: no column
    assert row[header.index("teacher tok/step")] and table_row(table, "on_policy")[header.index("IS w mean")] == "0.5"


def test_main_writes_plot_tables_and_summary(exp_dir, tmp_path):
    out = tmp_path / "docs"
    plot.main(["--exp-dir", str(exp_dir), "--out", str(out), "--target", str(TARGET), "--at-steps", "0,4"])
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    tables = (out / "tables.md").read_text()
    assert "acc @ step 4" in tables and "To reach accuracy 0.3" in tables and "alpha mean" in tables
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["on_policy"]["reach_target"]["1"] is None
    assert summary["arms"]["balanced"]["reach_target"]["0"]["step"] == 2
    assert summary["arms"]["fixed_alpha_1"]["acc_at_step"]["4"] == {"0": 0.12, "1": 0.13}


def test_files_the_axes_cannot_be_built_from_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no runs under"):
        plot.load_runs(str(tmp_path))
    run = tmp_path / "on_policy" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "data": {"timing_s/step": 1.0}}) + "\n")
    with pytest.raises(ValueError, match="policy_forward_tokens"):
        plot.load_runs(str(tmp_path))
    with pytest.raises(ValueError, match="--target"):
        plot.main(["--exp-dir", str(tmp_path), "--target", "0"])


def test_seed_table_lists_every_seed_sorted(exp_dir):
    table = plot.seed_table(plot.load_runs(str(exp_dir)), 4)
    for arm, seeds in ACCURACY.items():
        values = sorted(acc[VAL_STEPS.index(4)] for acc in seeds.values())
        assert table_row(table, arm)[1] == ", ".join(f"{a:.3f}" for a in values)


def test_replicates_give_run_to_run_differences_and_pooled_accuracy(exp_dir, tmp_path):
    """A second launch: on_policy seed 0 again with other accuracies, balanced seed 0 stopped after step 2."""
    other = tmp_path / "launch2"
    write_run(other, "on_policy", 0, [0.10, 0.25, 0.30])
    write_run(other, "balanced", 0, [0.10, 0.40, 0.50])
    (other / "balanced" / "seed0" / "metrics.jsonl").write_text(
        "".join(x for x in (other / "balanced" / "seed0" / "metrics.jsonl").read_text().splitlines(True)[:3])
    )
    runs, again = plot.load_runs(str(exp_dir)), plot.load_runs(str(other))
    table = plot.replicate_table(runs, again)
    assert table_row(table, "on_policy")[1:] == ["1", "2", f"{(0.05 + 0.10) / 2:.3f}", "0.100"]  # steps 2 and 4
    assert table_row(table, "balanced")[1:] == ["1", "1", "0.100", "0.100"]  # step 2 only (0.30 vs 0.40)
    assert table_row(table, "fixed_alpha_1")[1:] == ["0", "0", "-", "-"]
    pooled = plot.accuracy_table(plot.pooled(runs, again), [2, 4])
    on_policy = [acc for acc in ACCURACY["on_policy"].values()] + [[0.10, 0.25, 0.30]]
    assert table_row(pooled, "on_policy")[1:] == ["4", cell([a[1] for a in on_policy]), cell([a[2] for a in on_policy])]
    balanced_4 = [acc[2] for acc in ACCURACY["balanced"].values()]  # the second launch never got to step 4
    assert table_row(pooled, "balanced")[3] == cell(balanced_4) + " (3/4 seeds)"


def test_target_table_names_the_card_and_load_of_each_arm(exp_dir):
    """run.json (run_arm.sh) names the card and PER_GPU: seconds only compare on one card under one load, so the
    table lists every distinct one per arm; a run.json from before these fields counts as unknown."""
    info = {"arm": "balanced", "seed": 0, "seconds": 300}
    for seed, device, per_gpu in ((0, "NVIDIA H200", 3), (1, "NVIDIA H100 80GB HBM3", 4), (2, "NVIDIA H200", 3)):
        (exp_dir / "balanced" / f"seed{seed}" / "run.json").write_text(
            json.dumps(info | {"device": device, "runs_per_gpu": per_gpu})
        )
    (exp_dir / "on_policy" / "seed0" / "run.json").write_text(json.dumps(info))  # older run.json: no device
    table = plot.target_table(plot.load_runs(str(exp_dir)), TARGET)
    assert table_row(table, "balanced")[5] == "NVIDIA H100 80GB HBM3, 4 runs/GPU; NVIDIA H200, 3 runs/GPU"
    assert table_row(table, "on_policy")[5] == "?"
    balanced = plot.load_runs(str(exp_dir))["balanced"]
    assert [plot.card(balanced[seed].measured_on) for seed in range(3)] == ["H200", "H100", "H200"]  # the legend's
    assert plot.card("") == "?"  # short names

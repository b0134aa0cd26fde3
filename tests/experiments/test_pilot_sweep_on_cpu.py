"""The pilot sweep's driver: arm specs, the pilot command it builds, and the committed summary tables regenerated
from the committed rows."""

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "experiments"))

from pilot_sweep import command, finished_rows, parse_spec, summarize  # noqa: E402

PILOT_DIR = ROOT / "docs" / "experiments" / "guided" / "pilot"


def test_arm_specs_parse_and_bad_ones_are_refused():
    assert parse_spec("on_policy=on_policy") == ("on_policy", "on_policy", {})
    assert parse_spec("pb=mixed_1of8:baseline=policy,critic_coef=1.0") == (
        "pb", "mixed_1of8", {"baseline": "policy", "critic_coef": "1.0"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="label=arm"):
        parse_spec("mixed_1of8")


def test_the_pilot_command_carries_every_setting():
    args = SimpleNamespace(steps=7, eval_every=3, n_test=16, task="carry", device="cuda")
    cmd = command("balanced", {"mode": "imitation", "fade_critic": "true"}, "1e-4", 2, args, Path("x.tmp"))
    joined = " ".join(cmd)
    for part in ("--arms balanced", "--lrs 1e-4", "--seed 2", "--steps 7", "--eval-every 3", "--n-test 16",
                 "--task carry", "--device cuda", "--out x.tmp", "--mode imitation"):  # fmt: skip
        assert part in joined
    assert cmd[-1] == "--fade-critic"  # a bool flag takes no value


def test_finished_runs_are_summarised_per_spec_and_lr(tmp_path):
    for seed, acc in ((0, 0.1), (1, 0.3)):
        run = tmp_path / "runs" / "opd" / f"lr1e-4_seed{seed}.jsonl"
        run.parent.mkdir(parents=True, exist_ok=True)
        run.write_text(json.dumps({"lr": 1e-4, "seed": seed, "step": 5, "val_acc": acc}) + "\n")
    (tmp_path / "runs" / "opd" / "lr1e-4_seed2.tmp").write_text(json.dumps({"lr": 1e-4, "step": 5, "val_acc": 1.0}))
    table = summarize(finished_rows(tmp_path))
    assert "| opd | 0.0001 | 2 | 0.200 ± 0.141 |" in table  # the unfinished run is left out
    assert "| 3 | 0.467" in summarize(finished_rows(tmp_path, partial=True))


@pytest.mark.parametrize("name", sorted(p.name.removesuffix(".jsonl.gz") for p in PILOT_DIR.glob("*.jsonl.gz")))
def test_the_committed_pilot_tables_are_what_the_committed_rows_give(name):
    rows = [json.loads(line) for line in gzip.open(PILOT_DIR / f"{name}.jsonl.gz", "rt")]
    assert summarize(rows) == (PILOT_DIR / f"{name}.md").read_text()

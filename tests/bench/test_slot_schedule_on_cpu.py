"""bench/slot_schedule.py replays the continuous batcher's scheduling: its step counts equal what the real
`ContinuousBatcher` (tiny Qwen3 models, CPU) counts on the same caps, equal a naive round-by-round replay of the
serve loop, equal the committed GPU run's measured steps on that run's workload, and never beat the lower bounds."""

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest

from recipe.optimal_sampling import SamplerConfig
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine
from recipe.optimal_sampling.engine.fast.scheduler import ContinuousBatcher, Request, request_seed
from tests.engine.test_fast_engine_on_cpu import tiny_fast_qwen3

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sim = load("slot_schedule")


def naive_steps(caps: list[int], slots: int, check_every: int) -> int:
    """The serve loop step by step: admit into free slots in queue order, decode check_every steps (a row finishes
    on the step of its last token), free the finished rows at the check; stop when the queue and slots are empty."""
    queue, left, steps = list(caps), [0] * slots, 0  # left: tokens a slot's row still has to make (0 = free)
    while True:
        for s in range(slots):
            if left[s] == 0 and queue:
                left[s] = queue.pop(0)
        if not any(left):
            return steps
        for _ in range(check_every):
            left = [max(x - 1, 0) for x in left]
            steps += 1


@pytest.mark.parametrize("seed", range(20))
def test_replay_equals_the_naive_serve_loop_and_respects_the_bounds(seed):
    rng = random.Random(seed)
    caps = [max(1, round(rng.lognormvariate(2.0, 0.9))) for _ in range(rng.randint(1, 40))]
    slots, check_every = rng.randint(1, 9), rng.randint(1, 5)
    steps = sim.continuous_steps(caps, slots, check_every)
    assert steps == naive_steps(caps, slots, check_every)
    assert steps >= sim.lower_bound(caps, slots, check_every) >= sim.lower_bound(caps, slots) >= max(caps)
    assert sim.continuous_steps(sorted(caps, reverse=True), slots, check_every) >= sim.lower_bound(caps, slots, 1)
    assert sim.static_steps(caps, slots) >= sim.lower_bound(caps, slots)


@pytest.mark.parametrize(("slots", "check_every"), [(1, 1), (2, 3), (3, 2), (4, 1)])
def test_replay_equals_the_real_batchers_steps(slots, check_every):
    """The real batcher (no stop tokens: every request makes its cap, as random weights do in the benchmark)."""
    cfg = SamplerConfig.preset("balanced")
    engine = FastDualEngine(tiny_fast_qwen3(0, 64), tiny_fast_qwen3(1, 64), 64, use_graphs=False)
    caps = [5, 1, 9, 3, 7, 2, 6, 4, 8]
    prompts = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    reqs = [Request(*prompts[i % 2], cap, request_seed(0, i)) for i, cap in enumerate(caps)]
    batcher = ContinuousBatcher(engine, slots=slots, slot_len=16, check_every=check_every)
    out = batcher.run(reqs, cfg)
    assert [len(t) for t in out.token_ids] == caps
    assert batcher.steps == sim.continuous_steps(caps, slots, check_every)


def test_replay_equals_the_measured_gpu_run():
    """The committed H200 run of bench/grpo_rollout.py: its workload (the script's defaults, as documented) replayed
    gives the steps the engine counted there, for continuous and static batching."""
    measured = {r["method"]: r for r in map(json.loads, (ROOT / "bench/results/grpo_rollout_h200.jsonl").open())}
    rows = sim.main(["--prompts", "32", "--n", "8", "--slots", "64"])
    by = {r["policy"]: r for r in rows}
    assert by["fifo, check_every=4 (the engine)"]["tokens"] == measured["continuous"]["tokens"]
    assert by["fifo, check_every=4 (the engine)"]["steps"] == measured["continuous"]["steps"]
    assert by["static batches"]["steps"] == measured["static"]["steps"]
    assert by["lower bound max(ceil(N/S), longest)"]["steps"] == max(
        math.ceil(measured["continuous"]["tokens"] / 64), 1024
    )


def test_the_docs_table_is_the_scripts_output(capsys):
    """Every replay row docs/benchmarks.md shows is a line the documented command prints, and the committed results
    file is that command's whole output."""
    sim.main(["--prompts", "32", "--n", "8", "--slots", "64", "--scale", "1,2,4,16",
              "--measured", str(ROOT / "bench/results/grpo_rollout_h200.jsonl")])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed == (ROOT / "bench/results/slot_schedule_grpo_rollout_h200.md").read_text()
    doc = (ROOT / "docs/benchmarks.md").read_text().splitlines()
    shown = [line for line in doc if re.match(r"\| \d[\d,]* \| 64 \| [\d,]+ \| (fifo|longest|lower|static)", line)]
    assert len(shown) >= 10
    assert set(shown) <= set(printed.splitlines())

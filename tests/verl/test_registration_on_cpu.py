"""The `verl.plugins` entry point registers the `dual` backend on `import verl`, lazily, in a fresh process."""

import json
import subprocess
import sys

PROBE = """
import json, sys
import verl
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
ours = ("server", "replica", "adapter", "agent_loop", "trainer")
heavy = [m for m in ours if f"recipe.optimal_sampling.verl.{m}" in sys.modules]
out = {"adapter_path": _ROLLOUT_REGISTRY.get(("dual", "async")), "replica": "dual" in RolloutReplicaRegistry._registry,
       "heavy_before_use": heavy}
if out["replica"]:
    out["replica_cls"] = RolloutReplicaRegistry.get("dual").__name__
    out["adapter_cls"] = get_rollout_class("dual", "async").__name__
print(json.dumps(out))
"""


def probe(env_extra: dict | None = None) -> dict:
    import os

    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_verl_registers_dual_backend_lazily():
    out = probe()
    assert out["adapter_path"] == "recipe.optimal_sampling.verl.adapter.DualServerAdapter"
    assert out["replica"]
    assert out["heavy_before_use"] == []  # nothing of ours beyond the plugin is imported by `import verl`
    assert (out["replica_cls"], out["adapter_cls"]) == ("DualReplica", "DualServerAdapter")


def test_plugins_can_be_switched_off_with_verl_env_var():
    out = probe({"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert out["adapter_path"] is None and not out["replica"]


def test_trainer_mode_is_registered_by_the_trainer_module():
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    import recipe.optimal_sampling.verl.trainer as trainer

    cls = get_trainer_cls("optimal_sampling_sync")
    assert cls is trainer.OptimalSamplingTrainer and issubclass(cls, PPOTrainerSync)

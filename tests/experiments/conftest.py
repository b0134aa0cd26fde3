"""Tests of the experiment tooling. The plot script's test needs only numpy and matplotlib; the launcher and the
policy-only rollout tests need the `verl` extra and are skipped at collection without it (as tests/verl is)."""

import importlib.util

if importlib.util.find_spec("verl") is None:
    collect_ignore_glob = ["test_launcher_on_cpu.py", "test_policy_only_on_cpu.py"]
else:
    from tests.verl.fixtures import checkpoints, ray_local  # noqa: F401  (fixtures)

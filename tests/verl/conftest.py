"""The tests of the verl integration need the `verl` extra (`pip install -e ".[verl,test]"`, as CI does); without
it this folder is skipped at collection so that the base package's tests still run."""

import importlib.util

if importlib.util.find_spec("verl") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    from tests.verl.fixtures import checkpoints, ray_local, trainer_config  # noqa: F401  (fixtures)

"""`python -m recipe.optimal_sampling.main` without the `verl` extra ends with one line naming the missing module
and the install command, not a traceback. The missing modules are simulated with an import blocker in a fresh
interpreter (nothing is uninstalled), so this runs with or without the extra."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = """
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = ["recipe.optimal_sampling.main", "sampler=balanced"]
runpy.run_module("recipe.optimal_sampling.main", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["verl", "hydra", "transfer_queue"])
def test_trainer_without_the_verl_extra_is_one_line_with_the_install_command(module):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER.format(module=module)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"No module named '{module}" in lines[0] and 'pip install -e ".[verl]"' in lines[0]

"""Facts the docs state about what the repository does: the wheel count of scripts/offline_wheelhouse.sh (run with a
stand-in pip that writes one empty wheel per requirement it is asked for), and that the folders the documented
GPU-host commands write into are git-ignored."""

import os
import re
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_PIP = r"""#!/usr/bin/env bash
# `pip download ... -d DIR -r LIST` and `pip wheel --no-deps -w DIR REQ`: one empty wheel per requirement
cmd=$1; shift; dir=""; list=""; reqs=()
while [ $# -gt 0 ]; do
    case "$1" in
        -d|-w) dir=$2; shift 2;;
        -r) list=$2; shift 2;;
        --platform|--python-version|--implementation) shift 2;;
        --*) shift;;
        *) reqs+=("$1"); shift;;
    esac
done
[ -n "$list" ] && mapfile -t -O "${#reqs[@]}" reqs < "$list"
for r in "${reqs[@]}"; do : > "$dir/${r%%==*}-${r##*==}-py3-none-any.whl"; done
"""


def test_offline_wheelhouse_builds_the_wheel_count_the_docs_state(tmp_path):
    pip = tmp_path / "pip"
    pip.write_text(FAKE_PIP)
    pip.chmod(pip.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PIP": str(pip), "WHEELHOUSE": str(tmp_path / "wh")}
    out = subprocess.run(
        ["bash", "scripts/offline_wheelhouse.sh"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    count = int(re.search(r"^(\d+) wheels in ", out, flags=re.M).group(1))
    assert count == len(list((tmp_path / "wh").glob("*.whl")))
    doc = (ROOT / "docs" / "runs" / "e2e_tiny_gpu_h100.md").read_text()
    assert f"offline_wheelhouse.sh      # {count} wheels" in doc


def test_the_documented_gpu_host_folders_are_git_ignored():
    for path in (".e2e/wheelhouse/x.whl", ".e2e/task/train.parquet", "outputs/experiments/x", ".whl/x.whl"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} is not git-ignored"

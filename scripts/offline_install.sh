#!/usr/bin/env bash
# Install the recipe's `verl` extra on an offline GPU node from a wheelhouse made by scripts/offline_wheelhouse.sh,
# on top of the node's own CUDA torch (never reinstalled). Run from the repository root.
#
# 1) reassembles files split into <file>.part-NN and checks them against SHA256SUMS;
# 2) unpacks site-bundle.tar.xz when present (BUNDLE=1 wheelhouse), else installs every wheel with
#    pip --no-index --no-deps (the wheelhouse is a complete, pinned set: no resolver, no network);
# 3) installs the recipe itself without dependencies, so that its `verl.plugins` entry point exists.
# With TARGET set, everything goes into that folder (export PYTHONPATH=TARGET afterwards; the launch scripts pass
# PYTHONPATH on to Ray); without it, into the current Python environment.
#
# Usage: WHEELHOUSE=wheelhouse [TARGET=/opt/os-site] bash scripts/offline_install.sh
set -xeuo pipefail

WHEELHOUSE=${WHEELHOUSE:-wheelhouse}  # folder copied from the networked machine
TARGET=${TARGET:-}                    # empty: the current environment; else a --target folder for PYTHONPATH
PYTHON=${PYTHON:-python3}             # the node's Python, the one that has CUDA torch

# 1) reassemble and verify
for first in "${WHEELHOUSE}"/*.part-00; do
    [ -e "${first}" ] || continue
    whole="${first%.part-00}"
    cat "${whole}".part-* > "${whole}"
    rm "${whole}".part-*
done
(cd "${WHEELHOUSE}" && sha256sum --check --ignore-missing --quiet SHA256SUMS)

# 2) the dependencies
TARGET_ARGS=()
if [ -n "${TARGET}" ]; then
    mkdir -p "${TARGET}"
    TARGET_ARGS=(--target "${TARGET}")
fi
if [ -e "${WHEELHOUSE}/site-bundle.tar.xz" ]; then
    [ -n "${TARGET}" ] || { echo "site-bundle.tar.xz needs TARGET=<folder>" >&2; exit 2; }
    tar -xJf "${WHEELHOUSE}/site-bundle.tar.xz" -C "${TARGET}"
else
    ${PYTHON} -m pip install --no-index --no-deps --no-compile --upgrade "${TARGET_ARGS[@]}" "${WHEELHOUSE}"/*.whl
fi

# 3) the recipe (no dependencies, no build isolation: setuptools comes from the node's environment)
if [ -n "${TARGET}" ]; then
    ${PYTHON} -m pip install --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "${TARGET}" .
else
    ${PYTHON} -m pip install --no-index --no-deps --no-build-isolation -e .
fi

# 4) check: verl imports (with our backend registered) next to the node's torch
PYTHONPATH="${TARGET:+${TARGET}:}${PYTHONPATH:-}" ${PYTHON} - <<'EOF'
import torch, transformers, ray, verl
from verl.workers.rollout.replica import RolloutReplicaRegistry
assert "dual" in RolloutReplicaRegistry._registry, "the optimal_sampling verl plugin did not register"
print(f"torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"ray {ray.__version__}, verl {verl.__version__}: dual backend registered")
EOF

#!/usr/bin/env bash
# One device command of the experiment on the offline GPU host (docs/experiments.md): install verl from the carried
# wheelhouse unless an earlier command on this machine did, run run_all.sh under a deadline that keeps the command
# within its 10-minute limit (a run that cannot finish in time is not started: the next command resumes it), and
# pack what came out into $OUT (the device tool returns at most 8 files): device.txt, install.log, status.txt,
# experiments.tgz (every run's metrics.jsonl, run.json and train.log; the task folder left out).
#   1 GPU:  SEEDS=0 bash scripts/experiments/gpu_host.sh, then SEEDS=1, then SEEDS=2 (one wave of 7 runs each)
#   4 GPUs: GPUS="0 1 2 3" PER_GPU=6 bash scripts/experiments/gpu_host.sh (the 21 runs at once)
# Other run_all.sh / run_arm.sh settings (TOTAL_STEPS, LR, ...) pass through the environment.
set -xuo pipefail  # no -e: whatever happened, the results are packed into $OUT

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${HERE}/../.." && pwd)
OUT=${OUT:?set OUT to the folder whose files come back}
WHEELHOUSE=${WHEELHOUSE:-${REPO}/.e2e/wheelhouse}             # carried: scripts/offline_wheelhouse.sh BUNDLE=1
SITE=${SITE:-/tmp/site}                                       # the offline install (kept while the machine is warm)
BUDGET_S=${BUDGET_S:-540}                                     # stop every run this long after the start
export EXP_DIR=${EXP_DIR:-${REPO}/outputs/experiments}
export DEADLINE_EPOCH=$(($(date +%s) + BUDGET_S))
export PYTHONUNBUFFERED=1

cd "${REPO}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "${OUT}/device.txt"
nproc >> "${OUT}/device.txt"
# 1) verl 0.9.1 and the recipe, from the wheelhouse (33 s on the H100 host), once per machine
if [ ! -e "${SITE}/verl/__init__.py" ]; then
    WHEELHOUSE=${WHEELHOUSE} TARGET=${SITE} bash scripts/offline_install.sh > "${OUT}/install.log" 2>&1 || {
        tail -20 "${OUT}/install.log"
        exit 1
    }
fi
export PYTHONPATH=${SITE}
# 2) the runs
rc=0
bash "${HERE}/run_all.sh" > "${OUT}/run_all.log" 2>&1 || rc=$?
# 3) back to this session: status, and one archive of the runs (without the task's models and data)
cp "${EXP_DIR}/status.txt" "${OUT}/status.txt"
(cd "$(dirname "${EXP_DIR}")" && tar czf "${OUT}/experiments.tgz" --exclude="$(basename "${EXP_DIR}")/task" \
    "$(basename "${EXP_DIR}")")
tail -c 4000 "${OUT}/run_all.log"
exit "${rc}"

#!/usr/bin/env bash
# Multi-GPU GRPO with the `dual` backend, in one device command on an offline GPU host with 2+ GPUs: the tiny
# synthetic-task run (scripts/e2e_tiny_gpu.sh's models and settings) on every GPU of the host (the FSDP actor sharded
# over them, one DualSamplerServer per GPU, full tensors synced into every server each step, each step's requests
# spread over the replicas), then the same run and seed on one GPU, then scripts/multi_gpu_compare.py: per-replica
# responses, missed weight syncs and server-vs-trainer log-prob gap (the trainer's optimal_sampling/replica* metrics),
# per-GPU peak memory (nvidia-smi every 0.5 s), the step time split (verl's timing_s/*), and the training metrics
# against the one-GPU run. Needs .e2e/ carried: the wheelhouse (scripts/offline_wheelhouse.sh BUNDLE=1, as for
# docs/runs/e2e_tiny_gpu_h100.md) and, best, the task (python -m recipe.optimal_sampling.verl.data --out .e2e/task;
# made here on the GPU when missing, minutes).
#   OUT=<folder> bash scripts/multi_gpu_gpu.sh                        # both runs, then the report
#   RUNS=multi ... then RUNS=single ...                               # two commands on one warm machine (WORK_DIR kept)
# $OUT gets at most 8 files: device.txt, install.log, multi.metrics.jsonl, single.metrics.jsonl, compare.md,
# logs.tgz (both runs' train.log, gpu_mem.csv and offline W&B run). Exit status: the runs' and the report's checks.
set -xuo pipefail  # no -e: whatever happened, the results are packed into $OUT

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to the folder whose files come back}
WHEELHOUSE=${WHEELHOUSE:-${REPO}/.e2e/wheelhouse}             # carried: scripts/offline_wheelhouse.sh BUNDLE=1
SITE=${SITE:-/tmp/site}                                       # the offline install (kept while the machine is warm)
WORK_DIR=${WORK_DIR:-${REPO}/outputs/multi_gpu}               # multi/ and single/: metrics, logs, W&B, nvidia-smi
TASK_DIR=${TASK_DIR:-${REPO}/.e2e/task}                       # parquet files + models/ (made when missing)
TRAIN_DEVICE=${TRAIN_DEVICE:-cuda}                            # where a missing task's models train
N_GPUS=${N_GPUS:-$(nvidia-smi -L | wc -l)}                    # GPUs of the multi-GPU run = rollout replicas
RUNS=${RUNS:-"multi single"}                                  # multi: N_GPUS GPUs; single: GPU 0 alone
PRESET=${PRESET:-balanced}                                    # sampler preset
TOTAL_STEPS=${TOTAL_STEPS:-5}                                 # GRPO steps per run
TRAIN_BATCH=${TRAIN_BATCH:-16}                                # prompts per step (one PPO mini-batch)
ROLLOUT_N=${ROLLOUT_N:-8}                                     # responses per prompt: 128 a step, 128 / N_GPUS a GPU
RESPONSE_LENGTH=${RESPONSE_LENGTH:-8}                         # reversed sum (<= 4 digits) + <eos>
LR=${LR:-1e-4}                                                # actor learning rate
SEED=${SEED:-0}                                               # data order and the servers' sampling seed, both runs
IS_THRESHOLD=${IS_THRESHOLD:-2.0}                             # truncation C of w = min(pi_old / q*, C)
POLICY_TEMPLATE=${POLICY_TEMPLATE:-$'Q: {prompt}\nA: '}       # the policy's plain prompt (tasks/addition.py)
GAP_TOL=${GAP_TOL:-0.01}                                      # largest per-replica log-prob gap the report passes
BUDGET_S=${BUDGET_S:-540}                                     # stop every run this long after the start
MIN_RUN_S=${MIN_RUN_S:-150}                                   # do not start a run with less time than this left
export DEADLINE_EPOCH=$(($(date +%s) + BUDGET_S))
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
KEY=actor_rollout_ref.rollout.engine_kwargs.optimal_sampling
MICRO_BATCH=64 AGENT_WORKERS=2                               # sequences per actor / log-prob micro-batch; agent loops
source "${REPO}/scripts/experiments/task_overrides.sh"        # the tiny-task overrides run_arm.sh uses too

cd "${REPO}"
mkdir -p "${WORK_DIR}"
[ "${N_GPUS}" -ge 2 ] || echo "warning: N_GPUS=${N_GPUS}: the multi run is a one-GPU run" >&2
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc; } > "${OUT}/device.txt"
# 1) verl 0.9.1 and the recipe from the wheelhouse, once per machine (as scripts/experiments/gpu_host.sh)
if [ ! -e "${SITE}/verl/__init__.py" ]; then
    WHEELHOUSE=${WHEELHOUSE} TARGET=${SITE} bash scripts/offline_install.sh > "${OUT}/install.log" 2>&1 || {
        tail -20 "${OUT}/install.log"
        exit 1
    }
fi
export PYTHONPATH=${REPO}:${SITE}  # this tree's recipe first (the installed copy may be older), then verl & co.
# 2) the task, once
if [ ! -e "${TASK_DIR}/models/meta.json" ] || [ ! -e "${TASK_DIR}/train.parquet" ]; then
    python3 -m recipe.optimal_sampling.tasks --task addition --jobs 2 --train-device "${TRAIN_DEVICE}" \
        --cache-dir "${TASK_DIR}/models"
    python3 -m recipe.optimal_sampling.verl.data --out "${TASK_DIR}"
fi

train() {  # NAME GPUS: one training run on GPUs 0..GPUS-1 into WORK_DIR/NAME/, stopped at DEADLINE_EPOCH
    local name=$1 gpus=$2 dir=${WORK_DIR}/$1 left pid sampler rc=0
    left=$((DEADLINE_EPOCH - $(date +%s)))
    if [ "${left}" -lt "${MIN_RUN_S}" ]; then
        echo "not started ${name}: ${left} s left before DEADLINE_EPOCH (MIN_RUN_S=${MIN_RUN_S})" >&2
        return 3
    fi
    rm -rf "${dir}" && mkdir -p "${dir}"
    task_overrides
    nvidia-smi --query-gpu=timestamp,index,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits \
        -lms 500 > "${dir}/gpu_mem.csv" &
    sampler=$!
    local cmd=(python3 -m recipe.optimal_sampling.main
        sampler="${PRESET}"
        "${TASK_OVERRIDES[@]}"
        "${KEY}.plot_freq=${TOTAL_STEPS}"
        trainer.n_gpus_per_node="${gpus}"
        trainer.nnodes=1
        trainer.total_training_steps="${TOTAL_STEPS}"
        trainer.val_before_train=False
        trainer.test_freq=-1
        trainer.save_freq=-1
        trainer.resume_mode=disable
        trainer.logger='[console,wandb,file]'
        trainer.experiment_name="multi_gpu_${name}_${gpus}gpu"
        transfer_queue.backend.SimpleStorage.num_data_storage_units=2
        +ray_kwargs.ray_init.include_dashboard=False
        +ray_kwargs.ray_init.runtime_env.env_vars.WANDB_MODE=offline
        +ray_kwargs.ray_init.runtime_env.env_vars.WANDB_DIR="${dir}"
        +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="${dir}/metrics.jsonl"
        "+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH='${PYTHONPATH:-}'"
    )
    # own process group, so that the deadline (and the clean-up after) also stops the run's local Ray cluster
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) WANDB_DIR=${dir} VERL_FILE_LOGGER_PATH=${dir}/metrics.jsonl \
        setsid --wait "${cmd[@]}" > "${dir}/train.log" 2>&1 &
    pid=$!
    (  # the deadline; ends with the run
        while kill -0 "${pid}" 2>/dev/null; do
            if [ "$(date +%s)" -ge "${DEADLINE_EPOCH}" ]; then
                kill -TERM -- "-${pid}"; sleep 15; kill -KILL -- "-${pid}"; break
            fi
            sleep 2
        done
    ) 2>/dev/null &
    wait "${pid}" || rc=$?
    kill "${sampler}" 2>/dev/null
    kill -KILL -- "-${pid}" 2>/dev/null  # what is left of the run's process group (its Ray cluster)
    tail -c 2000 "${dir}/train.log"
    return "${rc}"
}

# 3) the runs: N GPUs first (the one that matters), then one GPU
rc=0
for run in ${RUNS}; do
    case "${run}" in
        multi) train multi "${N_GPUS}" || rc=$? ;;
        single) train single 1 || rc=$? ;;
        *) echo "unknown run ${run} (multi | single)" >&2; rc=2 ;;
    esac
done
# 4) the report (exit 1 when a check fails) and the files back ($OUT: at most 8)
report=0
python3 "${REPO}/scripts/multi_gpu_compare.py" --multi "${WORK_DIR}/multi" --single "${WORK_DIR}/single" \
    --gpus "${N_GPUS}" --total-steps "${TOTAL_STEPS}" --gap-tol "${GAP_TOL}" > "${OUT}/compare.md" || report=$?
[ "${rc}" -eq 0 ] && rc=${report}
runs=()
for name in multi single; do
    [ -e "${WORK_DIR}/${name}/metrics.jsonl" ] && cp "${WORK_DIR}/${name}/metrics.jsonl" "${OUT}/${name}.metrics.jsonl"
    [ -d "${WORK_DIR}/${name}" ] && runs+=("${name}")
done
[ ${#runs[@]} -gt 0 ] && tar czf "${OUT}/logs.tgz" -C "${WORK_DIR}" --exclude=metrics.jsonl "${runs[@]}"
cat "${OUT}/compare.md"
exit "${rc}"

#!/usr/bin/env bash
# The end-to-end experiment of issue 5 (docs/experiments.md): GRPO with the `dual` backend on the synthetic addition
# task, seven sampling arms x SEEDS, identical GRPO settings (run_arm.sh), several runs at once on each GPU.
#   arms: on_policy (fixed_alpha=0, teacher not run) | balanced | conservative | exploratory | fixed_alpha_0.5 (IS) |
#         fixed_alpha_1 (teacher only, IS) | ess_balance (balanced preset's forcing and support)
# Each run writes EXP_DIR/<arm>/seed<k>/metrics.jsonl (verl's file logger) and is skipped when that file is already
# complete, so re-running this script resumes. DRY_RUN=1 prints the commands. Then: python3 bench/plot_experiment.py.
#
# Time budget (estimates, not measurements: docs/runs/e2e_tiny_gpu_h100.md measured ONE run alone on one H100,
# ~3 min from launch to its first step, partly one-time cost, 34 s for the first step, then ~3.3 s per step of 64
# responses). These runs have 128 responses per step and share GPUs and CPUs, so plan ~3-4 min of start-up per wave
# plus ~5 s per step: a wave of TOTAL_STEPS=40 with 9 validations is ~7-8 min.
#   1 GPU:  PER_GPU=7, one wave per seed (the 7 arms at once): 3 waves, ~22 min of the H100;
#   4 GPUs: GPUS="0 1 2 3" PER_GPU=6: the 21 runs form one wave, ~8 min.
# A device command may run at most 10 min: gpu_host.sh runs one wave per command under a deadline (a run that cannot
# finish is not started; the next command resumes). If the first wave's timing_s/step is much higher, lower
# TOTAL_STEPS for the later waves (a run with at least TOTAL_STEPS steps counts as complete).
set -xeuo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${HERE}/../.." && pwd)
export EXP_DIR=${EXP_DIR:-${REPO}/outputs/experiments}        # <arm>/seed<k>/ per run
export TASK_DIR=${TASK_DIR:-${EXP_DIR}/task}                  # parquet files + models/ (made once, below)
export TOTAL_STEPS=${TOTAL_STEPS:-40}                         # GRPO steps per run (see the budget above)
export TASK=${TASK:-addition}                                 # addition | carry (the guided testbed)
TRAIN_DEVICE=${TRAIN_DEVICE:-cpu}                             # where the task models train (cuda: same weights, faster)
ARMS=${ARMS:-"on_policy balanced conservative exploratory fixed_alpha_0.5 fixed_alpha_1 ess_balance"}
SEEDS=${SEEDS:-"0 1 2"}                                       # seeds 0..2: data order and sampling
GPUS=${GPUS:-0}                                               # CUDA device ids, e.g. "0 1 2 3"
PER_GPU=${PER_GPU:-7}                                         # runs at once on each GPU
STAGGER_S=${STAGGER_S:-5}                                     # seconds between run starts (start-up contention)
N_TRAIN=${N_TRAIN:-4096}                                      # train problems (more than steps x batch: no epoch)
N_TEST=${N_TEST:-512}                                         # held-out problems (policy-only greedy accuracy)
POLICY_TARGET=${POLICY_TARGET:-}                              # e.g. 0.03: a weaker starting policy (own EXP_DIR!)
JOBS=${JOBS:-}                                                 # "arm:seed ..." to run just these (else ARMS x SEEDS)
DRY_RUN=${DRY_RUN:-0}                                         # 1: print the commands, run nothing
export DRY_RUN

read -r -a arms <<< "${ARMS}"
read -r -a seeds <<< "${SEEDS}"
read -r -a gpus <<< "${GPUS}"
read -r -a jobs <<< "${JOBS}"
[ ${#jobs[@]} -eq 0 ] && for seed in "${seeds[@]}"; do
    for arm in "${arms[@]}"; do
        jobs+=("${arm}:${seed}")                              # seed-major: a wave holds every arm of one seed
    done
done
slots=$((${#gpus[@]} * PER_GPU))
cores=$(nproc)
if [ "${slots}" -gt $((cores / 4)) ] && [ "${#jobs[@]}" -gt $((cores / 4)) ]; then  # measured: docs/experiments.md
    echo "warning: up to ${slots} runs at once on ${cores} cores; 21 runs on 64 cores lost 5 at start-up (threads" \
        "exhausted), 15 on 64 ran clean: keep about 4 cores per run (fewer PER_GPU, or JOBS in two commands)" >&2
fi

# 1) the task (datasets + the tiny teacher/policy), once: parallel runs must not each train the models
cd "${REPO}"
if [ ! -e "${TASK_DIR}/models/meta.json" ] || [ ! -e "${TASK_DIR}/test.parquet" ]; then
    if [ -z "${POLICY_TARGET}" ] && [ "${DRY_RUN}" != 1 ]; then   # the task's own pair, both roles at once
        python3 -m recipe.optimal_sampling.tasks --task "${TASK}" --jobs 2 --train-device "${TRAIN_DEVICE}" \
            --cache-dir "${TASK_DIR}/models"
    fi
    prepare=(python3 -m recipe.optimal_sampling.verl.data --out "${TASK_DIR}" --task "${TASK}" --n-train "${N_TRAIN}"
        --n-test "${N_TEST}")
    [ -n "${POLICY_TARGET}" ] && prepare+=(--policy-target-accuracy "${POLICY_TARGET}")
    if [ "${DRY_RUN}" = 1 ]; then echo "${prepare[*]}"; else "${prepare[@]}"; fi
fi

# 2) slot s runs jobs s, s + slots, s + 2 slots, ... one after the other, on GPU number s mod len(GPUS)
run_slot() {
    local slot=$1 gpu=${gpus[$(($1 % ${#gpus[@]}))]} j arm seed
    for ((j = slot; j < ${#jobs[@]}; j += slots)); do
        arm=${jobs[j]%%:*}
        seed=${jobs[j]##*:}
        if ! CUDA_VISIBLE_DEVICES=${gpu} RUNS_PER_GPU=${PER_GPU} ARM=${arm} SEED=${seed} bash "${HERE}/run_arm.sh"; then
            echo "${arm}/seed${seed}" >> "${EXP_DIR}/failed.txt"
        fi
    done
}
if [ "${DRY_RUN}" != 1 ]; then
    mkdir -p "${EXP_DIR}"
    rm -f "${EXP_DIR}/failed.txt"
fi
for ((s = 0; s < slots && s < ${#jobs[@]}; s++)); do
    if [ "${DRY_RUN}" = 1 ]; then
        run_slot "${s}"
    else
        run_slot "${s}" &
        sleep "${STAGGER_S}"
    fi
done
wait

# 3) what is there now
[ "${DRY_RUN}" = 1 ] && exit 0
python3 "${HERE}/run_status.py" summary "${EXP_DIR}" --total-steps "${TOTAL_STEPS}" | tee "${EXP_DIR}/status.txt"
if [ -s "${EXP_DIR}/failed.txt" ]; then
    echo "failed or not started runs (their train.log says why; re-running this script resumes):"
    cat "${EXP_DIR}/failed.txt"
    exit 1
fi

#!/usr/bin/env bash
# ONE run of the end-to-end experiments: GRPO with the `dual` backend on a synthetic task (TASK=addition:
# docs/experiments.md; TASK=carry: the guided testbed, docs/experiments/guided/) with the task's tiny teacher/policy,
# arm ARM, seed SEED, on the GPU(s) in CUDA_VISIBLE_DEVICES (one). Writes EXP_DIR/ARM/seedSEED/{metrics.jsonl (verl's
# file logger), train.log, run.json}; a run whose metrics file is already complete (run_status.py) is skipped. Every
# GRPO setting below is shared by all arms: only the sampler and how guided samples enter the loss differ (and the
# learning rate, when ARM_LRS gives an arm its own). The policy alone (no teacher, greedy) is evaluated on the
# held-out set before training and every TEST_FREQ steps.
# Resume: with SAVE_FREQ > 0 verl checkpoints the run every SAVE_FREQ steps into RUN_DIR/ckpt (the latest two) and a
# rerun of a stopped run resumes from there (trainer.resume_mode=auto), from the latest checkpoint whose step's
# metrics were logged (`run_status.py rewind`: verl saves before it logs). verl's file logger truncates its file at
# start, so every attempt logs to RUN_DIR/attempts/ and `run_status.py merge` rebuilds metrics.jsonl from them.
# Usually started by run_all.sh; alone: ARM=balanced SEED=0 bash scripts/experiments/run_arm.sh  (DRY_RUN=1 prints).
set -xeuo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${HERE}/../.." && pwd)
ARM=${ARM:?set ARM to one of: on_policy balanced conservative exploratory fixed_alpha_0.5 fixed_alpha_1 ess_balance mixed_1of8 mixed_4of8 opd control mixed imitation positive mixed_pb mixed_pb_critic imitation_critic}
SEED=${SEED:?set SEED (an int): data order and the servers sampling seed}
EXP_DIR=${EXP_DIR:-${REPO}/outputs/experiments}               # one folder per arm and seed
TASK_DIR=${TASK_DIR:-${EXP_DIR}/task}                         # parquet files + models/ (run_all.sh makes it)
TASK=${TASK:-addition}                                        # addition | carry (the data: run_all.sh; the response budget)
TOTAL_STEPS=${TOTAL_STEPS:-40}                                # GRPO steps (see run_all.sh for the time budget)
TEST_FREQ=${TEST_FREQ:-5}                                     # held-out policy-only validation every N steps
TRAIN_BATCH=${TRAIN_BATCH:-16}                                # prompts per step (one PPO mini-batch)
ROLLOUT_N=${ROLLOUT_N:-8}                                     # responses per prompt (GRPO group)
case "${TASK}" in                                             # the task's TaskFormat.max_new_tokens
    addition) RESPONSE_LENGTH=${RESPONSE_LENGTH:-8} ;;        # reversed sum (<= 4 digits) + <eos>
    carry) RESPONSE_LENGTH=${RESPONSE_LENGTH:-13} ;;          # 11 worked tokens + <eos> + 1 of slack
    *) echo "unknown TASK=${TASK} (addition | carry)" >&2; exit 2 ;;
esac
LR=${LR:-1e-4}                                                # actor learning rate (AdamW, constant)
ARM_LRS=${ARM_LRS:-}                                          # "arm=lr ...": these arms' own learning rates (else LR)
SAVE_FREQ=${SAVE_FREQ:--1}                                    # checkpoint every N steps (resumable); -1 = never
IS_THRESHOLD=${IS_THRESHOLD:-2.0}                             # truncation C of w = min(pi_old / q*, C)
POLICY_TEMPLATE=${POLICY_TEMPLATE:-$'Q: {prompt}\nA: '}       # the policy's plain prompt (tasks/addition.py)
AGENT_WORKERS=${AGENT_WORKERS:-2}                             # verl agent-loop worker processes
RAY_OBJECT_STORE_BYTES=${RAY_OBJECT_STORE_BYTES:-2000000000}  # per run: several Ray clusters share the host
DEADLINE_EPOCH=${DEADLINE_EPOCH:-0}                           # Unix time at which the run is stopped; 0 = never
MIN_RUN_S=${MIN_RUN_S:-300}                                   # do not start a run with less time than this left
RUNS_PER_GPU=${RUNS_PER_GPU:-1}                               # runs sharing the GPU (run_all.sh: PER_GPU), for run.json
DRY_RUN=${DRY_RUN:-0}                                         # 1: print the training command, run nothing
# Many runs on one host exhaust threads: with 21 runs at once on 64 cores, 5 runs died at start-up ("Resource
# temporarily unavailable", a Rust thread pool that could not start); the relaunches with this cap had none.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-4}
RUN_DIR=${EXP_DIR}/${ARM}/seed${SEED}
METRICS=${RUN_DIR}/metrics.jsonl                              # merged from the attempts' files after each attempt
shopt -s nullglob
earlier=("${RUN_DIR}"/attempts/*.jsonl)
shopt -u nullglob
ATTEMPT=${RUN_DIR}/attempts/${#earlier[@]}.jsonl              # this attempt's verl file logger
KEY=actor_rollout_ref.rollout.engine_kwargs.optimal_sampling

# The seven arms of issue 5: only these overrides differ between runs.
case "${ARM}" in
    on_policy) ARM_OVERRIDES=(                                # samples from pi_theta (the teacher is not run)
        sampler=exploratory
        "${KEY}.alpha_method=fixed"
        "${KEY}.fixed_alpha=0.0"
    ) ;;
    balanced | conservative | exploratory) ARM_OVERRIDES=(    # the presets (config/sampler/*.yaml)
        "sampler=${ARM}"
    ) ;;
    fixed_alpha_0.5) ARM_OVERRIDES=(                          # logit fusion: a fixed geometric mixture, with IS
        sampler=exploratory
        "${KEY}.alpha_method=fixed"
        "${KEY}.fixed_alpha=0.5"
    ) ;;
    fixed_alpha_1) ARM_OVERRIDES=(                            # teacher-only sampling (pure off-policy), with IS
        sampler=exploratory
        "${KEY}.alpha_method=fixed"
        "${KEY}.fixed_alpha=1.0"
    ) ;;
    ess_balance) ARM_OVERRIDES=(                              # exact ESS balance, balanced preset's forcing + support
        sampler=balanced
        "${KEY}.alpha_method=ess_balance"
    ) ;;
    mixed_1of8 | mixed_4of8) ARM_OVERRIDES=(                 # beyond issue 5: mixed groups, balanced preset, k of
        sampler=balanced                                      # the 8 responses from q*, the rest from pi_theta
        "${KEY}.guided_per_prompt=${ARM:6:1}"
    ) ;;
    # The guided experiment (issue 11, docs/experiments/guided/): the pilot sweep's specs, same names. The estimator
    # optimal_sampling_guided reads the trainer config's guided_loss block (loss.GuidedLossConfig).
    opd) ARM_OVERRIDES=(                                      # on-policy distillation: policy samples, the teacher
        sampler=exploratory                                   # scores each one (one prefill) as a dense critic
        "${KEY}.alpha_method=fixed"
        "${KEY}.fixed_alpha=0.0"
        "${KEY}.score_policy_samples=true"
        algorithm.adv_estimator=optimal_sampling_guided
        guided_loss.critic_coef=1.0
    ) ;;
    control) ARM_OVERRIDES=(                                  # the seed's method: all 8 from balanced q*, GRPO
        sampler=balanced
    ) ;;
    mixed) ARM_OVERRIDES=(                                    # 1 of 8 from balanced q*, GRPO (LUFFY-style groups)
        sampler=balanced
        "${KEY}.guided_per_prompt=1"
    ) ;;
    imitation | imitation_critic | positive) ARM_OVERRIDES=(  # all from balanced q*, imitation of the correct ones
        sampler=balanced                                      # (A = R) or GRPO with guided negatives clipped to 0
        algorithm.adv_estimator=optimal_sampling_guided
        "guided_loss.mode=$([ "${ARM}" = positive ] && echo positive_only || echo imitation)"
    )
    [ "${ARM}" = imitation_critic ] && ARM_OVERRIDES+=(       # + the critic on the q* rows (their scores are free)
        guided_loss.critic_coef=1.0
        guided_loss.critic_rows=guided
    ) ;;
    mixed_pb | mixed_pb_critic) ARM_OVERRIDES=(              # 1 of 8 guided, baseline from the policy's own 7,
        sampler=balanced                                      # guided negatives clipped to 0
        "${KEY}.guided_per_prompt=1"
        algorithm.adv_estimator=optimal_sampling_guided
        guided_loss.baseline=policy
        guided_loss.mode=positive_only
    )
    [ "${ARM}" = mixed_pb_critic ] && ARM_OVERRIDES+=(        # + the critic on every row (policy rows scored)
        "${KEY}.score_policy_samples=true"
        guided_loss.critic_coef=1.0
    ) ;;
    *) echo "unknown ARM=${ARM}" >&2; exit 2 ;;
esac
for pair in ${ARM_LRS}; do                                    # an arm's own learning rate (the pilot's better one)
    [ "${pair%%=*}" = "${ARM}" ] && LR=${pair#*=}
done

if python3 "${HERE}/run_status.py" complete "${METRICS}" --total-steps "${TOTAL_STEPS}"; then
    echo "skip ${ARM}/seed${SEED}: ${METRICS} is complete"
    exit 0
fi

MICRO_BATCH=128                                               # a step's 128 sequences in one micro-batch
source "${HERE}/task_overrides.sh"
task_overrides
CMD=(python3 -m recipe.optimal_sampling.main
    "${ARM_OVERRIDES[@]}"
    "${KEY}.skip_unused_teacher=true"
    "${KEY}.validate_policy_only=true"
    actor_rollout_ref.rollout.val_kwargs.temperature=0
    actor_rollout_ref.rollout.val_kwargs.do_sample=false
    "${TASK_OVERRIDES[@]}"
    trainer.n_gpus_per_node=1
    trainer.nnodes=1
    trainer.total_training_steps="${TOTAL_STEPS}"
    trainer.val_before_train=True
    trainer.test_freq="${TEST_FREQ}"
    trainer.logger='[console,file]'
    trainer.experiment_name="exp_${ARM}_seed${SEED}"
    transfer_queue.backend.SimpleStorage.num_data_storage_units=2
    +ray_kwargs.ray_init.include_dashboard=False
    +ray_kwargs.ray_init.object_store_memory="${RAY_OBJECT_STORE_BYTES}"
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="${ATTEMPT}"
    "+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH='${PYTHONPATH:-}'"
)
if [ "${SAVE_FREQ}" -gt 0 ]; then                             # resumable: the latest two checkpoints
    CMD+=(trainer.save_freq="${SAVE_FREQ}" trainer.resume_mode=auto trainer.default_local_dir="${RUN_DIR}/ckpt"
        trainer.max_actor_ckpt_to_keep=2)
else
    CMD+=(trainer.save_freq=-1)
fi
CMD+=("$@")
if [ "${DRY_RUN}" = 1 ]; then
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} $(printf '%q ' "${CMD[@]}")"
    exit 0
fi

left=$((DEADLINE_EPOCH - $(date +%s)))
if [ "${DEADLINE_EPOCH}" -gt 0 ] && [ "${left}" -lt "${MIN_RUN_S}" ]; then
    echo "not started ${ARM}/seed${SEED}: ${left} s left before DEADLINE_EPOCH (MIN_RUN_S=${MIN_RUN_S})" >&2
    exit 3
fi
mkdir -p "${RUN_DIR}/attempts"
[ "${SAVE_FREQ}" -gt 0 ] && python3 "${HERE}/run_status.py" rewind "${RUN_DIR}"
cd "${REPO}"
export VERL_FILE_LOGGER_PATH=${ATTEMPT}
start=$(date +%s)
# own process group, so that the deadline also stops the run's local Ray cluster
echo "=== attempt ${ATTEMPT} at $(date -u +%FT%TZ)" >> "${RUN_DIR}/train.log"
setsid --wait "${CMD[@]}" >> "${RUN_DIR}/train.log" 2>&1 &
pid=$!
if [ "${DEADLINE_EPOCH}" -gt 0 ]; then
    (sleep "${left}"; kill -TERM -- "-${pid}" 2>/dev/null; sleep 15; kill -KILL -- "-${pid}" 2>/dev/null) &
    watchdog=$!
fi
rc=0
wait "${pid}" || rc=$?
[ -n "${watchdog:-}" ] && { kill "${watchdog}" 2>/dev/null || true; }
end=$(date +%s)
python3 "${HERE}/run_status.py" merge "${RUN_DIR}"
complete=false
python3 "${HERE}/run_status.py" complete "${METRICS}" --total-steps "${TOTAL_STEPS}" && complete=true
# the card's name and how many runs shared it: seconds compare only on one kind of card under one load
device=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${CUDA_VISIBLE_DEVICES:-0}" 2>/dev/null | head -1) || device=none
# seconds and start: this attempt's (a resumed run's earlier attempts are in train.log); attempts: how many ran
printf '{"arm": "%s", "seed": %s, "exit_code": %s, "complete": %s, "seconds": %s, "start": %s, "cuda_visible_devices": "%s", "lr": "%s", "total_steps": %s, "device": "%s", "runs_per_gpu": %s, "attempts": %s}\n' \
    "${ARM}" "${SEED}" "${rc}" "${complete}" "$((end - start))" "${start}" "${CUDA_VISIBLE_DEVICES:-}" "${LR}" "${TOTAL_STEPS}" \
    "${device:-none}" "${RUNS_PER_GPU}" "$((${#earlier[@]} + 1))" > "${RUN_DIR}/run.json"
[ "${complete}" = true ]

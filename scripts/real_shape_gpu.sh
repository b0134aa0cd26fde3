#!/usr/bin/env bash
# Real-shape GRPO on ONE GPU in ONE device command (docs/runs/real_shape_h200.md): a policy and a teacher at the public
# Qwen3 shapes (default 4B and 14B) with random weights built on the GPU (no download; tokenizer of the same 151,936-token
# vocabulary built in code), then TOTAL_STEPS GRPO steps of `python -m recipe.optimal_sampling.main` with the FSDP actor
# (parameter + optimizer offload) and the fast engine in the dual server (engine=fast: start-up fails, naming why, if it
# cannot run; continuous batching): TRAIN_BATCH prompts x ROLLOUT_N responses, each response capped from a long tail
# (log-normal, median MEDIAN_RESPONSE, at most MAX_RESPONSE tokens; extra_info.max_response_tokens of the dataset).
#   OUT=$OUT bash scripts/real_shape_gpu.sh        # from the repository root, .e2e/wheelhouse carried (gpu_host.sh's)
# Resumable: the offline install and the checkpoints are kept while the machine stays warm and are not redone, and a
# complete run is not repeated. A deadline (BUDGET_S after the start) stops the training so that the logs are packed into
# $OUT in time: device.txt, status.txt (seconds per phase, exit codes), summary.md (time split and memory per phase and
# step: scripts/real_shape_summary.py), metrics.jsonl (verl's file logger), train_tail.log, gpu_memory.csv (device memory
# every 0.5 s: unix seconds, used MiB, total MiB) and logs.tgz (install, build and the whole training log).
#
# Memory plan on one H200 (139 GiB; 4B = 4.02e9 parameters, 14B = 14.77e9; KV cache 144 + 160 = 304 KiB per token):
#   server, always resident: policy copy 7.5 GiB + teacher 27.5 GiB (bf16)                                  = 35.0 GiB
#   rollout: + KV slots MAX_NUM_SEQS 64 x 1536 tokens (prompt 320 + response 1024 + 128, rounded up to 64) = 28.5 GiB
#            + the offloaded actor's CUDA context and cache (~1-2 GiB)                                     => ~65 GiB
#   train (server asleep: KV and graphs freed): actor fp32 parameters 15.0 + gradients 15.0 + AdamW states 30.0 (on the
#            GPU for the step only) + activations (gradient checkpointing; logits of a micro-batch of 4 x <= 1344
#            tokens x 151,936 in fp32 ~3 GiB, twice) ~10                                                  => ~105 GiB
#   sync: server + KV (verl wakes the server before the transfer) + the actor's tensors, one at a time  => ~65-80 GiB
# Without the offloads the actor's 60 GiB would stay next to the rollout's 64 GiB: 124 GiB, too close to 139.
# Host memory: the offloaded parameters and optimizer states (45 GiB), the teacher read through CPU memory at start-up
# (27.5 GiB, freed) and the 2 GiB weight-sync buckets in Ray's object store, within 128 GiB.
set -xuo pipefail  # no -e: whatever happens, the logs are packed into $OUT

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${HERE}/.." && pwd)
OUT=${OUT:?set OUT to the folder whose files come back}
WHEELHOUSE=${WHEELHOUSE:-${REPO}/.e2e/wheelhouse}             # carried: BUNDLE=1 scripts/offline_wheelhouse.sh
SITE=${SITE:-/tmp/site}                                       # the offline install (kept while the machine is warm)
WORK_DIR=${WORK_DIR:-/tmp/real_shape}                         # checkpoints (35 GiB), datasets, the run
POLICY=${POLICY:-4b}                                          # tasks/real_shape.py ARCH: 0.6b 1.7b 4b 8b 14b
TEACHER=${TEACHER:-14b}
PRESET=${PRESET:-balanced}                                    # sampler preset
TOTAL_STEPS=${TOTAL_STEPS:-3}                                 # GRPO steps
TRAIN_BATCH=${TRAIN_BATCH:-8}                                 # prompts per step (one PPO mini-batch)
ROLLOUT_N=${ROLLOUT_N:-8}                                     # responses per prompt: 64 per step on the one GPU
MAX_NUM_SEQS=${MAX_NUM_SEQS:-64}                              # the server's slots (verl's default 256 would not fit)
MAX_PROMPT=${MAX_PROMPT:-320}                                 # prompts: 64-256 characters = tokens + <= 19 of template
MAX_RESPONSE=${MAX_RESPONSE:-1024}                            # data.max_response_length: the largest cap
MEDIAN_RESPONSE=${MEDIAN_RESPONSE:-300}                       # median of the log-normal response caps (sigma 0.8)
MICRO_BATCH=${MICRO_BATCH:-4}                                 # sequences per actor forward/backward
LOGPROB_MICRO_BATCH=${LOGPROB_MICRO_BATCH:-8}                 # sequences per log-prob recomputation
LR=${LR:-1e-6}
POLICY_TEMPLATE=${POLICY_TEMPLATE:-$'Q: {prompt}\nA: '}       # the policy's plain prompt (verl/real_shape.py)
BUDGET_S=${BUDGET_S:-560}                                     # the training is stopped this long after the start
MIN_TRAIN_S=${MIN_TRAIN_S:-240}                               # not started with less time left (the next command resumes)
DRY_RUN=${DRY_RUN:-0}                                         # 1: print the training command, run nothing
DATA_DIR=${WORK_DIR}/${POLICY}_${TEACHER}
RUN_DIR=${WORK_DIR}/run_${POLICY}_${TEACHER}
METRICS=${RUN_DIR}/metrics.jsonl
KEY=actor_rollout_ref.rollout.engine_kwargs.optimal_sampling
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
export PYTHONUNBUFFERED=1
export PYTHONPATH=${REPO}:${SITE}  # this tree's recipe first (the installed copy may be older), then verl & co.
export VERL_FILE_LOGGER_PATH=${METRICS}

CMD=(python3 -m recipe.optimal_sampling.main
    sampler="${PRESET}"
    data.train_files="${DATA_DIR}/train.parquet"
    data.val_files="${DATA_DIR}/test.parquet"
    data.train_batch_size="${TRAIN_BATCH}"
    data.max_prompt_length="${MAX_PROMPT}"
    data.max_response_length="${MAX_RESPONSE}"
    data.dataloader_num_workers=0
    data.seed=0
    actor_rollout_ref.model.path="${DATA_DIR}/policy"
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
    actor_rollout_ref.model.use_remove_padding=False
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.optim.lr="${LR}"
    actor_rollout_ref.actor.ppo_mini_batch_size="${TRAIN_BATCH}"
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="${MICRO_BATCH}"
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.fsdp_config.param_offload=True
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
    actor_rollout_ref.actor.fsdp_config.use_torch_compile=False
    actor_rollout_ref.rollout.n="${ROLLOUT_N}"
    actor_rollout_ref.rollout.max_num_seqs="${MAX_NUM_SEQS}"
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="${LOGPROB_MICRO_BATCH}"
    actor_rollout_ref.rollout.agent.num_workers=2
    "${KEY}.teacher_path=${DATA_DIR}/teacher"
    "${KEY}.policy_template='${POLICY_TEMPLATE}'"
    "${KEY}.engine=fast"
    "${KEY}.continuous_batching=true"
    "${KEY}.plot_freq=0"
    reward.custom_reward_function.path="${REPO}/recipe/optimal_sampling/verl/real_shape.py"
    reward.custom_reward_function.name=compute_score
    reward.num_workers=1
    trainer.n_gpus_per_node=1
    trainer.nnodes=1
    trainer.total_training_steps="${TOTAL_STEPS}"
    trainer.val_before_train=False
    trainer.test_freq=-1
    trainer.save_freq=-1
    trainer.logger='[console,file]'
    trainer.experiment_name="real_shape_${POLICY}_${TEACHER}"
    transfer_queue.backend.SimpleStorage.num_data_storage_units=2
    +ray_kwargs.ray_init.include_dashboard=False
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="${METRICS}"
    "+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH='${PYTHONPATH}'"
    "$@"
)
if [ "${DRY_RUN}" = 1 ]; then
    echo "$(printf '%q ' "${CMD[@]}")"
    exit 0
fi

status() { echo "$(($(date +%s) - START)) s: $*" | tee -a "${OUT}/status.txt"; }
pack() {  # everything back to this session: at most 8 files in $OUT
    [ -e "${METRICS}" ] && cp "${METRICS}" "${OUT}/metrics.jsonl"
    [ -e "${RUN_DIR}/gpu_memory.csv" ] && cp "${RUN_DIR}/gpu_memory.csv" "${OUT}/gpu_memory.csv"
    [ -e "${RUN_DIR}/train.log" ] && tail -n 400 "${RUN_DIR}/train.log" > "${OUT}/train_tail.log"
    [ -e "${METRICS}" ] && python3 "${HERE}/real_shape_summary.py" "${METRICS}" --gpu-memory "${RUN_DIR}/gpu_memory.csv" \
        > "${OUT}/summary.md" 2>&1
    tar czf "${OUT}/logs.tgz" -C "${WORK_DIR}" --ignore-failed-read install.log "$(basename "${DATA_DIR}")/build.log" \
        "$(basename "${RUN_DIR}")/train.log" 2>/dev/null
    status "packed; the command took $(($(date +%s) - START)) s"
}

mkdir -p "${OUT}" "${WORK_DIR}" "${DATA_DIR}" "${RUN_DIR}"
cd "${REPO}"
(set +x; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "cpus $(nproc)"
    free -g | head -2; df -h "${WORK_DIR}" | tail -1) > "${OUT}/device.txt" 2>&1
# 1) verl 0.9.1 and the recipe from the wheelhouse (33 s on the H100 host), once per machine
if [ ! -e "${SITE}/verl/__init__.py" ]; then
    WHEELHOUSE=${WHEELHOUSE} TARGET=${SITE} bash scripts/offline_install.sh > "${WORK_DIR}/install.log" 2>&1
    rc=$?
    status "install rc=${rc}"
    [ "${rc}" = 0 ] || { tail -20 "${WORK_DIR}/install.log"; pack; exit 1; }
fi
# 2) the checkpoints (random weights, initialised on the GPU; kept when built) and the datasets
python3 -m recipe.optimal_sampling.verl.real_shape --out "${DATA_DIR}" --policy "${POLICY}" --teacher "${TEACHER}" \
    --n "${ROLLOUT_N}" --median-response "${MEDIAN_RESPONSE}" --max-response "${MAX_RESPONSE}" \
    > "${DATA_DIR}/build.log" 2>&1
rc=$?
status "build rc=${rc}: $(tail -1 "${DATA_DIR}/build.log")"
[ "${rc}" = 0 ] || { tail -20 "${DATA_DIR}/build.log"; pack; exit 1; }
# 3) the training, unless a complete run is there; under the deadline, with the device memory sampled alongside
if python3 "${HERE}/real_shape_summary.py" "${METRICS}" --complete "${TOTAL_STEPS}" 2>/dev/null; then
    status "complete run found in ${RUN_DIR}: not repeated"
    pack
    exit 0
fi
left=$((DEADLINE - $(date +%s)))
if [ "${left}" -lt "${MIN_TRAIN_S}" ]; then
    status "training not started: ${left} s left (MIN_TRAIN_S=${MIN_TRAIN_S}); run the command again"
    pack
    exit 3
fi
[ -e "${METRICS}" ] && mv "${METRICS}" "${METRICS}.incomplete"
(set +x; while :; do echo "$(date +%s.%N),$(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits -i 0 \
    | tr -d ' ')"; sleep 0.5; done) > "${RUN_DIR}/gpu_memory.csv" 2>/dev/null &
sampler=$!
setsid --wait "${CMD[@]}" > "${RUN_DIR}/train.log" 2>&1 &  # own process group: the deadline stops Ray's processes too
pid=$!
(sleep "${left}"; kill -TERM -- "-${pid}"; sleep 10; kill -KILL -- "-${pid}") > /dev/null 2>&1 &  # holds no output
watchdog=$!
rc=0
wait "${pid}" || rc=$?
kill "${watchdog}" "${sampler}" 2>/dev/null
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # whatever the process group left (GPU memory for a rerun)
complete=false
python3 "${HERE}/real_shape_summary.py" "${METRICS}" --complete "${TOTAL_STEPS}" && complete=true
status "training rc=${rc} complete=${complete} ($(grep -c . "${METRICS}" 2>/dev/null || echo 0) metrics lines)"
pack
tail -c 3000 "${RUN_DIR}/train.log"
[ "${complete}" = true ]

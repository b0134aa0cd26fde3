#!/usr/bin/env bash
# End-to-end smoke test on ONE GPU: GRPO with the `dual` backend on the synthetic addition task, with the task's
# tiny trained teacher/policy (recipe/optimal_sampling/tasks), W&B offline and a JSONL metrics file.
# Weights are synced to the dual server every step; optimal_sampling/* and rollout_corr/* are logged every step.
# Needs: pip install -e ".[verl]" (or scripts/offline_install.sh) and a CUDA torch. Run from anywhere.
set -xeuo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK_DIR=${WORK_DIR:-${REPO}/outputs/e2e_tiny_gpu}            # logs, W&B run, metrics
TASK_DIR=${TASK_DIR:-${WORK_DIR}/task}                        # parquet files + models/ (made when missing)
PRESET=${PRESET:-balanced}                                    # sampler preset
TOTAL_STEPS=${TOTAL_STEPS:-3}                                 # GRPO steps
TRAIN_BATCH=${TRAIN_BATCH:-16}                                # prompts per step
ROLLOUT_N=${ROLLOUT_N:-4}                                     # responses per prompt (GRPO group)
RESPONSE_LENGTH=${RESPONSE_LENGTH:-8}                         # reversed sum (<= 4 digits) + <eos>
LR=${LR:-1e-4}                                                # actor learning rate
IS_THRESHOLD=${IS_THRESHOLD:-2.0}                             # truncation C of w = min(pi_old / q*, C)
POLICY_TEMPLATE=${POLICY_TEMPLATE:-$'Q: {prompt}\nA: '}       # the policy's plain prompt (tasks/addition.py)
export WANDB_MODE=${WANDB_MODE:-offline}                      # offline W&B run under WANDB_DIR/wandb
export WANDB_DIR=${WANDB_DIR:-${WORK_DIR}}
export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-${WORK_DIR}/metrics.jsonl}

mkdir -p "${WORK_DIR}"
cd "${REPO}"
if [ ! -e "${TASK_DIR}/models/meta.json" ] || [ ! -e "${TASK_DIR}/train.parquet" ]; then
    python3 -m recipe.optimal_sampling.verl.data --out "${TASK_DIR}"
fi

python3 -m recipe.optimal_sampling.main \
    sampler="${PRESET}" \
    data.train_files="${TASK_DIR}/train.parquet" \
    data.val_files="${TASK_DIR}/test.parquet" \
    data.train_batch_size="${TRAIN_BATCH}" \
    data.max_prompt_length=48 \
    data.max_response_length="${RESPONSE_LENGTH}" \
    data.dataloader_num_workers=0 \
    actor_rollout_ref.model.path="${TASK_DIR}/models/policy" \
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa \
    actor_rollout_ref.model.use_remove_padding=False \
    actor_rollout_ref.actor.optim.lr="${LR}" \
    actor_rollout_ref.actor.ppo_mini_batch_size="${TRAIN_BATCH}" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.fsdp_config.use_torch_compile=False \
    actor_rollout_ref.rollout.n="${ROLLOUT_N}" \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64 \
    actor_rollout_ref.rollout.agent.num_workers=2 \
    actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_path="${TASK_DIR}/models/teacher" \
    "actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.policy_template='${POLICY_TEMPLATE}'" \
    actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.plot_freq=1 \
    algorithm.rollout_correction.rollout_is_threshold="${IS_THRESHOLD}" \
    reward.custom_reward_function.path="${REPO}/recipe/optimal_sampling/verl/reward.py" \
    reward.custom_reward_function.name=compute_score \
    reward.num_workers=1 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_training_steps="${TOTAL_STEPS}" \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq=-1 \
    trainer.logger='[console,wandb,file]' \
    trainer.experiment_name="e2e_tiny_${PRESET}" \
    transfer_queue.backend.SimpleStorage.num_data_storage_units=2 \
    +ray_kwargs.ray_init.runtime_env.env_vars.WANDB_MODE="${WANDB_MODE}" \
    +ray_kwargs.ray_init.runtime_env.env_vars.WANDB_DIR="${WANDB_DIR}" \
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="${VERL_FILE_LOGGER_PATH}" \
    "+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH='${PYTHONPATH:-}'" \
    "$@"

# The Hydra overrides every verl run on a synthetic task's models shares (sourced by run_arm.sh and
# ../multi_gpu_gpu.sh): data, model, actor, rollout and reward settings, from the caller's variables TASK_DIR (parquet
# files + models/), TRAIN_BATCH, RESPONSE_LENGTH, SEED, LR, ROLLOUT_N, MICRO_BATCH (sequences per actor and log-prob
# micro-batch), AGENT_WORKERS, POLICY_TEMPLATE, IS_THRESHOLD and REPO. `task_overrides` fills TASK_OVERRIDES.
task_overrides() {
    local key=actor_rollout_ref.rollout.engine_kwargs.optimal_sampling
    TASK_OVERRIDES=(
        data.train_files="${TASK_DIR}/train.parquet"
        data.val_files="${TASK_DIR}/test.parquet"
        data.train_batch_size="${TRAIN_BATCH}"
        data.max_prompt_length=48
        data.max_response_length="${RESPONSE_LENGTH}"
        data.dataloader_num_workers=0
        data.seed="${SEED}"
        actor_rollout_ref.model.path="${TASK_DIR}/models/policy"
        +actor_rollout_ref.model.override_config.attn_implementation=sdpa  # no flash-attn on the GPU host
        actor_rollout_ref.model.use_remove_padding=False
        actor_rollout_ref.actor.optim.lr="${LR}"
        actor_rollout_ref.actor.ppo_mini_batch_size="${TRAIN_BATCH}"  # one PPO update per step
        actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="${MICRO_BATCH}"
        actor_rollout_ref.actor.use_kl_loss=False
        actor_rollout_ref.actor.fsdp_config.use_torch_compile=False
        actor_rollout_ref.rollout.n="${ROLLOUT_N}"
        actor_rollout_ref.rollout.seed="${SEED}"
        actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="${MICRO_BATCH}"
        actor_rollout_ref.rollout.agent.num_workers="${AGENT_WORKERS}"
        "${key}.teacher_path=${TASK_DIR}/models/teacher"
        "${key}.policy_template='${POLICY_TEMPLATE}'"
        algorithm.rollout_correction.rollout_is_threshold="${IS_THRESHOLD}"
        reward.custom_reward_function.path="${REPO}/recipe/optimal_sampling/verl/reward.py"
        reward.custom_reward_function.name=compute_score
        reward.num_workers=1
    )
}

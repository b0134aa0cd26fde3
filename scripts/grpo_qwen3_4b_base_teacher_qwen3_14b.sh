#!/usr/bin/env bash
# GRPO with optimal sampling on one 8-GPU node: Qwen3-4B-Base policy, frozen Qwen3-14B teacher, GSM8K.
# Every response token is drawn from q* (the sampler preset below); verl corrects the loss with
# w = min(pi_old / q*, C). The three preset scripts beside this one set PRESET and call it.
# Data: verl's examples/data_preprocess/gsm8k.py (train.parquet, test.parquet). Models: local HF checkpoints.
# Memory per H100: teacher 29.5 GB + policy copy 8 GB (bf16, resident) + the FSDP shard of the 4B actor + the dual
# server's KV cache (~0.3 MB per token for the pair; MAX_NUM_SEQS bounds it).
set -xeuo pipefail

PRESET=${PRESET:-balanced}                                   # conservative | balanced | exploratory
MODEL_PATH=${MODEL_PATH:-${HOME}/models/Qwen3-4B-Base}       # the policy (trained)
TEACHER_PATH=${TEACHER_PATH:-${HOME}/models/Qwen3-14B}       # the teacher (frozen, same tokenizer)
DATA_DIR=${DATA_DIR:-${HOME}/data/gsm8k}
N_GPUS=${N_GPUS:-8}
TRAIN_BATCH=${TRAIN_BATCH:-256}                              # prompts per step
MINI_BATCH=${MINI_BATCH:-64}                                 # prompts per PPO mini-batch
ROLLOUT_N=${ROLLOUT_N:-8}                                    # GRPO group size
MAX_PROMPT=${MAX_PROMPT:-512}
MAX_RESPONSE=${MAX_RESPONSE:-1024}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-32}                             # sequences one dual server decodes together
LR=${LR:-1e-6}
IS_THRESHOLD=${IS_THRESHOLD:-2.0}                            # truncation C of the importance weights
TOTAL_EPOCHS=${TOTAL_EPOCHS:-3}
SAVE_FREQ=${SAVE_FREQ:-50}
PROJECT=${PROJECT:-optimal_sampling}
EXPERIMENT=${EXPERIMENT:-gsm8k_qwen3_4b_base_teacher_14b_${PRESET}}
export WANDB_MODE=${WANDB_MODE:-online}

cd "$(dirname "$0")/.."
python3 -m recipe.optimal_sampling.main \
    sampler="${PRESET}" \
    data.train_files="${DATA_DIR}/train.parquet" \
    data.val_files="${DATA_DIR}/test.parquet" \
    data.train_batch_size="${TRAIN_BATCH}" \
    data.max_prompt_length="${MAX_PROMPT}" \
    data.max_response_length="${MAX_RESPONSE}" \
    data.filter_overlong_prompts=True \
    +data.apply_chat_template_kwargs.enable_thinking=False \
    actor_rollout_ref.model.path="${MODEL_PATH}" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr="${LR}" \
    actor_rollout_ref.actor.ppo_mini_batch_size="${MINI_BATCH}" \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    actor_rollout_ref.rollout.n="${ROLLOUT_N}" \
    actor_rollout_ref.rollout.max_num_seqs="${MAX_NUM_SEQS}" \
    actor_rollout_ref.rollout.engine_kwargs.optimal_sampling.teacher_path="${TEACHER_PATH}" \
    algorithm.rollout_correction.rollout_is_threshold="${IS_THRESHOLD}" \
    trainer.n_gpus_per_node="${N_GPUS}" \
    trainer.nnodes=1 \
    trainer.total_epochs="${TOTAL_EPOCHS}" \
    trainer.save_freq="${SAVE_FREQ}" \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.project_name="${PROJECT}" \
    trainer.experiment_name="${EXPERIMENT}" \
    +ray_kwargs.ray_init.runtime_env.env_vars.WANDB_MODE="${WANDB_MODE}" \
    "$@"

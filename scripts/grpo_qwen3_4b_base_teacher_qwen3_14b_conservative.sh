#!/usr/bin/env bash
# GRPO, Qwen3-4B-Base policy + Qwen3-14B teacher on one 8-GPU node, sampler preset: conservative.
set -xeuo pipefail
PRESET=conservative exec bash "$(dirname "$0")/grpo_qwen3_4b_base_teacher_qwen3_14b.sh" "$@"

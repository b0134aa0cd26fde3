#!/usr/bin/env bash
# The guided testbed's pilot sweep on one GPU host, in one go (issue 11; docs/experiments/guided/README.md):
# 1) the carry pair trained on the GPU (portable training: the CPU's weights), and the demo's addition pair retrained
#    there too, to check its weights_sha256 against the CPU's (README); 2) the pre-registered sweep (pilot_sweep.py):
#    9 arm specs x 2 learning rates x 5 seeds, 200 GRPO steps each, one CPU process per core (16 pilot processes on
#    one GPU time-share it and ran far slower: docs/experiments/guided/README.md), seed-major so that an interrupted
#    sweep has every spec's first seeds (about 13 minutes in all: rerun the same command to resume, finished runs are
#    skipped); 3) everything packed into $OUT_DIR.
set -xuo pipefail
OUT_DIR=${OUT_DIR:-outputs/pilot_carry_gpu}
JOBS=${JOBS:-16}
SWEEP_SECONDS=${SWEEP_SECONDS:-450}
export OPTIMAL_SAMPLING_CACHE=${OPTIMAL_SAMPLING_CACHE:-$PWD/outputs/cache} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT_DIR/device.txt"
# 1) the two pairs (the demo's in the background: only its hashes are compared)
(time python -m recipe.optimal_sampling.tasks --retrain --jobs 2 --train-device cuda \
    --cache-dir "$OUT_DIR/demo_pair_cuda") > "$OUT_DIR/demo_pair_cuda.log" 2>&1 &
time timeout 150 python -m recipe.optimal_sampling.tasks --task carry --jobs 2 --train-device cuda \
    2>&1 | grep -v "it/s" | tee "$OUT_DIR/carry_pair.log"
cp "$OPTIMAL_SAMPLING_CACHE/carry_models_v1/meta.json" "$OUT_DIR/carry_meta.json" || SWEEP_SECONDS=0  # no pair: no sweep
# 2) the sweep (pre-registered arms; see the doc)
[ "$SWEEP_SECONDS" -gt 0 ] && timeout "$SWEEP_SECONDS" python scripts/experiments/pilot_sweep.py --task carry --device cpu --jobs "$JOBS" \
    --seeds 0,1,2,3,4 --lrs 1e-4,3e-4 --steps 200 --eval-every 25 --n-test 256 --out "$OUT_DIR/sweep" \
    --arms on_policy=on_policy opd=opd control=balanced mixed=mixed_1of8 \
    imitation=balanced:mode=imitation positive=balanced:mode=positive_only \
    mixed_pb=mixed_1of8:baseline=policy,mode=positive_only \
    mixed_pb_critic=mixed_1of8:baseline=policy,mode=positive_only,critic_coef=1.0 \
    imitation_critic=balanced:mode=imitation,critic_coef=1.0,critic_rows=guided > "$OUT_DIR/sweep.log" 2>&1
wait
# 3) pack
tar czf "$OUT_DIR.tgz" --exclude="*.safetensors" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"

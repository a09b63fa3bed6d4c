#!/usr/bin/env bash
# Trains and exports every demo model, reproducing the shipped weights: the same commands,
# seed and step counts as the recorded run (see models/demo/README.md). On the shared 2-core
# machine the runs were time-capped (--max-minutes) and ran two at a time with one thread
# each; --stop-at replays where each cap stopped it, with the learning-rate schedule still
# planned for --steps, so the result does not depend on the machine's speed. One thread per
# run keeps the bf16 CPU reductions in the same order as in the recorded run.
# Each stage resumes from its checkpoint in .demo_work/ and skips itself once finished.
#   nohup tools/train_all_demo.sh > logs/train_all.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
SEED=${SEED:-0}
stage() { local log=$1; shift; echo "== $(date +%T) $*"; python tools/train_demo.py "$@" --seed "$SEED" --threads 1 > "logs/$log.log" 2>&1; }

# 1. The two VAEs (16-channel for SD3, 4-channel for DiT), side by side.
stage train_vae_sd3 vae --family sd3 --stop-at "${VAE_SD3_STEPS:-755}" &
stage train_vae_dit vae --family dit --stop-at "${VAE_DIT_STEPS:-761}" &
wait
# 2. Tokenizers and the frozen random text encoders of the SD3 demo.
stage train_text text
# 3. The denoisers, side by side: MMDiT (rectified flow) and DiT (DDPM, hybrid loss).
stage train_mmdit mmdit --stop-at "${MMDIT_STEPS:-2000}" &
stage train_dit dit --stop-at "${DIT_STEPS:-2132}" &
wait
# 4. The diffusers folders under models/demo/.
python tools/export_demo.py sd3
python tools/export_demo.py dit
echo "== $(date +%T) all done"

#!/usr/bin/env bash
# Trains and exports every demo model, reproducing the shipped weights: the same commands,
# seed and step counts as the recorded run (see models/demo/README.md). On the shared 2-core
# machine some runs were time-capped (--max-minutes); --stop-at replays where each cap
# stopped it, with the learning-rate schedule still planned for --steps, so the result does
# not depend on the machine's speed. The thread count of each run is the recorded one (it
# fixes the order of the bf16 CPU reductions).
# Each stage resumes from its checkpoint in .demo_work/ and skips itself once finished.
#   nohup tools/train_all_demo.sh > logs/train_all.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
SEED=${SEED:-0}
stage() { local log=$1; shift; echo "== $(date +%T) $*"; python tools/train_demo.py --seed "$SEED" --threads 1 "$@" > "logs/$log.log" 2>&1; }

# 1. The two VAEs (16-channel 8x down for SD3, 4-channel 4x down for DiT), side by side.
stage train_vae_sd3 vae --family sd3 --stop-at "${VAE_SD3_STEPS:-755}" &
stage train_vae_dit vae --family dit &
wait
# 2. Tokenizers and the frozen random text encoders of the SD3 demo.
stage train_text text
# 3. The denoisers: MMDiT (rectified flow, one thread), then DiT (DDPM cosine, hybrid loss, two).
stage train_mmdit mmdit --stop-at "${MMDIT_STEPS:-2000}"
stage train_dit dit --threads 2 --steps 3000
stage train_dit_5000 dit --threads 2 --steps 5000   # resumed, the cosine decay extended to 5000
stage train_dit_7000 dit --threads 2 --steps 7000   # and once more to 7000
# 4. The diffusers folders under models/demo/.
python tools/export_demo.py sd3
python tools/export_demo.py dit
echo "== $(date +%T) all done"

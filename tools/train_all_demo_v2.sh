#!/usr/bin/env bash
# Trains and exports the second demo generation (models/demo/README.md, "Second generation"):
# the same commands, seed and step counts as the recorded run. Each stage resumes from its
# checkpoint in .demo_work_v2/ and skips itself once finished. One thread per run (it fixes
# the order of the bf16 CPU reductions); the paired stages run side by side on 2 cores.
#   nohup tools/train_all_demo_v2.sh > logs/train_all_v2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
SEED=${SEED:-0}
stage() { local log=$1; shift; echo "== $(date +%T) $*"; python tools/train_demo_v2.py --seed "$SEED" --threads 1 "$@" > "logs/v2_$log.log" 2>&1; }

# 1. Both VAEs fine-tuned from the first demos' on 128-px v2 scenes (400 x 8 each).
stage vae_sd3 vae --family sd3 &
stage vae_pixart vae --family pixart &
wait
# 2. Tokenizers on the v2 caption language, frozen random CLIP-L / bigG / T5 (shared by both).
stage text text
# 3. The denoisers, side by side. The recorded PixArt run was planned for 1600 steps, stopped at
# 761 (its samples were still noise) and resumed with the cosine decay extended to 2400.
stage mmdit mmdit --steps 1600 &
stage pixart pixart --steps 1600 --stop-at 761 &
wait
stage pixart_2400 pixart --steps 2400 --stop-at 2400
# Its samples were still noise at 2400: resumed with the decay extended to 8000 (the recorded run
# was stopped at its step-4474 checkpoint), then from there with the Min-SNR-5 loss weight and the
# decay extended to 13000, on both cores (2 threads: its bf16 reductions are not bit-reproducible).
stage pixart_8000 pixart --steps 8000 --stop-at 4474
stage pixart_13000 pixart --steps 13000 --min-snr 5 --threads 2 --stop-at "${PIXART_STEPS:-13000}"
# 4. The diffusers folders.
python tools/export_demo.py sd3-128
python tools/export_demo.py pixart
echo "== $(date +%T) all done"

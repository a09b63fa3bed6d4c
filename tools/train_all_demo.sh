#!/usr/bin/env bash
# Trains every demo model in sequence (two trainings side by side on 2 cores are slower
# than one after the other). Each stage resumes from its checkpoint in .demo_work/ and skips
# itself when finished, so rerunning this script after an interruption continues the work.
# The SD3 pair first (VAE, then MMDiT), then the DiT pair.
#   nohup tools/train_all_demo.sh > logs/train_all.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
SEED=${SEED:-0}
run() { echo "== $(date +%T) $*"; python tools/train_demo.py "$@" --seed "$SEED"; }
run vae --family sd3 --max-minutes 15 > logs/train_vae_sd3.log 2>&1
run text > logs/train_text.log 2>&1
run mmdit --max-minutes 45 > logs/train_mmdit.log 2>&1
run vae --family dit --max-minutes 15 > logs/train_vae_dit.log 2>&1
run dit --max-minutes 32 > logs/train_dit.log 2>&1
echo "== $(date +%T) all done"

#!/usr/bin/env bash
# Evaluates the second demo generation (models/demo/README.md, "Second generation"), after
# tools/train_all_demo_v2.sh: DiTFastAttn plans calibrated on each model (training captions,
# window 32 = N/8 of 256 tokens), the fidelity table of every method against fewer steps on
# held-out scenes, the attention shares, and the floors of tests/test_demo_fidelity.py.
#   nohup tools/eval_all_demo_v2.sh [demo-sd3-128] [demo-pixart] > logs/eval_all_v2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS=${PROMPTS:-16}
FLOOR_PROMPTS=${FLOOR_PROMPTS:-6}
export OMP_NUM_THREADS=1
CALIBRATION=(--prompt "a blue square above a cyan square" --prompt "a green circle at the bottom right")

methods() {  # sets accel: the specs evaluated on model $1
    accel=(ditcache "ditcache(order=1)" promptgate ditcache+promptgate todo deltacache adaptive
           "fastattn(plan=bench/plans/$1-fastattn-0.1.json)")
}

evaluate() {  # model steps
    local m=$1 steps=$2
    echo "== $(date +%T) $m: calibrate"
    dite calibrate --model "$m" --steps "$steps" --threshold 0.1 --window 32 "${CALIBRATION[@]}" \
        -o "bench/plans/$m-fastattn-0.1.json"
    echo "== $(date +%T) $m: fidelity on $PROMPTS held-out scenes"
    local accel; methods "$m"
    python tools/eval_quality.py --model "$m" --prompts "$PROMPTS" --samples --accel "${accel[@]}" \
        --out "bench/quality-$m"
    echo "== $(date +%T) $m: done"
}

floors() {
    local m=$1
    local accel; methods "$m"
    python tools/eval_quality.py --model "$m" --prompts "$FLOOR_PROMPTS" --accel "${accel[@]}" \
        --record-floors tests/data/demo_fidelity_floors.json --out "/tmp/floors-$m"
}

# Arguments: the models to evaluate (default both; each runs as soon as it is trained).
declare -A STEPS=([demo-sd3-128]=28 [demo-pixart]=20)
MODELS=(${*:-demo-sd3-128 demo-pixart})
for m in "${MODELS[@]}"; do evaluate "$m" "${STEPS[$m]}" & done
wait
for m in "${MODELS[@]}"; do floors "$m"; done
[ $# -gt 0 ] || python tools/attention_share.py --model demo-sd3-128 demo-pixart demo-sd3 demo-dit > bench/attention-share.md
echo "== $(date +%T) all done"

#!/usr/bin/env bash
# qbench history on real gate runs: six `qbench gate` runs of suites/ci.toml into one history store, the fourth
# with every optimizer step planted 30 % slower from outside qbench (benchmarks/speed_gate_trials.py's
# sitecustomize, on the new side's PYTHONPATH only: the baseline side runs its own checkout alone), then
# `qbench history` on the store. The planted run should be named as a step up in every arm's speed ratio, and the
# run after it as the step down. About 2 minutes a gate run on a 2-core CPU.
#
#     OMP_NUM_THREADS=1 bash scripts/history_check.sh [OUT]      # default OUT: a new temporary folder
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out="${1:-$(mktemp -d)}"
mkdir -p "$out/plant"
python -c "import runpy; print(runpy.run_path('benchmarks/speed_gate_trials.py')['PLANT'])" > "$out/plant/sitecustomize.py"
here="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for i in 1 2 3 4 5 6; do
    planted=""
    [ "$i" = 4 ] && planted="$out/plant:"
    echo "gate run $i (load $(cut -d' ' -f1 /proc/loadavg))${planted:+: every step planted 30 % slower}"
    PYTHONPATH="$planted$here" QBENCH_TRIAL_SLOWER=0.3 \
        python -m qbench gate suites/ci.toml --baseline results/baselines/ci --device cpu --out "$out/run-$i" \
        --history "$out/store.sqlite" > "$out/gate-$i.log" 2>&1
    echo "  exit $?: $(grep -E 'no regression|regression:' "$out/gate-$i.log" | tail -1)"
done
python -m qbench history "$out/store.sqlite" --plot "$out/history.png"

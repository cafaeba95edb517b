#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, run the CUDA tests and a short suite under every
# weight format, then print peak memory per precision from each source -- NVML for this process
# tree, NVML for the whole device, torch allocated, torch reserved --, run suites/qlora.toml and print
# each optimizer's state bytes, whether paging took effect, and peak memory, run `qbench fit` with the GPU
# capped at a small budget (a smaller card emulated with torch.cuda.set_per_process_memory_fraction) and check
# that the batch it finds fits as a `qbench run` cell and the next one does not, and, with the time left,
# run cells side by side (--gpus), shards and device_map = "auto" (scripts/gpu_check_multi.sh).
#
#     bash scripts/gpu_check.sh        # from a fresh clone, with a CUDA build of torch installed
#
# It installs nothing but pip packages (qbench's dependencies, keeping the torch that is there),
# downloads no model (the suite's tiny CLIP is generated locally, tests/helpers/clip.py), and stops
# itself before 8 minutes. Records and tables stay in results/gpucheck/<run-id>/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${QBENCH_GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
left() { local s=$((BUDGET_S - (SECONDS - START))); echo $((s > 5 ? s : 5)); }
WORK=$(mktemp -d -t qbench-gpu-check.XXXXXX)
export CUDA_DEVICE_ORDER=PCI_BUS_ID HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

echo "== 1/8 torch and the GPU"
$PYTHON - <<'PY' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch first (and check nvidia-smi)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PY

echo "== 2/8 qbench's dependencies (pip only; the installed torch is kept)"
if ! $PYTHON -c "import peft, transformers, accelerate, bitsandbytes, pynvml, psutil, pytest, pytest_benchmark, pandas, rich, tabulate, pydantic, safetensors" 2>/dev/null; then
  TORCH_PIN=$($PYTHON -c "import torch; print(torch.__version__)")
  $PYTHON -m pip install --quiet -e ".[dev]" -c <(echo "torch==$TORCH_PIN") || exit 2
fi

echo "== 3/8 qbench env (every weight format tried on the GPU)"
timeout "$(left)" $PYTHON -m qbench env --device cuda || failed+=("qbench env")

echo "== 4/8 CUDA tests, and the NVML/memory tests that run anywhere"
timeout "$(left)" $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_nvml.py tests/test_memory.py \
  || failed+=("tests")

echo "== 5/8 a short suite under every weight format"
$PYTHON - "$WORK" <<'PY' || exit 2
import sys
from pathlib import Path

from tests.helpers import clip

work = Path(sys.argv[1])
# ~20 M parameters: weights visible next to the CUDA context
checkpoint = clip.checkpoint(work / "checkpoint", hidden=768, heads=4, image_size=32, patch_size=8)
data = clip.images_tsv(work / "data", train_images=24, eval_images=12, size=32)
precisions = ("bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq")
(work / "suite.toml").write_text(clip.suite(
    checkpoint, data, precisions, name="gpucheck", steps=30,
    lora='r = 4\nalpha = 8\ntarget_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]',
    evaluation="batch_size = 64\nrecall_k = [1, 5]",
))
PY
timeout "$(left)" $PYTHON -m qbench run "$WORK/suite.toml" --device cuda --out results || failed+=("suite")

echo "== peak memory per precision"
$PYTHON - <<'PY'
from pathlib import Path

from qbench.analysis.load import load_frame
from qbench.analysis.report.tables import peak_memory_table

runs = sorted(Path("results/gpucheck").glob("*/cells"), key=lambda p: p.stat().st_mtime)
if not runs:
    raise SystemExit("no run directory under results/gpucheck")
run_dir = runs[-1].parent
frame = load_frame([run_dir])
columns = [c for c in ("precision", "status", "error", "memory.nvml.device_name", "memory.source.nvml") if c in frame.columns]
print(frame[columns].to_markdown(index=False))
lines = []
for title, phase in (("peak over all phases", None), ("train phase", "train"), ("load phase", "load")):
    table = peak_memory_table(frame, phase)
    lines += [f"\n### {title} (MiB)\n", table.to_markdown(floatfmt=".1f")]
text = "\n".join(lines)
print(text)
(run_dir / "gpu_memory.md").write_text(text + "\n")
print(f"\nrecords: {run_dir / 'cells'}   tables: {run_dir / 'gpu_memory.md'}")
PY

echo "== 6/8 qbench fit on the GPU: the largest batch of the tiny Llama per precision, the GPU capped at \$QBENCH_FIT_BUDGET"
# a small card emulated: each trial's process is capped with torch.cuda.set_per_process_memory_fraction (the CUDA
# context is outside the cap); the figure judged is torch's peak reserved bytes above the process baseline
FIT_BUDGET=${QBENCH_FIT_BUDGET:-256MiB}
if ! $PYTHON -m qbench fit --help >/dev/null 2>&1; then
  echo "qbench fit is missing: this checkout has no fit command"; failed+=("fit (missing)")
else
  timeout "$(left)" $PYTHON scripts/fit_check.py suites/fit-llm.toml --out results/gpucheck-fit --error-limit 1 --any-answers \
    --fit-args="--device cuda --budget $FIT_BUDGET --axis batch_size" --run-args="--device cuda" || failed+=("fit")
  latest=$(ls -td results/gpucheck-fit/fits/fit-llm/fit-*/ 2>/dev/null | head -1)
  if [ -n "$latest" ] && [ -f "$latest/fit.md" ]; then
    cat "$latest/fit.md"
    $PYTHON - "$latest" <<'PY'
import json
import sys
from pathlib import Path

result = json.loads((Path(sys.argv[1]) / "fit.json").read_text())
print("\n### the trials' GPU figures (MiB)\n")
print("| arm | batch | fits | torch reserved (judged) | torch allocated | NVML process | NVML device | estimate |")
print("|---|---|---|---|---|---|---|---|")
for search in result["searches"]:
    for trial in search["trials"]:
        record_file = next(Path(trial["trial_dir"]).glob("cells/*.json"), None) if trial["trial_dir"] else None
        record = json.loads(record_file.read_text()) if record_file else {}
        mib = lambda key: f"{record[key] / 2**20:.1f}" if record.get(key) is not None else "n/a"  # noqa: E731
        print(f"| {search['arm']} | {trial['value']} | {trial['fits']} | {mib('memory.all_phases.torch_reserved_peak_bytes')} | "
              f"{mib('memory.all_phases.torch_allocated_peak_bytes')} | {mib('memory.all_phases.nvml_process_peak_bytes')} | "
              f"{mib('memory.all_phases.nvml_device_peak_bytes')} | {trial['estimate']['peak'] / 2**20:.1f} |")
PY
  else
    echo "no fit folder under results/gpucheck-fit: qbench fit did not finish"; failed+=("fit (no result)")
  fi
fi

echo "== 7/8 QLoRA's optimizers: suites/qlora.toml (nf4-dq x adamw / adamw8bit / paged_adamw8bit, bf16 + adamw)"
timeout "$(left)" $PYTHON -m qbench run suites/qlora.toml --device cuda --out results/gpucheck-qlora || failed+=("qlora suite")
$PYTHON - <<'PY'
from pathlib import Path

import pandas as pd

from qbench.analysis.load import load_frame

runs = sorted(Path("results/gpucheck-qlora/qlora").glob("*/cells"), key=lambda p: p.stat().st_mtime)
if not runs:
    raise SystemExit("no run directory under results/gpucheck-qlora/qlora")
run_dir = runs[-1].parent
frame = load_frame([run_dir])
columns = ["cell_id", "status", "optimizer.class", "optimizer.state_bytes", "optimizer.state.float32_bytes",
           "optimizer.state.uint8_bytes", "optimizer.params_with_8bit_state", "optimizer.paged", "optimizer.paged_state_bytes",
           "optimizer.paged_reason", "memory.train.torch_allocated_peak_bytes", "memory.train.torch_reserved_peak_bytes",
           "memory.train.nvml_process_peak_bytes", "speed.train_tokens_per_s", "quality.eval_after.perplexity"]
shown = frame[[c for c in columns if c in frame.columns]].copy()
for column in [c for c in shown.columns if c.startswith("memory.")]:
    shown[column.replace("_bytes", " MiB")] = pd.to_numeric(shown.pop(column), errors="coerce") / 2**20
text = shown.set_index("cell_id").T.to_markdown(floatfmt=".4g")
print(text)
(run_dir / "gpu_optimizers.md").write_text(text + "\n")
print(f"\nrecords: {run_dir / 'cells'}   table: {run_dir / 'gpu_optimizers.md'}")
PY

echo "== 8/8 several cells at a time (--gpus), shards (--shard), device_map auto: scripts/gpu_check_multi.sh"
if [ "$(left)" -gt 150 ]; then
  QBENCH_MULTI_MODEL=small WORK="$WORK/multi" PYTHON="$PYTHON" timeout "$(left)" bash scripts/gpu_check_multi.sh \
    || failed+=("multi-GPU")
else
  echo "skipped: $(left) s of the budget left; run bash scripts/gpu_check_multi.sh on its own"
fi

echo "finished in $((SECONDS - START)) s"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"

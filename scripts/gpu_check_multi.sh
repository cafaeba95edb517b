#!/usr/bin/env bash
# Multi-GPU checks of qbench on a machine with NVIDIA GPUs (no network needed):
#   1. `qbench run --gpus ...` runs cells in parallel, one process per slot, each with its own
#      CUDA_VISIBLE_DEVICES; on a single GPU the GPU is listed twice, so two cells share it
#   2. `--shard 1/2` and `--shard 2/2` together are exactly the cells of one full run
#   3. model.device_map = "auto" loads the base through accelerate, over every GPU of the slot
#      (`--gpus-per-cell`), and the record says where the base went
#   4. `--executor ray`: the same suite through a Ray cluster started for the run on this machine, one
#      cell per GPU (two per GPU on a single GPU: --gpus-per-cell 0.5); prints each cell's Ray GPU,
#      the GPU UUID the task saw, and its NVML peaks (skipped when Ray is not installed: pip install -e ".[ray]")
# The model is openai/clip-vit-base-patch32's architecture with random weights (python -m
# qbench.zoo.full_scale): at full size, or with QBENCH_MULTI_MODEL=small two layers per tower
# (what scripts/gpu_check.sh uses, to stay in its time budget); the data are generated image files
# and a TSV file.
#
#   bash scripts/gpu_check_multi.sh                          # WORK=/some/dir keeps the outputs
#   QBENCH_MULTI_MODEL=small bash scripts/gpu_check_multi.sh
#   QBENCH_MULTI_ONLY=ray bash scripts/gpu_check_multi.sh     # only the model, the data and check 4
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d -t qbench-gpu-multi-XXXX)}
mkdir -p "$WORK"

GPU_COUNT=$(nvidia-smi -L | grep -c '^GPU ' || true)
if [ "$GPU_COUNT" -lt 1 ]; then
    echo "no NVIDIA GPU visible (nvidia-smi -L lists none)" >&2
    exit 2
fi
if [ "$GPU_COUNT" -ge 2 ]; then
    GPUS=$(seq -s, 0 $((GPU_COUNT - 1)))
else
    GPUS="0,0"  # two slots on the one GPU: still two cells at a time
fi
ALL_GPUS=$(seq -s, 0 $((GPU_COUNT - 1)))
echo "== $GPU_COUNT GPU(s); slots: --gpus $GPUS; work folder $WORK"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

echo "== CLIP ViT-B/32 (random weights, ${QBENCH_MULTI_MODEL:-full} size) and a TSV data set"
"$PY" - "$WORK" "${QBENCH_MULTI_MODEL:-full}" <<'EOF'
import copy
import sys
from pathlib import Path
from qbench.zoo.full_scale import CLIP_VIT_B32_CONFIG, write_random_clip
from tests.helpers import clip

work, size = Path(sys.argv[1]), sys.argv[2]
config = copy.deepcopy(CLIP_VIT_B32_CONFIG)
if size == "small":  # the real widths and vocabulary, two layers per tower
    config["vision_config"]["num_hidden_layers"] = config["text_config"]["num_hidden_layers"] = 2
checkpoint = write_random_clip(work / "clip-vit-b32-random", config)
data = clip.images_tsv(work / "data", train_images=96, eval_images=32, size=48, user_format=True)
train = 'batch_size = 32\ngrad_accum = 2\nlr = 1e-4\nscheduler = "cosine"\nwarmup_steps = 2\nmax_length = 64\nuntimed_steps = 2'
precisions = ("bf16", "int8", "fp4", "fp4-dq", "nf4", "nf4-dq")
common = dict(steps=12, train=train, lora=clip.USER_LORA, evaluation=None, data_extra="num_workers = 2")
(work / "multi.toml").write_text(clip.suite(checkpoint, data, precisions, name="multi", **common))
(work / "auto.toml").write_text(clip.suite(checkpoint, data, precisions, name="auto", model_extra='device_map = "auto"', **common))
EOF

ONLY=${QBENCH_MULTI_ONLY:-all}
if [ "$ONLY" = all ]; then
echo "== 1. cells in parallel: --gpus $GPUS"
"$PY" -m qbench run "$WORK/multi.toml" --out "$WORK/out" --gpus "$GPUS"
"$PY" - "$WORK/out/multi" "$GPUS" <<'EOF'
import sys
from datetime import datetime
from pathlib import Path
from qbench.contract.records import read_records

(run_dir,) = Path(sys.argv[1]).iterdir()
slots = sys.argv[2].split(",")
records = read_records(run_dir)
assert len(records) == 6 and all(r["status"] == "ok" for r in records), [(r["cell_id"], r["status"], r.get("error")) for r in records]
for r in records:
    assert r["env.device"] == "cuda" and r["env.cuda_visible_devices"] in slots, r["env.cuda_visible_devices"]
    assert r["env.cuda_device_count"] == 1, r["env.cuda_device_count"]
    assert r["memory.train.torch_allocated_peak_bytes"] > 0
    print(f'{r["cell_id"]:>14}  CUDA_VISIBLE_DEVICES={r["env.cuda_visible_devices"]}  {r["env.device_name"]}  '
          f'{r["time.start"]} .. {r["time.end"]}  train peak {r["memory.train.torch_allocated_peak_bytes"] / 2**20:.0f} MiB  '
          f'NVML process peak {r.get("memory.train.nvml_process_peak_bytes")}')
spans = [(datetime.fromisoformat(r["time.start"]), datetime.fromisoformat(r["time.end"])) for r in records]
overlaps = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])
assert overlaps > 0, "no two cells ran at the same time"
print(f"ok: 6 cells, {len(set(slots))} GPU(s) used as {len(slots)} slots, {overlaps} overlapping pair(s) of cells")
EOF

echo "== 2. shards: --shard 1/2 + --shard 2/2 == one full run"
"$PY" -m qbench run "$WORK/multi.toml" --out "$WORK/shards" --gpus "$GPUS" --only bf16,nf4-dq,int8 --shard 1/2
"$PY" -m qbench run "$WORK/multi.toml" --out "$WORK/shards" --gpus "$GPUS" --only bf16,nf4-dq,int8 --shard 2/2
"$PY" - "$WORK/shards/multi" <<'EOF'
import sys
from pathlib import Path
from qbench.analysis.load import load_frame

run_dirs = sorted(Path(sys.argv[1]).iterdir())
assert len(run_dirs) == 2, run_dirs
frame = load_frame(run_dirs)
assert sorted(frame["cell_id"]) == ["bf16-seed0", "int8-seed0", "nf4-dq-seed0"], list(frame["cell_id"])
assert set(frame["status"]) == {"ok"}, frame[["cell_id", "status", "error"]]
print("ok: the two shards hold bf16, int8 and nf4-dq once each")
EOF

echo "== 3. device_map = auto over $GPU_COUNT GPU(s) per cell"
"$PY" -m qbench run "$WORK/auto.toml" --out "$WORK/auto" --gpus "$ALL_GPUS" --gpus-per-cell "$GPU_COUNT" --only bf16,nf4-dq
"$PY" - "$WORK/auto/auto" "$GPU_COUNT" <<'EOF'
import sys
from pathlib import Path
from qbench.contract.records import read_records

(run_dir,) = Path(sys.argv[1]).iterdir()
gpu_count = int(sys.argv[2])
for r in read_records(run_dir):
    assert r["status"] == "ok", (r["cell_id"], r.get("error"))
    assert r["config.device_map"] == "auto" and r["env.cuda_device_count"] == gpu_count
    devices = r["model.devices"].split(",")
    assert all(d.startswith("cuda") for d in devices), devices
    if gpu_count > 1:
        assert len(devices) > 1 and r["model.device_map_modules"], (devices, r["model.device_map_modules"])
    split = r["model.device_map_modules"]
    how = f"{split} modules placed by accelerate" if split else "one piece: accelerate recorded no split"
    print(f'{r["cell_id"]:>14}  base on {r["model.devices"]}  ({how})')
print("ok: device_map = auto")
EOF
fi

echo "== 4. cells as Ray tasks: --executor ray"
if ! "$PY" -c "import ray" 2>/dev/null; then
    echo "skipped: Ray is not installed (pip install -e \".[ray]\")"
else
    if [ "$GPU_COUNT" -ge 2 ]; then PER_CELL=1; else PER_CELL=0.5; fi  # one GPU: two cells share it
    RAY_USAGE_STATS_ENABLED=0 "$PY" -m qbench run "$WORK/multi.toml" --out "$WORK/ray" --executor ray --device cuda \
        --gpus-per-cell "$PER_CELL" --only bf16,int8,nf4,nf4-dq
    "$PY" - "$WORK/ray/multi" <<'EOF'
import json
import sys
from datetime import datetime
from pathlib import Path
from qbench.contract.records import read_records

(run_dir,) = Path(sys.argv[1]).iterdir()
records = read_records(run_dir)
assert len(records) == 4 and all(r["status"] == "ok" for r in records), [(r["cell_id"], r["status"], r.get("error")) for r in records]
MiB = 2**20
for r in records:
    assert r["env.executor"] == "ray" and r["env.ray.gpu_ids"] == r["env.cuda_visible_devices"], r
    uuids = (r["env.ray.gpu_uuids"] or "").split(",")
    # the GPU Ray gave the task is the one the cell measured: the task's NVML UUID == the cell's NVML device
    assert r["memory.nvml_available"] and r["memory.nvml.device_uuid"] == uuids[0], (uuids, r.get("memory.nvml.device_uuid"))
    print(f'{r["cell_id"]:>14}  node {r["env.ray.node_ip"]}  Ray GPU {r["env.ray.gpu_ids"]}  {uuids[0]}  '
          f'NVML process peak {r["memory.all_phases.nvml_process_peak_bytes"] / MiB:,.0f} MiB  '
          f'device peak {r["memory.all_phases.nvml_device_peak_bytes"] / MiB:,.0f} MiB  '
          f'torch allocated peak {r["memory.all_phases.torch_allocated_peak_bytes"] / MiB:,.0f} MiB')
spans = [(datetime.fromisoformat(r["time.start"]), datetime.fromisoformat(r["time.end"])) for r in records]
overlaps = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])
manifest = json.loads((run_dir / "run.json").read_text())
print(f'ok: 4 cells on Ray ({manifest["ray"]["cell_resources"]} each, {len({r["env.ray.gpu_uuids"] for r in records})} GPU(s)), '
      f'{overlaps} overlapping pair(s) of cells')
EOF
fi
echo "== all multi-GPU checks passed ($WORK)"

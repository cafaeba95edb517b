"""Synthetic cell records with the fields and magnitudes a real tiny-CLIP run writes (for report/compare tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qbench.contract.schema import SCHEMA_VERSION

# per precision: (base weight bytes, quantized codes bytes, bits/param, samples/s, peak RSS, mean R@1 after)
PROFILE = {
    "bf16": (445_450, 0, None, 20.0, 580_000_000, 0.60),
    "int8": (254_218, 98_304, 8.375, 17.0, 690_000_000, 0.59),
    "nf4-dq": (174_930, 49_152, 5.22, 15.0, 585_000_000, 0.57),
}


def make_record(precision: str, seed: int = 0, run_id: str = "run-a", **overrides: Any) -> dict[str, Any]:
    """One ok clip record; `overrides` replace fields (dots in names are written as '__' in keywords)."""
    base_bytes, codes, bits, samples_per_s, rss, recall = PROFILE[precision]
    recall += 0.01 * seed  # seeds differ a little, as they do
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "suite": "ci", "run_id": run_id, "cell_id": f"{precision}-seed{seed}", "task": "clip",
        "model": "builtin:tiny-clip", "precision": precision, "baseline_precision": "bf16", "seed": seed,
        "status": "ok", "error": None, "env.device": "cpu", "env.device_name": "AMD EPYC", "env.hostname": "vm",
        "env.git_commit": "abc", "env.torch_version": "2.13.0+cpu", "env.bitsandbytes_version": "0.50.2",
        "config.train.steps": 8, "config.lora.r": 16, "config.lora.target_modules": "q_proj,v_proj",
        "config.train.gradient_checkpointing": False, "data.source": "builtin:shapes",
        "weights.load.base_bytes": base_bytes, "weights.load.quantized_codes_bytes": codes,
        "weights.load.bits_per_quantized_param": bits, "params.trainable": 32768,
        "memory.all_phases.rss_peak_bytes": rss, "memory.load.rss_peak_bytes": rss - 120_000_000,
        "memory.train.rss_peak_bytes": rss - 20_000_000, "memory.train.torch_allocated_peak_bytes": None,
        "speed.train_samples_per_s": samples_per_s, "speed.train_tokens_per_s": samples_per_s * 8,
        "speed.step_time_p50_s": 32 / samples_per_s, "time.train.wall_s": 8 * 32 / samples_per_s, "time.load.wall_s": 1.5,
        "quality.eval_before.mean_recall@1": 0.25, "quality.eval_after.mean_recall@1": recall,
        "quality.eval_after.i2t_recall@1": recall + 0.01, "quality.eval_after.t2i_recall@1": recall - 0.01,
        "train.final_loss": 1.2,
    }
    record.update({key.replace("__", "."): value for key, value in overrides.items()})
    return record


def make_records(precisions=("bf16", "int8", "nf4-dq"), seeds=(0,), run_id: str = "run-a") -> list[dict[str, Any]]:
    return [make_record(p, s, run_id) for s in seeds for p in precisions]


def by_precision(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records of one seed by precision name, so a test says `["nf4-dq"]` rather than a position."""
    return {record["precision"]: record for record in records}


def write_run(folder: Path, records: list[dict[str, Any]], suite_text: str | None = None) -> Path:
    """A run directory as the runner writes it: cells/<cell>.json (and run.json when a suite text is given)."""
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / "cells" / f"{record['cell_id']}.json").write_text(json.dumps(record), encoding="utf-8")
    if suite_text is not None:
        (folder / "run.json").write_text(json.dumps({"suite_text": suite_text}), encoding="utf-8")
    return folder


def slower(record: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same record measured on a machine `factor` times slower: rates divided, times multiplied."""
    changed = dict(record)
    for key, value in record.items():
        if value is None:
            continue
        if key.startswith("speed.") and key.endswith("_per_s"):
            changed[key] = value / factor
        elif key.startswith(("speed.", "time.")) and key.endswith("_s"):
            changed[key] = value * factor
    return changed


def make_runs(count: int = 6, prefix: str = "run", precisions=("bf16", "int8", "nf4-dq")) -> list[dict[str, Any]]:
    """`count` runs of seed 0 (run ids `<prefix>-<i>`), their speeds a little apart from run to run (no two runs
    time alike), so that a rank test over the runs' speed ratios has that many distinct samples a side (five is
    the fewest with which one can reach p < 0.01)."""
    records = []
    for index in range(count):
        wiggle = 1 + 0.004 * (index - (count - 1) / 2)
        for record in make_records(precisions, (0,), f"{prefix}-{index}"):
            if record["precision"] != record["baseline_precision"]:
                record["speed.train_samples_per_s"] *= wiggle
                record["speed.train_tokens_per_s"] *= wiggle
                record["speed.step_time_p50_s"] /= wiggle
            records.append(record)
    return records

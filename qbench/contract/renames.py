"""Every record key that schema 3 renamed, in one table: RENAMES maps a schema-2 key to its schema-3 key.

Readers convert a schema-2 record through it (`convert`), and the same table renames the keys in code and
documents. A key ending in "." is a prefix: it renames every key that starts with it (the open parts: quality
metrics by name, bytes by dtype), matched at the start of a key only; the longest prefix wins. Two schema-2
keys that held one value under two names map to one key; the key that already had the schema-3 name keeps its
value. No figure changed meaning in schema 3: a converted record is compared like a schema-3 one.
"""

from __future__ import annotations

from typing import Any

from qbench.contract.schema import SCHEMA_VERSION

RENAMES: dict[str, str] = {
    # one setting, one key: the duplicates of schema 2 (the same value under two names) keep the [train] name;
    # train.final_loss is the loss of the last step run (train.steps_completed), as train.last_loss was
    "config.prepare": "config.train.prepare",
    "config.gradient_checkpointing": "config.train.gradient_checkpointing",
    "train.last_loss": "train.final_loss",
    # the phase is eval_before / eval_after wherever it appears, never before / after
    "eval.after_absent_reason": "quality.eval_after_absent_reason",
    "quality.before.": "quality.eval_before.",
    "quality.after.": "quality.eval_after.",
    "interval.before.": "interval.eval_before.",
    "interval.after.": "interval.eval_after.",
    "per_window.before.": "per_window.eval_before.",
    "per_window.after.": "per_window.eval_after.",
    # a phase or part is a key's segment: time.<part>.wall_s, as memory.<phase>.*, cpu.<phase>.*
    "time.process_start_s": "time.process_start.wall_s",
    "time.data_s": "time.data.wall_s",
    "time.load_s": "time.load.wall_s",
    "time.readback_s": "time.readback.wall_s",
    "time.prepare_s": "time.prepare.wall_s",
    "time.eval_before_s": "time.eval_before.wall_s",
    "time.train_s": "time.train.wall_s",
    "time.eval_after_s": "time.eval_after.wall_s",
    "time.adapter_save_s": "time.adapter_save.wall_s",
    "time.cell_wall_s": "time.cell.wall_s",
    "time.other_s": "time.other.wall_s",
    "time.other_note": "time.other.note",
    # one spelling per memory source, <source>_peak_bytes, in every phase, over all phases and (as <source>_bytes)
    # in the process baseline; the sampler's seconds carry their unit
    "memory.data.torch_max_allocated_bytes": "memory.data.torch_allocated_peak_bytes",
    "memory.data.torch_max_reserved_bytes": "memory.data.torch_reserved_peak_bytes",
    "memory.data.seconds": "memory.data.sampled_s",
    "memory.load.torch_max_allocated_bytes": "memory.load.torch_allocated_peak_bytes",
    "memory.load.torch_max_reserved_bytes": "memory.load.torch_reserved_peak_bytes",
    "memory.load.seconds": "memory.load.sampled_s",
    "memory.prepare.torch_max_allocated_bytes": "memory.prepare.torch_allocated_peak_bytes",
    "memory.prepare.torch_max_reserved_bytes": "memory.prepare.torch_reserved_peak_bytes",
    "memory.prepare.seconds": "memory.prepare.sampled_s",
    "memory.eval_before.torch_max_allocated_bytes": "memory.eval_before.torch_allocated_peak_bytes",
    "memory.eval_before.torch_max_reserved_bytes": "memory.eval_before.torch_reserved_peak_bytes",
    "memory.eval_before.seconds": "memory.eval_before.sampled_s",
    "memory.train.torch_max_allocated_bytes": "memory.train.torch_allocated_peak_bytes",
    "memory.train.torch_max_reserved_bytes": "memory.train.torch_reserved_peak_bytes",
    "memory.train.seconds": "memory.train.sampled_s",
    "memory.eval_after.torch_max_allocated_bytes": "memory.eval_after.torch_allocated_peak_bytes",
    "memory.eval_after.torch_max_reserved_bytes": "memory.eval_after.torch_reserved_peak_bytes",
    "memory.eval_after.seconds": "memory.eval_after.sampled_s",
    "memory.peak_pss_bytes": "memory.all_phases.pss_peak_bytes",
    "memory.peak_rss_bytes": "memory.all_phases.rss_peak_bytes",
    "memory.peak_nvml_process_bytes": "memory.all_phases.nvml_process_peak_bytes",
    "memory.peak_nvml_device_bytes": "memory.all_phases.nvml_device_peak_bytes",
    "memory.peak_torch_max_allocated_bytes": "memory.all_phases.torch_allocated_peak_bytes",
    "memory.peak_torch_max_reserved_bytes": "memory.all_phases.torch_reserved_peak_bytes",
    "memory.process_baseline_at": "memory.process_baseline.at",
    "memory.process_baseline_pss_bytes": "memory.process_baseline.pss_bytes",
    "memory.process_baseline_rss_bytes": "memory.process_baseline.rss_bytes",
    "memory.process_baseline_nvml_process_bytes": "memory.process_baseline.nvml_process_bytes",
    "memory.process_baseline_torch_allocated_bytes": "memory.process_baseline.torch_allocated_bytes",
    "memory.process_baseline_torch_reserved_bytes": "memory.process_baseline.torch_reserved_bytes",
    # the base read back after the load phase (weights.load.*) and after the prepare phase (weights.prepare.*; it
    # was weights.train.*, though read before the train phase); its linears' classes are weights, not a 'format'
    "weights.base_bytes": "weights.load.base_bytes",
    "weights.quantized_codes_bytes": "weights.load.quantized_codes_bytes",
    "weights.quant_state_bytes": "weights.load.quant_state_bytes",
    "weights.unquantized_bytes": "weights.load.unquantized_bytes",
    "weights.params": "weights.load.params",
    "weights.quantized_params": "weights.load.quantized_params",
    "weights.unquantized_params": "weights.load.unquantized_params",
    "weights.quantized_share_of_params": "weights.load.quantized_share_of_params",
    "weights.unquantized_share_of_bytes": "weights.load.unquantized_share_of_bytes",
    "weights.bits_per_quantized_param": "weights.load.bits_per_quantized_param",
    "weights.bits_per_param": "weights.load.bits_per_param",
    "weights.unquantized_param_dtypes": "weights.load.unquantized_param_dtypes",
    "weights.train.base_bytes": "weights.prepare.base_bytes",
    "weights.train.quantized_codes_bytes": "weights.prepare.quantized_codes_bytes",
    "weights.train.quant_state_bytes": "weights.prepare.quant_state_bytes",
    "weights.train.unquantized_bytes": "weights.prepare.unquantized_bytes",
    "weights.train.params": "weights.prepare.params",
    "weights.train.quantized_params": "weights.prepare.quantized_params",
    "weights.train.unquantized_params": "weights.prepare.unquantized_params",
    "weights.train.quantized_share_of_params": "weights.prepare.quantized_share_of_params",
    "weights.train.unquantized_share_of_bytes": "weights.prepare.unquantized_share_of_bytes",
    "weights.train.bits_per_quantized_param": "weights.prepare.bits_per_quantized_param",
    "weights.train.bits_per_param": "weights.prepare.bits_per_param",
    "weights.train.unquantized_param_dtypes": "weights.prepare.unquantized_param_dtypes",
    "weights.dtype.": "weights.load.dtype.",
    "weights.train.dtype.": "weights.prepare.dtype.",
    "weights.quant_state.": "weights.load.quant_state.",
    "weights.train.quant_state.": "weights.prepare.quant_state.",
    "weights.unquantized.": "weights.load.unquantized.",
    "weights.train.unquantized.": "weights.prepare.unquantized.",
    "weights.error.": "weights.load.error.",
    "format.train.": "weights.prepare.linears.",
    "format.": "weights.load.linears.",
    # a split is a prefix of its figures' names (data.eval_captions, data.eval_duplicate_captions)
    "data.eval.duplicate_captions": "data.eval_duplicate_captions",
}


def renamed(key: str) -> str:
    """The schema-3 name of a schema-2 key (itself when schema 3 kept it)."""
    if key in RENAMES:
        return RENAMES[key]
    prefixes = [old for old in RENAMES if old.endswith(".") and key.startswith(old)]
    if not prefixes:
        return key
    longest = max(prefixes, key=len)
    return RENAMES[longest] + key[len(longest):]


def convert(record: dict[str, Any], version: int) -> dict[str, Any]:
    """A flat schema-`version` record as schema 3 (keys renamed; `converted_from_schema` says from what)."""
    converted: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in record.items():
        new = renamed(key)
        (moved if new != key else converted)[new] = value
    for key, value in moved.items():
        converted.setdefault(key, value)  # a duplicate's other name already holds the value
    if converted.get("env.cell_launcher") == "forkserver":
        _forked_pss_as_tree(converted)
    converted["schema_version"] = SCHEMA_VERSION
    converted["converted_from_schema"] = version
    return converted


def _forked_pss_as_tree(record: dict[str, Any]) -> None:
    """A schema-2 forked cell's PSS left out the fork server's share of the pages they share: what schema 3 calls
    its tree PSS (`*.tree_pss_*`), while schema 3's `pss` counts that share too. Moved, so that no figure is read
    as another: the cell's PSS as its own process was not measured then."""
    for key in [k for k in record if k.startswith("memory.") and (k.endswith(".pss_peak_bytes") or k.endswith(".pss_bytes"))]:
        tree = key.removesuffix("pss_peak_bytes") + "tree_pss_peak_bytes" if key.endswith("_peak_bytes") else \
            key.removesuffix("pss_bytes") + "tree_pss_bytes"
        record.setdefault(tree, record.pop(key))

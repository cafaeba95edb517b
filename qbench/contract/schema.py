"""The record's vocabulary, written once: schema version, statuses, phases, memory sources, identity keys.

Every module that names a phase or a memory source imports it from here (the cell that measures,
the report that shows, the gate that compares), so the words cannot drift apart.
"""

from __future__ import annotations

# bump when a record key changes meaning; `qbench compare` refuses to compare across versions.
# 2: memory.<phase>.rss_peak_bytes is the cell's own process (PSS covers its workers), eval.protocol counts
#    duplicate captions as positives and non-finite scores as misses, the dense arm is named `dense`
#    (computing in compute_dtype), cells may have grid axes beyond precision and seed
SCHEMA_VERSION = 2

# ok: measured to the end; failed: an error (OOM, NaN loss, a crash) ended it; unsupported: the device cannot run
# the format; interrupted: Ctrl-C / SIGTERM; running: a checkpoint left while the cell is still going
STATUSES = ("ok", "failed", "unsupported", "interrupted", "running")

# the phases of a cell in the order they run (memory.<phase>.*, time.<phase>_s)
PHASES = ("data", "load", "prepare", "eval_before", "train", "eval_after")

# where a cell's wall time goes, in the order it is spent (time.<part>_s): process start and imports (from the
# process's creation to the end of its imports), the phases, the read-back of the loaded base's format, bytes
# and weight error, and the adapter's save; the runner adds time.cell_wall_s and time.other_s, the rest
TIME_PARTS = ("process_start", "data", "load", "readback", "prepare", "eval_before", "train", "eval_after", "adapter_save")

# per-phase memory figures (memory.<phase>.<key>) -> how a report labels them
MEMORY_SOURCES = {
    "nvml_process_peak_bytes": "NVML process",
    "nvml_device_peak_bytes": "NVML device",
    "torch_max_allocated_bytes": "torch allocated",
    "torch_max_reserved_bytes": "torch reserved",
    # of the cell's process tree (DataLoader workers included, shared pages once) as its own process: a cell forked
    # from the fork server counts the server's share of the pages they share too (qbench.cell.measure.forked)
    "pss_peak_bytes": "PSS",
    "tree_pss_peak_bytes": "PSS as forked",  # the same tree's PSS without that share: what a forked cell itself holds
    "rss_peak_bytes": "RSS",  # of the cell's own process
}


def overall_peak_key(source: str) -> str:
    """`memory.peak_<source>_bytes`, the largest figure of a per-phase source over every phase."""
    return f"memory.peak_{source.removesuffix('_peak_bytes').removesuffix('_bytes')}_bytes"


def process_baseline_key(source: str) -> str:
    """`memory.process_baseline_<what>_bytes`: what a per-phase source (`rss_peak_bytes`, `torch_max_allocated_bytes`)
    read just before the model was loaded: the runtime (Python, torch, the data) that no weight format changes."""
    what = source.removesuffix("_bytes").removesuffix("_peak").replace("torch_max_", "torch_")
    return f"memory.process_baseline_{what}_bytes"


# the sources whose process baseline is recorded: the process's own memory (the whole device's is not the process's)
PROCESS_MEMORY_SOURCES = tuple(source for source in MEMORY_SOURCES if source != "nvml_device_peak_bytes")

# the order a per-phase plot prefers them (the first one with values is used)
# on a CPU the tree's PSS: RSS summed over forked DataLoader workers would count shared pages once per worker
PHASE_MEMORY_PREFERENCE = ("torch_max_allocated_bytes", "nvml_process_peak_bytes", "pss_peak_bytes", "rss_peak_bytes")

# what says which cell a record is, in every record, whether the cell finished or its process died
IDENTITY_KEYS = (
    "schema_version", "suite", "suite_sha256", "run_id", "cell_id", "task", "model", "precision",
    "baseline_precision", "seed", "config.safetensors_only", "config.trust_remote_code",
)

# a cell that had a core less than this share of the time it was ready to run was time-sliced so finely that its CPU
# time moved too (cold caches, a busy SMT sibling): its speed says more about the machine than about the cell, so the
# record says so and compare judges no speed ratio of it
STARVED_SHARE = 0.5

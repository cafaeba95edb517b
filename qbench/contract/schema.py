"""The record's vocabulary, written once: schema version, statuses, phases, memory sources, identity keys.

Every module that names a phase or a memory source imports it from here (the cell that measures,
the report that shows, the gate that compares), so the words cannot drift apart.
"""

from __future__ import annotations

# bump when a record key changes name or meaning; readers convert the versions in CONVERTIBLE (names only) and
# refuse every other, and `qbench compare` never gates figures of different meaning against each other.
# 2: memory.<phase>.rss_peak_bytes is the cell's own process (PSS covers its workers), eval.protocol counts
#    duplicate captions as positives and non-finite scores as misses, the dense arm is named `dense`
#    (computing in compute_dtype), cells may have grid axes beyond precision and seed
# 3: the typed record (qbench.contract.record): one name per concept (qbench.contract.renames maps every
#    renamed key of schema 2), booleans and lists stay what they are; a forked cell's PSS counts the fork
#    server's share of the pages they share (its PSS as its own process), and schema 2's forked PSS, which did
#    not, converts to tree_pss
SCHEMA_VERSION = 3
# the older schemas a reader converts (their keys renamed by qbench.contract.renames.RENAMES)
CONVERTIBLE = (2,)

# ok: measured to the end; failed: an error (OOM, NaN loss, a crash) ended it; unsupported: the device cannot run
# the format; interrupted: Ctrl-C / SIGTERM; running: a checkpoint left while the cell is still going
STATUSES = ("ok", "failed", "unsupported", "interrupted", "running")

# the phases of a cell in the order they run (memory.<phase>.*, cpu.<phase>.*, time.<phase>.wall_s,
# quality.<phase>.*; weights.<phase>.* for the base as the load and prepare phases leave it); `init` (a LoRA init
# that decomposes the full-precision base first) and the merges run only when a suite asks, and count in no
# memory.all_phases.* peak
PHASES = ("data", "init", "load", "prepare", "eval_before", "train", "eval_after", "merge_dequantized", "merge_requantized")
ON_REQUEST_PHASES = ("init", "merge_dequantized", "merge_requantized")

# where a cell's wall time goes, in the order it is spent (time.<part>.wall_s): process start and imports (from
# the process's creation to the end of its imports), the phases, the read-back of the loaded base's format,
# bytes and weight error, and the adapter's save; the runner adds time.cell.wall_s (the whole process) and
# time.other.wall_s, the rest
TIME_PARTS = ("process_start", "data", "init", "load", "readback", "prepare", "eval_before", "train", "eval_after",
              "adapter_save", "merge_dequantized", "merge_requantized")

def time_key(part: str) -> str:
    """`time.<part>.wall_s`: the wall seconds of a part of the cell (TIME_PARTS, `other`, `cell`)."""
    return f"time.{part}.wall_s"


# the peak of each memory source in a phase (memory.<phase>.<source>_peak_bytes) -> how a report labels it
MEMORY_SOURCES = {
    "nvml_process_peak_bytes": "NVML process",
    "nvml_device_peak_bytes": "NVML device",
    "torch_allocated_peak_bytes": "torch allocated",
    "torch_reserved_peak_bytes": "torch reserved",
    # of the cell's process tree (DataLoader workers included, shared pages once) as its own process: a cell forked
    # from the fork server counts the server's share of the pages they share too (qbench.cell.measure.forked)
    "pss_peak_bytes": "PSS",
    "tree_pss_peak_bytes": "PSS as forked",  # the same tree's PSS without that share: what a forked cell itself holds
    "rss_peak_bytes": "RSS",  # of the cell's own process
}
# the largest figure of each source over every phase: memory.all_phases.<source>_peak_bytes
ALL_PHASES = "all_phases"


def overall_peak_key(source: str) -> str:
    """`memory.all_phases.<source>_peak_bytes`, the largest figure of a per-phase source over every phase."""
    return f"memory.{ALL_PHASES}.{source}"


def process_baseline_key(source: str) -> str:
    """`memory.process_baseline.<source>_bytes`: what a source (`rss_peak_bytes`, `torch_allocated_peak_bytes`) read
    just before the model was loaded: the runtime (Python, torch, the data) that no weight format changes."""
    return f"memory.process_baseline.{source.removesuffix('_peak_bytes')}_bytes"


# the sources whose process baseline is recorded: the process's own memory (the whole device's is not the process's)
PROCESS_MEMORY_SOURCES = tuple(source for source in MEMORY_SOURCES if source != "nvml_device_peak_bytes")

# the order a per-phase plot prefers them (the first one with values is used)
# on a CPU the tree's PSS: RSS summed over forked DataLoader workers would count shared pages once per worker
PHASE_MEMORY_PREFERENCE = ("torch_allocated_peak_bytes", "nvml_process_peak_bytes", "pss_peak_bytes", "rss_peak_bytes")

# what says which cell a record is, in every record, whether the cell finished or its process died
IDENTITY_KEYS = (
    "schema_version", "suite", "suite_sha256", "run_id", "cell_id", "task", "model", "precision",
    "baseline_precision", "seed", "config.safetensors_only", "config.trust_remote_code",
)

# a cell that had a core less than this share of the time it was ready to run was time-sliced so finely that its CPU
# time moved too (cold caches, a busy SMT sibling): its speed says more about the machine than about the cell, so the
# record says so and compare judges no speed ratio of it
STARVED_SHARE = 0.5

"""The typed cell record (schema 3) and run manifest: every key a record may hold, what it means, and its metadata.

A record is nested by what it describes (identity, environment, configuration, weights, memory by phase and
source, time, speed, quality by phase, intervals ...). Each measured number carries a `Figure` (its unit, which
direction is better, how `qbench compare` judges it); each number that describes a setting carries a `Setting`.
Reports and the gate read labels, units and tolerance classes from here (`qbench.contract.fields`), never from
name patterns.

On disk, in a DataFrame and in code a record key is one dotted name: the path through the model, except that
the fields of `identity` and `outcome` stand alone (`precision`, `status`, not `identity.precision`). So a
record file is flat JSON (`{"memory.train.pss_peak_bytes": ...}`) and one DataFrame row; `validate` turns it
into the model and `flatten` back, key for key. A key the model does not declare fails validation, except
inside the open parts declared as such (quality metrics by name, bytes by dtype, a test stand-in's `test.*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from qbench.contract.precisions import DTYPE_NAMES
from qbench.contract.schema import PHASES, SCHEMA_VERSION, STATUSES

# --- metadata -----------------------------------------------------------------------------------------------

Better = Literal["higher", "lower"]
# exact: must match between runs (bytes, bits, counts); quality: a task metric, compared within a tolerance;
# health: a count of non-finite model outputs, which must not rise; memory: a peak, compared within a relative
# tolerance; speed: an absolute time or rate, never compared across runs (only as ratios within one);
# informational: measured and shown, never gated; interval: a bound or standard error of a quality metric
Gate = Literal["exact", "quality", "health", "memory", "speed", "informational", "interval"]


@dataclass(frozen=True)
class Figure:
    """A measured number: its unit, which way is better (None: neither), how the gate judges it."""

    unit: str
    better: Better | None
    gate: Gate


@dataclass(frozen=True)
class Setting:
    """A number that describes how the cell ran (a setting, a count of devices), not a measurement."""

    unit: str = ""


@dataclass(frozen=True)
class Bare:
    """A group whose fields stand alone in a record key (`precision`, not `identity.precision`)."""


@dataclass(frozen=True)
class Metrics:
    """An open dict of task metrics by name: each name's Figure comes from QUALITY_METRICS."""


# --- the open parts' keys -----------------------------------------------------------------------------------

# every quality metric a task records (quality.<phase>.<name>), with its Figure; the first match wins
QUALITY_METRICS: tuple[tuple[str, Figure], ...] = (
    (r"nonfinite_[a-z_]+", Figure("count", "lower", "health")),  # before the rest: never read as a loss
    (r"(i2t|t2i|mean)_recall@[1-9][0-9]*", Figure("fraction", "higher", "quality")),
    (r"perplexity", Figure("perplexity", "lower", "quality")),
    (r"bits_per_byte", Figure("bits/byte", "lower", "quality")),
    (r"nll_per_token", Figure("nats", "lower", "quality")),
)


def quality_metric(name: str) -> Figure | None:
    """The Figure of a quality metric name (`mean_recall@1`, `perplexity`), or None for a name no task records."""
    return next((figure for pattern, figure in QUALITY_METRICS if re.fullmatch(pattern, name)), None)


def _known_metric(name: str) -> str:
    if quality_metric(name) is None:
        raise ValueError(f"{name!r} is no quality metric a task records (qbench.contract.record.QUALITY_METRICS)")
    return name


def _bytes_key(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*_bytes", name):
        raise ValueError(f"{name!r} is not <dtype>_bytes")
    return name


def _plain_key(name: str) -> str:
    if not name or "." in name:
        raise ValueError(f"{name!r} cannot be part of a record key (empty, or holds a dot)")
    return name


MetricName = Annotated[str, AfterValidator(_known_metric)]
DtypeBytes = Annotated[str, AfterValidator(_bytes_key)]  # weights.load.dtype.bfloat16_bytes, optimizer.state.uint8_bytes
Name = Annotated[str, AfterValidator(_plain_key)]

# --- field shorthands ---------------------------------------------------------------------------------------

Text = str | None
Flag = bool | None
Number = int | float | None

ExactBytes = Annotated[int | None, Figure("bytes", "lower", "exact")]
ExactCount = Annotated[int | None, Figure("count", None, "exact")]
ExactFraction = Annotated[float | None, Figure("fraction", None, "exact")]
ExactBits = Annotated[float | None, Figure("bits", "lower", "exact")]
PeakBytes = Annotated[int | None, Figure("bytes", "lower", "memory")]
InformationalBytes = Annotated[int | None, Figure("bytes", "lower", "informational")]  # shown, never gated
Seconds = Annotated[float | None, Figure("s", "lower", "speed")]
Count = Annotated[int | None, Figure("count", None, "informational")]
Loss = Annotated[float | None, Figure("loss", "lower", "quality")]
SettingInt = Annotated[int | None, Setting()]
SettingNumber = Annotated[Number, Setting()]


class Part(BaseModel):
    """A part of a record: strict types, no undeclared key."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


# --- identity and outcome (keys stand alone) ----------------------------------------------------------------


class Identity(Part):
    """Which cell a record is, the same in a finished record and in the one the runner writes for a dead cell."""

    schema_version: Annotated[int, Setting()]
    suite: Text = None
    suite_sha256: Text = None
    run_id: Text = None
    cell_id: str
    task: Text = None
    model: Text = None  # the suite's model.id; what was loaded is model_path and model.*
    precision: str
    baseline_precision: Text = None
    seed: SettingInt = None
    model_path: Text = None
    # the `qbench run` or `--resume` that measured the cell (its start, UTC): speed ratios of cells measured in
    # different sessions are marked mixed
    run_session: Text = None
    # set by the reader, never written: the schema a record was converted from (qbench.contract.renames)
    converted_from_schema: SettingInt = None


class Outcome(Part):
    """How the cell ended: its status and, when not ok, the error."""

    status: Literal[STATUSES]  # type: ignore[valid-type]
    last_phase: Text = None
    error: Text = None
    error_type: Text = None
    error_phase: Text = None
    error_traceback: Text = None
    error_returncode: SettingInt = None


# --- environment and configuration --------------------------------------------------------------------------


class Ray(Part):
    """Where a Ray task ran the cell."""

    worker_pid: SettingInt = None
    node_id: Text = None
    node_ip: Text = None
    task_id: Text = None
    gpu_ids: Text = None
    gpu_uuids: Text = None
    gpu_uuids_reason: Text = None
    unavailable_reason: Text = None


class Slurm(Part):
    """Where a SLURM job (submitit) ran the cell."""

    job_id: Text = None
    cluster: Text = None  # slurm, or local where submitit found no SLURM


class Environment(Part):
    """`env.*`: versions, machine, device, and how the cell's process was started."""

    qbench_version: Text = None
    torch_version: Text = None
    transformers_version: Text = None
    peft_version: Text = None
    bitsandbytes_version: Text = None
    accelerate_version: Text = None
    pandas_version: Text = None
    nvidia_ml_py_version: Text = Field(None, alias="nvidia-ml-py_version")
    pillow_version: Text = None
    numpy_version: Text = None
    tokenizers_version: Text = None
    safetensors_version: Text = None
    python_version: Text = None
    hostname: Text = None
    git_commit: Text = None
    cpu_model: Text = None
    cpu_isa_flags: Text = None
    cpu_cores_available: SettingInt = None
    torch_cpu_capability: Text = None
    torch_threads: SettingInt = None
    threads_source: Text = None
    omp_wait_policy: Text = None  # OpenMP's wait policy in the cell's environment (PASSIVE by default)
    pid: SettingInt = None
    device: Text = None
    device_name: Text = None
    device_total_memory_bytes: Annotated[int | None, Setting("bytes")] = None
    cuda_version: Text = None
    cuda_device_count: SettingInt = None
    cuda_driver_version: Text = None
    cuda_driver_unavailable_reason: Text = None
    cuda_visible_devices: Text = None
    executor: Text = None
    cell_launcher: Text = None
    cells_side_by_side: SettingInt = None
    ray: Ray | None = None
    slurm: Slurm | None = None


class LoraSettings(Part):
    r: SettingInt = None
    alpha: SettingNumber = None
    dropout: SettingNumber = None
    bias: Text = None
    target_modules: Text = None  # comma-separated
    init: Text = None  # qbench.contract.inits
    use_dora: Flag = None


class TrainSettings(Part):
    """The suite's [train] table, as the cell ran it (a grid axis overrides its setting)."""

    steps: SettingInt = None
    batch_size: SettingInt = None
    grad_accum: SettingInt = None
    lr: SettingNumber = None
    weight_decay: SettingNumber = None
    scheduler: Text = None
    warmup_steps: SettingInt = None
    max_grad_norm: SettingNumber = None
    max_length: Annotated[int | None, Setting("tokens")] = None
    untimed_steps: SettingInt = None
    prepare: Text = None
    gradient_checkpointing: Flag = None
    optimizer: Text = None
    contrastive_batch: Text = None


class DataSettings(Part):
    num_workers: SettingInt = None


class EvalSettings(Part):
    protocol: Text = None


class Configuration(Part):
    """`config.*`: every suite setting the cell ran with."""

    data: DataSettings | None = None
    eval: EvalSettings | None = None
    compute_dtype: Text = None
    device_map: Text = None
    safetensors_only: Flag = None
    trust_remote_code: Flag = None
    lora: LoraSettings | None = None
    train: TrainSettings | None = None


class PrecisionSettings(Part):
    """`precision.*`: how the precision's base is built (qbench.contract.precisions)."""

    kind: Text = None
    quant_type: Text = None
    blocksize: SettingInt = None
    double_quant: Flag = None
    dense_dtype: Text = None
    llm_int8_threshold: SettingNumber = None


# compute.<dtype>_slowdown_x for each dtype a run may emulate
_Slowdowns = create_model(  # type: ignore[call-overload]
    "_Slowdowns", __base__=Part,
    **{f"{dtype}_slowdown_x": (Annotated[float | None, Figure("x", "lower", "informational")], None) for dtype in DTYPE_NAMES},
    # the training step of the suite's model timed in each dtype when `auto` measured (qbench.cell.compute_probe)
    **{f"{dtype}_step_s": (Annotated[float | None, Figure("s", "lower", "informational")], None) for dtype in DTYPE_NAMES},
)


class Compute(_Slowdowns):  # type: ignore[misc,valid-type]
    """`compute.*`: the compute dtype's setting, why it resolved as it did, and what this device only emulates."""

    dtype_setting: Text = None
    dtype_reason: Text = None
    dtype_measurement: Text = None  # the workload timed, and whether now or from the user cache
    dtype_measurement_cached: Flag = None
    emulated_dtypes: Text = None  # comma-separated


class Bnb(Part):
    cpu_weight_packing_disabled_layers: Count = None


class Readback(Part):
    """The read-back of the loaded base (within time.readback.wall_s, so outside time.*: the time.*_s figures
    sum to time.cell.wall_s)."""

    weight_error_s: Seconds = None


class OptimizerState(Part):
    """`optimizer.*`: the optimizer built (its settings) and its exact state after the first step."""

    name: Text = None
    library: Text = None
    class_: Text = Field(None, alias="class")
    state_bits: Annotated[int | None, Setting("bits")] = None
    requests_paging: Flag = None
    min_8bit_size: SettingInt = None
    beta1: SettingNumber = None
    beta2: SettingNumber = None
    eps: SettingNumber = None
    lr: SettingNumber = None
    weight_decay: SettingNumber = None
    params: ExactCount = None
    params_with_8bit_state: ExactCount = None
    params_with_32bit_state: ExactCount = None
    largest_param_elements: ExactCount = None
    state_tensors: ExactCount = None
    state_bytes: ExactBytes = None
    state: Annotated[dict[DtypeBytes, int], Figure("bytes", "lower", "exact")] | None = None
    paged: Flag = None
    paged_state_bytes: ExactBytes = None
    paged_reason: Text = None


class ModelFacts(Part):
    """`model.*`: what was loaded and where it sits."""

    devices: Text = None  # comma-separated
    device_count: SettingInt = None
    device_map_modules: SettingInt = None
    max_positions: Annotated[int | None, Setting("tokens")] = None
    max_positions_source: Text = None
    weight_files: Text = None  # comma-separated
    weight_format: Text = None
    base_origin: Text = None
    base_source: Text = None
    base_source_format: Text = None
    base_source_sha256: Text = None
    base_built_by: Text = None
    # transformers' load report: weights it initialised (missing from the checkpoint), dropped, or re-created
    missing_weights_count: Annotated[int | None, Figure("count", "lower", "exact")] = None
    unexpected_weights_count: Annotated[int | None, Figure("count", "lower", "exact")] = None
    mismatched_weights_count: Annotated[int | None, Figure("count", "lower", "exact")] = None
    missing_weights: Text = None  # comma-separated
    unexpected_weights: Text = None
    mismatched_weights: Text = None
    load_report: Text = None
    output_embeddings_tied: Flag = None


class Params(Part):
    trainable: ExactCount = None
    lora_modules: ExactCount = None


# --- data and evaluation protocol ---------------------------------------------------------------------------


class DataFingerprint(Part):
    """`data.fingerprint.*`: a hash of the data's content as the run's checks read it (qbench.contract.fingerprint):
    a resume refuses changed data, and compare refuses to judge runs on other data."""

    sha256: Text = None
    train_sha256: Text = None
    eval_sha256: Text = None
    files: Annotated[int | None, Figure("count", None, "exact")] = None
    read_bytes: Annotated[int | None, Figure("bytes", None, "exact")] = None
    method: Text = None


class Data(Part):
    """`data.*`: what was trained and evaluated on."""

    fingerprint: DataFingerprint | None = None
    source: Text = None
    sha256: Text = None
    train_images: ExactCount = None
    train_captions: ExactCount = None
    eval_images: ExactCount = None
    eval_captions: ExactCount = None
    eval_duplicate_captions: ExactCount = None
    train_captions_truncated: Count = None
    eval_captions_truncated: Count = None
    images_preprocessed_once: Flag = None
    train_chars: Count = None
    eval_chars: Count = None
    train_tokens: Count = None


class Evaluation(Part):
    """`eval.*`: how quality was measured (a change here means the protocol or the data changed)."""

    prefix_token_id: SettingInt = None  # the rolling protocol's first context token (the tokenizer's BOS)
    protocol: Text = None
    tokenizer: Text = None
    text_max_length_tokens: ExactCount = None
    window_tokens: ExactCount = None
    window_source: Text = None
    stride_tokens: ExactCount = None
    windows: ExactCount = None
    available_windows: Count = None
    scored_tokens: ExactCount = None
    bytes: ExactCount = None


# --- weights ------------------------------------------------------------------------------------------------


class QuantState(Part):
    """Bytes of every tensor bitsandbytes keeps beside the codes (qbench.cell.measure.weights.STATE_KINDS)."""

    absmax_bytes: ExactBytes = None
    nested_absmax_bytes: ExactBytes = None
    code_table_bytes: ExactBytes = None
    nested_code_table_bytes: ExactBytes = None
    offset_bytes: ExactBytes = None
    row_scale_bytes: ExactBytes = None


class Unquantized(Part):
    """Bytes that stay unquantized, by the kind of module holding them (weights.UNQUANTIZED_KINDS)."""

    embedding_bytes: ExactBytes = None
    norm_bytes: ExactBytes = None
    dense_linear_bytes: ExactBytes = None
    quantized_linear_bias_bytes: ExactBytes = None
    conv_bytes: ExactBytes = None
    other_param_bytes: ExactBytes = None
    buffer_bytes: ExactBytes = None


class Linears(Part):
    """The linear layers' classes and settings read back from the model (values seen, comma-separated)."""

    linear4bit_count: ExactCount = None
    linear8bitlt_count: ExactCount = None
    dense_linear_count: ExactCount = None
    quant_types: Text = None
    blocksizes: Text = None
    compressed_statistics: Text = None
    compute_dtypes: Text = None
    int8_thresholds: Text = None
    dense_linear_dtypes: Text = None


class WeightError(Part):
    """How far the loaded base's dequantized weights are from the checkpoint's (qbench.cell.measure.weight_error)."""

    definition: Text = None
    scope: Text = None
    layers: Count = None
    layers_not_in_checkpoint: Count = None
    first_layer_not_in_checkpoint: Text = None
    rel_mean: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    rel_max: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    rel_max_layer: Text = None
    rel_overall: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    unavailable_reason: Text = None


class BaseWeights(Part):
    """The frozen base read back at the end of a phase: exact bytes by part and by dtype, and its linears."""

    base_bytes: ExactBytes = None
    quantized_codes_bytes: ExactBytes = None
    quant_state_bytes: ExactBytes = None
    unquantized_bytes: ExactBytes = None
    params: ExactCount = None
    quantized_params: ExactCount = None
    unquantized_params: ExactCount = None
    quantized_share_of_params: ExactFraction = None
    unquantized_share_of_bytes: ExactFraction = None
    bits_per_quantized_param: ExactBits = None
    bits_per_param: ExactBits = None
    unquantized_param_dtypes: Text = None  # comma-separated
    dtype: Annotated[dict[DtypeBytes, int], Figure("bytes", "lower", "exact")] | None = None
    quant_state: QuantState | None = None
    unquantized: Unquantized | None = None
    linears: Linears | None = None


class LoadedWeights(BaseWeights):
    error: WeightError | None = None


class Weights(Part):
    """`weights.load.*` (the base as loaded), `weights.prepare.*` (as it trains, after the prepare phase), the adapter."""

    load: LoadedWeights | None = None
    prepare: BaseWeights | None = None
    adapter_bytes: ExactBytes = None


# --- memory and CPU -----------------------------------------------------------------------------------------


class Peaks(Part):
    """The peak of each memory source (qbench.contract.schema.MEMORY_SOURCES), each under its own key."""

    pss_peak_bytes: PeakBytes = None  # as its own process: a forked cell adds the fork server's share of their pages
    # the same tree's PSS without that share (what a forked cell itself holds): informational, never gated, since
    # it moves with what the fork server and the machine's other processes share with the cell (+15 % between two
    # runs of the same code in a fresh-clone CI beside other work), where pss_peak_bytes does not
    tree_pss_peak_bytes: InformationalBytes = None
    rss_peak_bytes: PeakBytes = None
    torch_allocated_peak_bytes: PeakBytes = None
    torch_reserved_peak_bytes: PeakBytes = None
    # the bytes torch's CPU tensors held at the peak above the process baseline, counted from the allocator's events
    # (a suite with a [fit] table: qbench.cell.measure.tensor_bytes); deterministic, so a tight tolerance holds
    torch_cpu_increase_peak_bytes: PeakBytes = None
    nvml_process_peak_bytes: PeakBytes = None
    nvml_device_peak_bytes: PeakBytes = None


class PhaseMemory(Peaks):
    """One phase's peaks and how they were sampled."""

    sampled_s: Seconds = None
    samples: Count = None
    pss_reads: Count = None
    tree_processes_max: Count = None
    nvml_process_note: Text = None
    torch_error: Text = None
    # the fork server's share of the pages it shares with this cell, added into pss_peak_bytes (None: not forked)
    fork_server_share_bytes: Annotated[int | None, Figure("bytes", None, "informational")] = None


class AllPhases(Peaks):
    """The largest figure of each source over the phases; the phases run on request (an init's decomposition,
    the merges) are left out and named."""

    excluded_phases: Text = None  # comma-separated


class ProcessBaseline(Part):
    """What each process source read just before the model was loaded: the runtime no precision changes."""

    at: Text = None
    pss_bytes: PeakBytes = None
    tree_pss_bytes: InformationalBytes = None  # as tree_pss_peak_bytes
    rss_bytes: PeakBytes = None
    torch_allocated_bytes: PeakBytes = None
    torch_reserved_bytes: PeakBytes = None
    nvml_process_bytes: PeakBytes = None


class MemorySources(Part):
    """What each source measures on this device, or why it is unavailable."""

    nvml: Text = None
    pss: Text = None
    rss: Text = None
    torch_cuda: Text = None
    torch_cpu: Text = None


class NvmlDevice(Part):
    device_index: SettingInt = None
    device_uuid: Text = None
    device_name: Text = None
    device_matched: Text = None
    device_total_bytes: Annotated[int | None, Figure("bytes", None, "informational")] = None
    device_used_at_start_bytes: Annotated[int | None, Figure("bytes", None, "informational")] = None
    device_driver_version: Text = None


_PhaseMemories = create_model(  # type: ignore[call-overload]
    "_PhaseMemories", __base__=Part, **{phase: (PhaseMemory | None, None) for phase in PHASES})


class Memory(_PhaseMemories):  # type: ignore[misc,valid-type]
    """`memory.<phase>.*` per phase and source, `memory.all_phases.*` the largest of each source over the phases,
    `memory.process_baseline.*`, and each source's description."""

    all_phases: AllPhases | None = None
    process_baseline: ProcessBaseline | None = None
    source: MemorySources | None = None
    nvml: NvmlDevice | None = None
    sample_interval_s: Annotated[float | None, Setting("s")] = None
    nvml_available: Flag = None
    torch_cuda_available: Flag = None
    fork_server_siblings_max: Count = None  # cells forked from the same server alive at once


class CpuPhase(Part):
    """One phase's CPU figures (qbench.cell.measure.memory.cpu_fields)."""

    process_s: Seconds = None
    runqueue_wait_s: Seconds = None
    share: Annotated[float | None, Figure("fraction", "higher", "informational")] = None
    machine_busy_cores: Annotated[float | None, Figure("cores", None, "informational")] = None
    others_busy_cores: Annotated[float | None, Figure("cores", "lower", "informational")] = None
    steal_share: Annotated[float | None, Figure("fraction", "lower", "informational")] = None


Cpu = create_model("Cpu", __base__=Part, **{phase: (CpuPhase | None, None) for phase in PHASES})  # type: ignore[call-overload]

# --- time, speed, training ----------------------------------------------------------------------------------


class PartTime(Part):
    wall_s: Seconds = None


class OtherTime(PartTime):
    note: Text = None


class Time(Part):
    """`time.<part>.wall_s`: where the cell's wall time went (schema.TIME_PARTS, then `other`), and `cell`, the
    whole process's wall time as the runner measured it: every time.*_s but `cell` sums to `cell`."""

    start: Text = None
    end: Text = None
    process_start: PartTime | None = None
    data: PartTime | None = None
    load: PartTime | None = None
    readback: PartTime | None = None
    prepare: PartTime | None = None
    eval_before: PartTime | None = None
    train: PartTime | None = None
    eval_after: PartTime | None = None
    adapter_save: PartTime | None = None
    init: PartTime | None = None
    merge_dequantized: PartTime | None = None
    merge_requantized: PartTime | None = None
    other: OtherTime | None = None
    cell: PartTime | None = None


class Speed(Part):
    """`speed.*`: the timed training steps (warm-up left out), by wall time and by the process's CPU time."""

    untimed_steps: SettingInt = None
    timed_steps: Count = None
    timed_wall_s: Seconds = None
    timed_cpu_s: Seconds = None
    train_samples_per_s: Annotated[float | None, Figure("1/s", "higher", "speed")] = None
    train_tokens_per_s: Annotated[float | None, Figure("1/s", "higher", "speed")] = None
    train_samples_per_cpu_s: Annotated[float | None, Figure("1/CPU-s", "higher", "speed")] = None
    train_tokens_per_cpu_s: Annotated[float | None, Figure("1/CPU-s", "higher", "speed")] = None
    step_time_p50_s: Seconds = None
    step_time_p90_s: Seconds = None
    step_time_mean_s: Seconds = None
    step_cpu_time_p50_s: Seconds = None
    # a step's wall time less the time its thread waited in the run queue for a core (what `qbench gate` judges);
    # each timed step's (past STEP_TIMES_POINTS steps, the mean of each run of `step_unqueued_times_every_steps`)
    step_unqueued_time_p50_s: Seconds = None
    step_unqueued_times_s: list[float] | None = None
    step_unqueued_times_every_steps: SettingInt = None
    timed_queue_wait_s: Annotated[float | None, Figure("s", "lower", "informational")] = None
    queue_wait_absent_reason: Text = None
    contended: Flag = None
    contention: Text = None
    absent_reason: Text = None


class Train(Part):
    """`train.*`: what the training loop did. `final_loss` is the loss of the last step run (`steps_completed`)."""

    steps_completed: Count = None
    first_loss: Loss = None
    final_loss: Loss = None
    max_length_source: Text = None
    absent_reason: Text = None
    # what training really did: the pairs one contrastive loss compares, layers that recompute activations,
    # adapters the backward pass gave no gradient (a setting that took no effect shows here)
    contrastive_batch: Text = None
    contrastive_batch_size: ExactCount = None
    negatives_per_query: Annotated[int | None, Figure("count", "higher", "exact")] = None
    gradient_checkpointing_layers: ExactCount = None
    gradient_checkpointing_mode: Text = None
    params_without_grad: Annotated[int | None, Figure("count", "lower", "exact")] = None
    params_without_grad_names: Text = None
    # the loss of every step (past LOSS_CURVE_POINTS steps, the mean of each run of `loss_curve_every_steps`)
    loss_curve: list[float | None] | None = None
    loss_curve_every_steps: SettingInt = None


# --- quality ------------------------------------------------------------------------------------------------

QualityByName = Annotated[dict[MetricName, int | float | None], Metrics()]


class Quality(Part):
    """`quality.<phase>.<metric>`: each task's metrics by name (QUALITY_METRICS), before and after fine-tuning."""

    eval_before: QualityByName | None = None
    eval_after: QualityByName | None = None
    eval_after_absent_reason: Text = None
    # the adapter merged into the base (qbench.cell.merge): into a dequantized copy, and re-quantized
    merge_dequantized: QualityByName | None = None
    merge_requantized: QualityByName | None = None


class Bounds(Part):
    """A quality metric's interval: bounds and standard error, in the metric's unit."""

    low: Annotated[float | None, Figure("of the metric", None, "interval")] = None
    high: Annotated[float | None, Figure("of the metric", None, "interval")] = None
    se: Annotated[float | None, Figure("of the metric", None, "interval")] = None
    note: Text = None


class Intervals(Part):
    """`interval.<phase>.<metric>.low|high|se` and how they were made."""

    method: Text = None
    resamples: SettingInt = None
    confidence: Annotated[float | None, Setting("fraction")] = None
    seed: SettingInt = None
    eval_before: dict[MetricName, Bounds] | None = None
    eval_after: dict[MetricName, Bounds] | None = None
    merge_dequantized: dict[MetricName, Bounds] | None = None
    merge_requantized: dict[MetricName, Bounds] | None = None


class PerWindow(Part):
    """`per_window.*`: per evaluation window figures (lists), for comparisons paired on the same windows."""

    scored_tokens: list[int] | None = None
    eval_before: dict[Name, list[float | None]] | None = None
    eval_after: dict[Name, list[float | None]] | None = None
    merge_dequantized: dict[Name, list[float | None]] | None = None
    merge_requantized: dict[Name, list[float | None]] | None = None


class Kernels(Part):
    """`kernels.*`: which kernel paths ran (qbench.machine.kernels for the machine, readback.kernel_paths per cell):
    what moves speed and the last digits of quality."""

    torch_blas: Text = None
    torch_onednn: Text = None
    torch_float32_matmul_precision: Text = None
    bnb_native_library: Text = None
    bnb_cpu_avx512bf16: Flag = None
    bnb_int8_matmul: Text = None
    bnb_4bit_fused_cpu_kernel: Text = None
    transformers_hub_kernels: Text = None
    attn_implementation: Text = None
    transformers_hub_layers: ExactCount = None
    transformers_hub_layers_swapped: ExactCount = None
    bnb_4bit_packed_layers: ExactCount = None
    bnb_4bit_compute_dtypes: Text = None
    bnb_4bit_matmul: Text = None


class Fit(Part):
    """`fit.*`: a cell of a suite with a [fit] table judged against its memory budget (qbench.cell.budget)."""

    budget_bytes: Annotated[int | None, Setting("bytes")] = None
    limit_bytes: Annotated[int | None, Setting("bytes")] = None  # the budget less the margin
    margin: Annotated[float | None, Setting("fraction")] = None
    peak_bytes: PeakBytes = None
    peak_source: Text = None
    within_budget: Flag = None
    verdict_reason: Text = None
    load_threads: Text = None
    device_cap: Text = None
    device_cap_fraction: Annotated[float | None, Setting("fraction")] = None
    device_total_bytes: Annotated[int | None, Setting("bytes")] = None
    trial_dir: Text = None


class LoraFacts(Part):
    adapter_dtypes: Text = None  # what the trainable parameters are stored in


# --- after the fine-tune: merges, LoRA init, the adapter --------------------------------------------------

Delta = Annotated[float | None, Figure("of the metric", None, "informational")]
Share = Annotated[float | None, Figure("fraction", None, "informational")]


def _judged_fields() -> dict[str, Any]:
    """`<metric>_delta|_delta_low|_delta_high|_verdict` for each metric a merge is judged on (qbench.cell.merge.JUDGED)."""
    made: dict[str, Any] = {}
    for metric in ("mean_recall@1", "perplexity", "bits_per_byte"):
        python = metric.replace("@", "_at_")
        for suffix, kind in (("delta", Delta), ("delta_low", Delta), ("delta_high", Delta), ("verdict", Text)):
            made[f"{python}_{suffix}"] = (kind, Field(None, alias=f"{metric}_{suffix}"))
    return made


_Judged = create_model("_Judged", __base__=Part, **_judged_fields())  # type: ignore[call-overload]


class MergeDequantized(_Judged):  # type: ignore[misc,valid-type]
    """`merge.dequantized.*`: the adapter merged into a dense copy of the dequantized base."""

    how: Text = None
    layers: Count = None


class MergeRequantized(MergeDequantized):
    """`merge.requantized.*`: merged and stored in the arm's own precision again, and what of the adapter survived."""

    unchanged_code_share: Share = None
    delta_correlation: Annotated[float | None, Figure("correlation", "higher", "informational")] = None
    delta_error_rel: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    delta_rms_to_step: Annotated[float | None, Figure("ratio", None, "informational")] = None


class Merge(Part):
    verdict_method: Text = None
    absent_reason: Text = None
    dequantized: MergeDequantized | None = None
    requantized: MergeRequantized | None = None


class LoraInit(Part):
    """`lora_init.*`: how the adapters were initialised (qbench.contract.inits) and how far W is from Q + B·A."""

    name: Text = None
    peft_value: Text = None
    route: Text = None
    rewrites_base: Flag = None
    description: Text = None
    base: Text = None
    error_definition: Text = None
    error_unavailable_reason: Text = None
    layers: Count = None
    error_rel_overall: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    error_rel_mean: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    error_rel_max: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    plain_error_rel_overall: Annotated[float | None, Figure("fraction", "lower", "informational")] = None
    recovered_share: Annotated[float | None, Figure("fraction", "higher", "informational")] = None


class Adapter(Part):
    """`adapter.*`: the trained adapter as saved (weights.adapter_bytes is its size)."""

    converted: Flag = None
    applies_to: Text = None
    kept_path: Text = None
    not_kept_reason: Text = None


class PerLayer(Part):
    """`per_layer.*`: figures per LoRA layer (lists in the order of the `*_modules` list beside them)."""

    lora_modules: list[str] | None = None
    init_error_rel: list[float | None] | None = None
    init_plain_error_rel: list[float | None] | None = None
    merge_requantized_modules: list[str] | None = None
    merge_requantized_unchanged_code_share: list[float | None] | None = None
    merge_requantized_delta_correlation: list[float | None] | None = None
    merge_requantized_delta_error_rel: list[float | None] | None = None
    merge_requantized_delta_rms_to_step: list[float | None] | None = None


# --- the record ---------------------------------------------------------------------------------------------


class Record(Part):
    """One cell's record, schema 3."""

    identity: Annotated[Identity, Bare()]
    outcome: Annotated[Outcome, Bare()]
    env: Environment | None = None
    config: Configuration | None = None
    precision: PrecisionSettings | None = None
    compute: Compute | None = None  # type: ignore[valid-type]
    optimizer: OptimizerState | None = None
    model: ModelFacts | None = None
    params: Params | None = None
    bnb: Bnb | None = None
    readback: Readback | None = None
    data: Data | None = None
    eval: Evaluation | None = None
    weights: Weights | None = None
    memory: Memory | None = None  # type: ignore[valid-type]
    cpu: Cpu | None = None  # type: ignore[valid-type]
    time: Time | None = None
    speed: Speed | None = None
    train: Train | None = None
    quality: Quality | None = None
    interval: Intervals | None = None
    per_window: PerWindow | None = None
    kernels: Kernels | None = None
    fit: Fit | None = None
    lora: LoraFacts | None = None
    merge: Merge | None = None
    lora_init: LoraInit | None = None
    adapter: Adapter | None = None
    per_layer: PerLayer | None = None
    # what a test stand-in (a fake cell, injected faults) says about itself; never in a real run's record
    test: dict[Name, Any] | None = None


# --- the run manifest ---------------------------------------------------------------------------------------


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ManifestCell(Manifest):
    cell_id: str | None = None
    precision: str
    seed: int
    axes: dict[str, Any] = {}


class Resumption(Manifest):
    time: str | None = None
    cells: list[str] = []
    forced: bool | None = None
    suite_file_changed: bool | None = None
    executor: str | None = None
    data_changed: list[str] | None = None  # the data files that differed from the run's when it was resumed anyway


class RunManifest(Manifest):
    """`run.json`: what a run was asked to do (the suite text itself, the cells, where), written before any cell."""

    schema_version: int | None = None  # of the run's records; absent in runs made before schema 3
    qbench_version: str | None = None
    suite: str | None = None
    suite_path: str | None = None
    suite_sha256: str | None = None
    suite_text: str | None = None
    device: str | None = None
    cells: list[ManifestCell] | None = None
    slots: list[dict[str, str]] | None = None
    created: str | None = None
    executor: str | None = None
    shard: str | None = None
    matrix_cells: int | None = None
    gpus: list[str] | None = None
    gpus_per_cell: float | None = None
    where: dict[str, list[Any]] | None = None
    parallel: int | None = None
    threads_per_cell: int | None = None
    threads_source: str | None = None
    compute: dict[str, Any] | None = None  # qbench.machine.compute.ComputeChoice's fields
    cell_launcher: str | None = None
    timing: dict[str, float | None] | None = None  # run-wide seconds
    shared: list[str] | None = None  # what the fork server built once for every cell
    ray: dict[str, Any] | None = None  # the Ray cluster's address, version and resources
    slurm: dict[str, Any] | None = None  # submitit's cluster, version, partition and job parameters
    data: dict[str, Any] | None = None  # the data's fingerprint, file by file (qbench.contract.fingerprint)
    fit_trial: dict[str, Any] | None = None  # a trial of `qbench fit`: its settings, budget and steps
    resumes: list[Resumption] | None = None

    # another executor (qbench.runner.executors.REGISTRY) keeps what it placed under its own name, as ray and slurm do
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _executor_entries_only(self) -> RunManifest:
        for key, value in (self.model_extra or {}).items():
            if not key.isidentifier() or not isinstance(value, dict):
                raise ValueError(f"{key}: not a field of run.json (an executor's own entry is a table under its name)")
        return self


# --- flat keys <-> the model --------------------------------------------------------------------------------


class RecordInvalid(ValueError):
    """A record that does not validate: `problems` names each key and what is wrong with it."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        shown = "; ".join(f"{key}: {why}" for key, why in problems[:3])
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        super().__init__(shown + more)

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.problems]


@dataclass(frozen=True)
class _Slot:
    """How one field of a model class reads: its key in a record, what it holds, its metadata."""

    name: str  # the attribute
    key: str  # its part of a record key (the alias)
    shape: Literal["bare", "model", "dict", "dict_model", "leaf"]
    inner: Any  # the model class of a bare / model / dict_model field; the value type of a dict or leaf
    metadata: tuple[Any, ...]


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the type without Optional and Annotated, the Annotated metadata)."""
    metadata: tuple[Any, ...] = ()
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += tuple(extra)
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and type(None) in get_args(annotation):
            annotation = args[0]
            continue
        return annotation, metadata


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


@cache
def _slots(cls: type[BaseModel]) -> tuple[_Slot, ...]:
    found = []
    for name, info in cls.model_fields.items():
        kind, metadata = _unwrap(info.annotation)
        metadata += tuple(info.metadata)
        key = info.alias or name
        if any(isinstance(m, Bare) for m in metadata):
            found.append(_Slot(name, key, "bare", kind, metadata))
        elif _is_model(kind):
            found.append(_Slot(name, key, "model", kind, metadata))
        elif get_origin(kind) is dict:
            value, value_metadata = _unwrap(get_args(kind)[1])
            shape = "dict_model" if _is_model(value) else "dict"
            found.append(_Slot(name, key, shape, value, metadata + value_metadata))
        else:
            found.append(_Slot(name, key, "leaf", kind, metadata))
    return tuple(found)


@dataclass(frozen=True)
class Key:
    """What a record key is: its path through the model, its value's type, and its metadata."""

    path: tuple[str, ...]  # attribute names and dict keys
    kind: Any  # the value's type (int, float, int | float, str, bool, list[...], Any)
    metadata: tuple[Any, ...]

    @property
    def figure(self) -> Figure | None:
        found = next((m for m in self.metadata if isinstance(m, Figure)), None)
        if found is None and any(isinstance(m, Metrics) for m in self.metadata):
            return quality_metric(self.path[-1])
        return found

    @property
    def setting(self) -> Setting | None:
        return next((m for m in self.metadata if isinstance(m, Setting)), None)


def _find(cls: type[BaseModel], parts: tuple[str, ...]) -> Key | None:
    if not parts:
        return None
    for slot in _slots(cls):
        if slot.shape == "bare":
            found = _find(slot.inner, parts)
            if found is not None:
                return Key((slot.name, *found.path), found.kind, found.metadata)
            continue
        if parts[0] != slot.key:
            continue
        rest = parts[1:]
        if slot.shape == "leaf" and not rest:
            return Key((slot.name,), slot.inner, slot.metadata)
        if slot.shape == "model" and rest:
            found = _find(slot.inner, rest)
            return Key((slot.name, *found.path), found.kind, found.metadata) if found else None
        if slot.shape == "dict" and rest:
            return Key((slot.name, ".".join(rest)), slot.inner, slot.metadata)
        if slot.shape == "dict_model" and len(rest) >= 2:
            found = _find(slot.inner, rest[1:])
            if found is not None:
                return Key((slot.name, rest[0], *found.path), found.kind, slot.metadata + found.metadata)
        return None
    return None


@cache
def key_info(key: str) -> Key | None:
    """What record key `key` is (path, type, metadata), or None when the record model declares no such key."""
    return _find(Record, tuple(key.split(".")))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat record as the nested dict the model validates; RecordInvalid naming every undeclared key."""
    nested: dict[str, Any] = {}
    unknown = []
    for key, value in flat.items():
        info = key_info(key) if isinstance(key, str) else None
        if info is None:
            unknown.append((str(key), "not a key of the record model (qbench.contract.record)"))
            continue
        node = nested
        for part in info.path[:-1]:
            node = node.setdefault(part, {})
        node[info.path[-1]] = value
    if unknown:
        raise RecordInvalid(unknown)
    return nested


def _flat_key(loc: tuple[Any, ...]) -> str:
    """The record key of a pydantic error location (attribute names, dict keys) in the Record model."""
    parts: list[str] = []
    cls: Any = Record
    index = 0
    while index < len(loc):
        slot = next((s for s in _slots(cls) if s.name == loc[index]), None) if _is_model(cls) else None
        if slot is None:  # a dict key, or past what the model describes
            parts += [str(part) for part in loc[index:] if not isinstance(part, int) and part != "[key]"]
            break
        index += 1
        if slot.shape != "bare":
            parts.append(slot.key)
        if slot.shape in ("dict", "dict_model") and index < len(loc):
            parts.append(str(loc[index]))
            index += 1
            if index < len(loc) and loc[index] == "[key]":  # the dict key itself is refused
                break
        cls = slot.inner if slot.shape in ("bare", "model", "dict_model") else None
    return ".".join(parts)


def validate(flat: dict[str, Any]) -> Record:
    """The model of a flat schema-3 record; RecordInvalid naming each key that is undeclared or ill-typed."""
    nested = unflatten(flat)
    try:
        return Record.model_validate(nested)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = _flat_key(tuple(item["loc"]))
            shown = repr(item.get("input"))[:40]
            problems.append((key or "record", f"{item['msg']}, not {shown}" if item["type"] != "missing" else "missing"))
        raise RecordInvalid(problems) from None


def flatten(record: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The flat record of a model: one dotted key per value that was set (None included), in the model's order."""
    flat: dict[str, Any] = {}
    for slot in _slots(type(record)):
        if slot.name not in record.model_fields_set:
            continue
        value = getattr(record, slot.name)
        if slot.shape == "bare":
            flat.update(flatten(value, prefix))
        elif slot.shape == "model" and value is not None:
            flat.update(flatten(value, f"{prefix}{slot.key}."))
        elif slot.shape == "dict_model" and value is not None:
            for name, part in value.items():
                flat.update(flatten(part, f"{prefix}{slot.key}.{name}."))
        elif slot.shape == "dict" and value is not None:
            flat.update({f"{prefix}{slot.key}.{name}": item for name, item in value.items()})
        else:
            flat[prefix + slot.key] = value
    return flat


def normalised(flat: dict[str, Any]) -> dict[str, Any]:
    """`flat` validated and flattened again (RecordInvalid when it does not validate)."""
    return flatten(validate(flat))


def declared_keys() -> list[str]:
    """Every record key the model declares by name (open parts as `<prefix>.*`), for documents and tests."""

    def walk(cls: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for slot in _slots(cls):
            if slot.shape == "bare":
                keys += walk(slot.inner, prefix)
            elif slot.shape == "model":
                keys += walk(slot.inner, f"{prefix}{slot.key}.")
            elif slot.shape == "dict_model":
                keys += walk(slot.inner, f"{prefix}{slot.key}.*.")
            elif slot.shape == "dict":
                keys.append(f"{prefix}{slot.key}.*")
            else:
                keys.append(prefix + slot.key)
        return keys

    return walk(Record, "")


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """Why `manifest` is not a run.json qbench writes (the first field and what is wrong), or None."""
    try:
        RunManifest.model_validate(manifest)
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(part) for part in item["loc"]) or "run.json"
        return f"{where}: {item['msg'].lower()}"
    return None


__all__ = ["SCHEMA_VERSION", "Record", "RunManifest", "Figure", "Setting", "RecordInvalid", "validate", "flatten",
           "key_info", "declared_keys", "quality_metric", "QUALITY_METRICS"]

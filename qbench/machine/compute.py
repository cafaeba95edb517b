"""Which dtype a run computes in: `compute_dtype = "auto"` is decided by measuring, and the record says what
was measured.

    auto      the dtype whose training step of the suite's own model was fastest on this device, among
              those that computed it correctly (float32, bfloat16, float16; the child process
              qbench.cell.compute_probe times them), measured once per machine, torch version, model and
              step shape and kept in the user cache; a more exact dtype wins unless the other is
              clearly faster (TIE_SHARE)
    explicit  the suite's dtype, with a warning when the device only emulates it or it measured slow

Instruction flags do not decide: a CPU with AVX512-BF16 trained the tiny CLIP 1.7x slower in bfloat16 than
in float32 (issue 28), and a CPU without it about ten times slower (issue 12). The flags still say which
dtypes a device converts around float32 (`emulated`), for the warnings.

This module needs no torch: the parent decides with it, the child measures (qbench.cell.compute_probe).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qbench.contract.files import write_json_atomic
from qbench.contract.precisions import DTYPE_NAMES
from qbench.machine.cpuinfo import flags as cpuinfo_flags
from qbench.machine.model_cache import cache_root

SETTINGS = ("auto", *DTYPE_NAMES)
# the instructions that make a CPU compute the dtype itself rather than convert around float32
CPU_NATIVE_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 flags; "bf16" is Arm's /proc/cpuinfo feature
    "float16": ("avx512_fp16", "amx_fp16"),
}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# most exact first: a dtype must be TIE_SHARE faster than every more exact one that computed correctly to be
# chosen over it: a lower precision is worth a clear gain, not one inside the ~10% that repeated measurements
# of one step differ by on a shared CPU
PREFERENCE = ("float32", "bfloat16", "float16")
TIE_SHARE = 0.20
SLOW_FACTOR = 1.3  # a dtype the run computes in that measured this much slower than the fastest is warned about
CACHE_FOLDER = "compute-dtype"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is not readable."""
    return cpuinfo_flags(cpuinfo) or frozenset()


def native_on_cpu(dtype: str, flags: frozenset[str]) -> tuple[bool, str]:
    """(whether this CPU has instructions for `dtype`, the flag that says so or what is missing)."""
    if dtype == "float32":
        return True, "float32"
    wanted = CPU_NATIVE_FLAGS[dtype]
    found = [flag for flag in wanted if flag in flags]
    if found:
        return True, found[0]
    return False, f"no {' / '.join(wanted[:2])}"


def native(dtype: str, device: str, cuda_bf16: bool | None = None, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` has arithmetic for `dtype`; on CUDA `cuda_bf16` is torch's answer for bf16."""
    if device.startswith("cuda"):
        return dtype != "bfloat16" or bool(cuda_bf16)
    return native_on_cpu(dtype, cpu_flags() if flags is None else flags)[0]


@dataclass(frozen=True)
class DtypeTimings:
    """What `auto` measured: the fastest training step of the suite's model seen in each dtype that computed it
    correctly, and why each other candidate was not timed to the end."""

    step_s: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)
    workload: str = ""  # what one step was: model, layers, batch, threads, how many steps
    measured_at: str = ""  # ISO time of the measurement
    cached: bool = False  # read from the user cache: this run measured nothing
    cache_path: str | None = None
    measure_s: float | None = None  # wall seconds the measurement took (when this run measured)

    def fastest(self) -> str | None:
        """The chosen dtype: the fastest, unless a more exact one is within TIE_SHARE of it."""
        if not self.step_s:
            return None
        best = min(self.step_s.values())
        for dtype in sorted(self.step_s, key=lambda d: PREFERENCE.index(d) if d in PREFERENCE else len(PREFERENCE)):
            if self.step_s[dtype] <= best * (1 + TIE_SHARE):
                return dtype
        return None  # unreachable: the fastest is within its own margin

    def factor(self, dtype: str, against: str = "float32") -> float | None:
        """How many times longer a step took in `dtype` than in `against` (None where either is unmeasured)."""
        if dtype not in self.step_s or not self.step_s.get(against):
            return None
        return round(self.step_s[dtype] / self.step_s[against], 2)

    def text(self) -> str:
        """The measured step of each dtype, fastest first, and why any other was left out."""
        best = min(self.step_s.values()) if self.step_s else None
        parts = []
        for dtype, seconds in sorted(self.step_s.items(), key=lambda item: item[1]):
            slower = f" ({seconds / best:.1f}x)" if best and seconds > best * 1.05 else ""
            parts.append(f"{dtype} {seconds * 1000:.3g} ms{slower}")
        parts += [f"{dtype} {why}" for dtype, why in self.rejected.items()]
        return ", ".join(parts)

    def source(self) -> str:
        when = f" on {self.measured_at}" if self.measured_at else ""
        if self.cached:
            return f"cached{when} in {self.cache_path}"
        took = f" in {self.measure_s:.1f} s" if self.measure_s is not None else ""
        return f"measured by this run{took}" + (f", kept in {self.cache_path}" if self.cache_path else "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DtypeTimings:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ComputeChoice:
    """The dtype a run computes in and why; `dtypes` every dtype the run computes in (the compute dtype and the
    dense arms' storage dtypes), `emulated` those the device has no arithmetic for, `factors` their step
    time over float32's where it was measured (x, > 1 is slower), `measured` the DtypeTimings (as a dict)."""

    setting: str
    dtype: str
    reason: str
    device: str
    emulated: tuple[str, ...] = ()
    factors: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] | None = None
    dtypes: tuple[str, ...] = ()

    @property
    def timings(self) -> DtypeTimings | None:
        return DtypeTimings.from_dict(self.measured) if self.measured else None

    def record_fields(self) -> dict[str, Any]:
        """`config.compute_dtype` (what the cell computes in) and `compute.*` (the setting, why, what was measured)."""
        fields: dict[str, Any] = {
            "config.compute_dtype": self.dtype,
            "compute.dtype_setting": self.setting,
            "compute.dtype_reason": self.reason,
            "compute.emulated_dtypes": ",".join(self.emulated) or None,
        }
        for dtype, factor in self.factors.items():
            fields[f"compute.{dtype}_slowdown_x"] = factor
        timings = self.timings
        if timings is not None:
            fields["compute.dtype_measurement"] = f"{timings.workload}; {timings.source()}"
            fields["compute.dtype_measurement_cached"] = timings.cached
            for dtype, seconds in timings.step_s.items():
                fields[f"compute.{dtype}_step_s"] = seconds
        return fields

    def header(self) -> str:
        """One line for the run's header: the dtype and why."""
        return f"compute dtype {self.dtype} ({self.reason})"

    def warnings(self) -> list[str]:
        """One line per dtype the run computes in that the device emulates or that measured slow here."""
        lines = []
        timings = self.timings
        best = min(timings.step_s.values()) if timings and timings.step_s else None
        for dtype in dict.fromkeys((*self.emulated, *self.dtypes)):
            seconds = timings.step_s.get(dtype) if timings else None
            if dtype in self.emulated:
                factor = self.factors.get(dtype)
                measured = f"measured {factor:.1f}x slower than float32 here" if factor else "not measured"
                lines.append(f"{dtype} is emulated on this {self.device} ({_why_not_native(dtype, self.device)}): {measured}; "
                             f'compute_dtype = "auto" picks the fastest dtype measured here')
            elif best and seconds and seconds >= best * SLOW_FACTOR:
                fastest = min(timings.step_s, key=timings.step_s.__getitem__)
                lines.append(f"{dtype} steps of this suite's model measured {seconds / best:.1f}x slower than {fastest} here "
                             f"({timings.text()}); cells that compute in {dtype} train that much slower")
        return lines

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputeChoice:
        """From asdict() (run.json, a cell's spec); older run folders lack the newer fields."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "emulated": tuple(known.get("emulated") or ()), "dtypes": tuple(known.get("dtypes") or ()),
                      "factors": dict(known.get("factors") or {})})

    @classmethod
    def from_json(cls, text: str) -> ComputeChoice:
        return cls.from_dict(json.loads(text))


def _why_not_native(dtype: str, device: str) -> str:
    if device.startswith("cuda"):
        return "the GPU has no bf16 arithmetic (sm_80 or newer has it)"
    return native_on_cpu(dtype, cpu_flags())[1]


def unmeasured_default(device: str, cuda_bf16: bool | None = None) -> str:
    """What auto means where nothing was measured: float32 on a CPU (exact, and never emulated), else bf16 on a
    GPU that has it, float16 on one that has not."""
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if cuda_bf16 else "float16"


def choose(setting: str, device: str, cuda_bf16: bool | None = None, dense_dtypes: tuple[str, ...] = (),
           flags: frozenset[str] | None = None, timings: DtypeTimings | None = None,
           unmeasured: str | None = None) -> ComputeChoice:
    """The compute dtype of a run on `device` for the suite's `compute_dtype` setting, with its reason.

    `timings`: what the device measured (auto takes the fastest that computed correctly); without them auto
    takes `unmeasured_default`, and `unmeasured` says why nothing was measured. `dense_dtypes`: storage dtypes
    of the run's dense arms, which compute in their own dtype. ValueError for an unknown setting."""
    if setting not in SETTINGS:
        raise ValueError(f"compute_dtype {setting!r}: expected one of {', '.join(SETTINGS)}")
    flags = cpu_flags() if flags is None else flags
    cuda = device.startswith("cuda")
    fastest = timings.fastest() if timings is not None else None
    if setting != "auto":
        dtype, reason = setting, f"set in the suite ({setting})"
    elif fastest is not None:
        dtype = fastest
        reason = f"auto: the fastest training step of the suite's model measured here, {timings.text()}"
    else:
        dtype = unmeasured_default(device, cuda_bf16)
        why = unmeasured or (timings.text() if timings is not None else "nothing measured")
        reason = f"auto: not measured ({why}), {dtype} on a {'GPU' if cuda else 'CPU'}"
    wanted = tuple(dict.fromkeys((dtype, *dense_dtypes)))
    emulated = tuple(d for d in wanted if not native(d, device, cuda_bf16, flags))
    factors = {}
    if timings is not None:
        factors = {d: f for d in timings.step_s if d != "float32" and (f := timings.factor(d)) is not None}
    return ComputeChoice(setting, dtype, reason, "cuda" if cuda else "cpu", emulated, factors,
                         asdict(timings) if timings is not None else None, wanted)


def choose_unmeasured(setting: str, device: str, dense_dtypes: tuple[str, ...] = (), why: str = "") -> ComputeChoice:
    """`choose()` without measuring, in a process that may import torch (it asks torch about the GPU): for
    callers that load a model outside a run (qbench env's probe, the developer checks)."""
    cuda_bf16 = None
    if device.startswith("cuda"):
        import torch

        cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    return choose(setting, device, cuda_bf16, dense_dtypes, unmeasured=why or "outside a run")


def resolve(setting: str, device: str) -> str:
    """The dtype a compute_dtype setting means on `device` where nothing is measured ("auto": unmeasured_default)."""
    return setting if setting != "auto" else choose_unmeasured(setting, device).dtype


# --- the user cache of measurements ------------------------------------------------------------------------

def cache_file(key: dict[str, Any], root: Path | None = None) -> Path:
    """Where the measurement for `key` (what it depends on: machine, torch, model, step shape) is kept."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return (root or cache_root()) / CACHE_FOLDER / f"{digest}.json"


def read_cached(key: dict[str, Any], root: Path | None = None) -> DtypeTimings | None:
    """The kept measurement for exactly `key`, or None (none, unreadable, or made for another key)."""
    path = cache_file(key, root)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        timings = DtypeTimings.from_dict(kept["timings"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not timings.step_s:
        return None
    return DtypeTimings(**{**asdict(timings), "cached": True, "cache_path": str(path), "measure_s": None})


def write_cached(key: dict[str, Any], timings: DtypeTimings, root: Path | None = None) -> DtypeTimings:
    """Keep `timings` for `key`; the timings with where they were kept (unchanged when the cache cannot be
    written: the next run measures again)."""
    path = cache_file(key, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "timings": asdict(timings)})
    except (OSError, TypeError, ValueError):
        return timings
    return DtypeTimings(**{**asdict(timings), "cache_path": str(path)})

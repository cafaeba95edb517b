"""Which dtypes a device computes natively, what `compute_dtype = "auto"` becomes there, and how much
slower a dtype the device only emulates is (measured, not assumed).

    native on a CUDA GPU   float32, float16, and bfloat16 when torch says the GPU supports it (sm_80+)
    native on a CPU        float32; bfloat16 with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm);
                           float16 with AVX512-FP16 or AMX-FP16
    auto                   bfloat16 where native, else float16 on a GPU, float32 on a CPU

A CPU without bf16 instructions converts every bf16 value to float32 and back around each operation:
the tiny CLIP trained about ten times slower in bf16 than in float32 on such a CPU (issue 12).

`choose()` and the CPU branch need no torch (the parent uses them); `probe()` imports torch and runs in
a child process (`python -m qbench.machine.compute`, or forked from the run's fork server): it answers
whether CUDA is there, whether it computes bf16, and the measured factor of each emulated dtype.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from qbench.contract.precisions import DTYPE_NAMES
from qbench.machine.cpuinfo import flags as cpuinfo_flags

SETTINGS = ("auto", *DTYPE_NAMES)
# the instructions that make a CPU compute the dtype itself rather than convert around float32
CPU_NATIVE_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 flags; "bf16" is Arm's /proc/cpuinfo feature
    "float16": ("avx512_fp16", "amx_fp16"),
}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is not readable."""
    return cpuinfo_flags(cpuinfo) or frozenset()


def native_on_cpu(dtype: str, flags: frozenset[str]) -> tuple[bool, str]:
    """(whether this CPU computes `dtype` natively, the flag that says so or what is missing)."""
    if dtype == "float32":
        return True, "float32"
    wanted = CPU_NATIVE_FLAGS[dtype]
    found = [flag for flag in wanted if flag in flags]
    if found:
        return True, found[0]
    return False, f"no {' / '.join(wanted[:2])}"


@dataclass(frozen=True)
class ComputeChoice:
    """The dtype a run computes in and why; `emulated` lists every dtype the run computes in (the compute
    dtype and the dense arms' storage dtypes) that this device only emulates; `factors` their measured
    slowdown against float32 (x, > 1 is slower) where it was measured."""

    setting: str
    dtype: str
    reason: str
    device: str
    emulated: tuple[str, ...] = ()
    factors: dict[str, float] = field(default_factory=dict)

    def record_fields(self) -> dict[str, Any]:
        """`config.compute_dtype` (what the cell computes in) and `compute.*` (the setting and why)."""
        fields: dict[str, Any] = {
            "config.compute_dtype": self.dtype,
            "compute.dtype_setting": self.setting,
            "compute.dtype_reason": self.reason,
            "compute.emulated_dtypes": ",".join(self.emulated) or None,
        }
        for dtype, factor in self.factors.items():
            fields[f"compute.{dtype}_slowdown_x"] = factor
        return fields

    def header(self) -> str:
        """One line for the run's header: the dtype and why."""
        return f"compute dtype {self.dtype} ({self.reason})"

    def warnings(self) -> list[str]:
        """One line per emulated dtype the run will compute in, with its measured factor."""
        lines = []
        for dtype in self.emulated:
            factor = self.factors.get(dtype)
            measured = f"measured {factor:.1f}x slower than float32 here" if factor else "not measured"
            lines.append(
                f"{dtype} is emulated on this {self.device} ({_why_not_native(dtype, self.device)}): {measured}; "
                f'compute_dtype = "auto" picks what it computes natively'
            )
        return lines

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ComputeChoice:
        data = json.loads(text)
        return cls(**{**data, "emulated": tuple(data.get("emulated", ())), "factors": dict(data.get("factors") or {})})


def _why_not_native(dtype: str, device: str) -> str:
    if device.startswith("cuda"):
        return "the GPU has no bf16 arithmetic (sm_80 or newer has it)"
    return native_on_cpu(dtype, cpu_flags())[1]


def native(dtype: str, device: str, cuda_bf16: bool | None = None, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes `dtype` natively; on CUDA `cuda_bf16` is torch's answer for bf16."""
    if device.startswith("cuda"):
        return dtype != "bfloat16" or bool(cuda_bf16)
    return native_on_cpu(dtype, cpu_flags() if flags is None else flags)[0]


def choose(setting: str, device: str, cuda_bf16: bool | None = None, dense_dtypes: tuple[str, ...] = (),
           flags: frozenset[str] | None = None) -> ComputeChoice:
    """The compute dtype of a run on `device` for the suite's `compute_dtype` setting, with its reason.

    `dense_dtypes`: storage dtypes of the run's dense arms (bf16, fp16, fp32), which compute in their own
    dtype; any of them the device emulates is listed in `emulated` too. ValueError for an unknown setting."""
    if setting not in SETTINGS:
        raise ValueError(f"compute_dtype {setting!r}: expected one of {', '.join(SETTINGS)}")
    flags = cpu_flags() if flags is None else flags
    cuda = device.startswith("cuda")
    if setting != "auto":
        dtype, reason = setting, f"set in the suite ({setting})"
    elif cuda:
        dtype = "bfloat16" if cuda_bf16 else "float16"
        reason = "auto: the GPU computes bf16" if cuda_bf16 else "auto: the GPU has no bf16 arithmetic, float16 instead"
    else:
        has_bf16, flag = native_on_cpu("bfloat16", flags)
        dtype = "bfloat16" if has_bf16 else "float32"
        reason = f"auto: this CPU computes bf16 ({flag})" if has_bf16 else f"auto: bf16 would be emulated on this CPU ({flag})"
    wanted = tuple(dict.fromkeys((dtype, *dense_dtypes)))
    emulated = tuple(d for d in wanted if not native(d, device, cuda_bf16, flags))
    return ComputeChoice(setting, dtype, reason, "cuda" if cuda else "cpu", emulated)


def choose_here(setting: str, device: str, dense_dtypes: tuple[str, ...] = ()) -> ComputeChoice:
    """`choose()` in a process that may import torch (a cell run on its own): asks torch about the GPU."""
    cuda_bf16 = None
    if device.startswith("cuda"):
        import torch

        cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    return choose(setting, device, cuda_bf16, dense_dtypes)


def resolve(setting: str, device: str) -> str:
    """The dtype a compute_dtype setting means on `device` ("auto" decided as a run decides it)."""
    return setting if setting != "auto" else choose_here(setting, device).dtype


# --- the child's side: torch is imported only below ---------------------------------------------------

FACTOR_WIDTH, FACTOR_TOKENS, FACTOR_ROUNDS = 256, 256, 5


def measure_slowdown(dtype: str, device: str, rounds: int = FACTOR_ROUNDS) -> float:
    """How many times longer a small transformer block (linear 256->1024->256, GELU, LayerNorm; forward and
    backward over 256 tokens) takes in `dtype` than in float32 on `device`: the median of `rounds`
    interleaved pairs, each timed over enough repetitions for ~20 ms of float32 work."""
    import statistics

    import torch

    def block(dt: Any) -> tuple[Any, Any]:
        torch.manual_seed(0)
        layers = torch.nn.Sequential(
            torch.nn.Linear(FACTOR_WIDTH, 4 * FACTOR_WIDTH), torch.nn.GELU(), torch.nn.Linear(4 * FACTOR_WIDTH, FACTOR_WIDTH),
            torch.nn.LayerNorm(FACTOR_WIDTH),
        ).to(device=device, dtype=dt)
        return layers, torch.randn(FACTOR_TOKENS, FACTOR_WIDTH, device=device, dtype=dt, requires_grad=True)

    def seconds(layers: Any, x: Any, repeats: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            layers(x).float().square().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    reference, other = block(torch.float32), block(getattr(torch, dtype))
    seconds(*reference, 2), seconds(*other, 2)  # warm-up: kernels chosen, memory allocated
    one = seconds(*reference, 1)
    repeats = max(1, min(200, int(0.02 / max(one, 1e-6))))
    ratios = [seconds(*other, repeats) / seconds(*reference, repeats) for _ in range(rounds)]
    return statistics.median(ratios)


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """The child's answer to {"device": auto|cpu|cuda[:N], "setting": ..., "dense_dtypes": [...]}: the
    resolved device, whether CUDA computes bf16, and the run's ComputeChoice with measured factors."""
    import torch

    requested = str(request.get("device", "auto"))
    cuda_available = torch.cuda.is_available()
    device = ("cuda" if cuda_available else "cpu") if requested == "auto" else requested
    cuda_bf16 = None
    if device.startswith("cuda") and cuda_available:
        cuda_bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    choice = choose(str(request.get("setting", "auto")), device, cuda_bf16, tuple(request.get("dense_dtypes", ())))
    factors = {}
    for dtype in choice.emulated:
        try:
            factors[dtype] = round(measure_slowdown(dtype, device), 2)
        except Exception:  # a dtype the device cannot run at all: the cell will say so
            pass
    choice = ComputeChoice(choice.setting, choice.dtype, choice.reason, choice.device, choice.emulated, factors)
    return {"device": device, "cuda_available": cuda_available, "cuda_bf16": cuda_bf16, "choice": asdict(choice)}


def main() -> int:
    """`python -m qbench.machine.compute`: a probe request as JSON on stdin, the answer as JSON on stdout."""
    request = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(probe(request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

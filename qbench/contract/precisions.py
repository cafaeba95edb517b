"""The one registry of weight formats: a precision name -> how the frozen base is stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["dense", "int8", "4bit"]

DTYPE_NAMES = ("bfloat16", "float16", "float32")
LLM_INT8_THRESHOLD = 6.0
BNB_4BIT_BLOCKSIZE = 64  # values per absmax block; bitsandbytes' default and the only one transformers exposes


@dataclass(frozen=True)
class Precision:
    """How the frozen base weights are stored; LoRA adapters and compute dtype are the same for every one."""

    name: str
    kind: Kind
    description: str
    dense_dtype: str | None = None  # for kind == "dense": the storage dtype of the base (None: the compute dtype)
    quant_type: str | None = None  # for kind == "4bit": "nf4" or "fp4"
    double_quant: bool = False  # for kind == "4bit": absmax quantized again (nested)

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    @property
    def expected_linear_class(self) -> str | None:
        """The bitsandbytes module class the loaded base's linears must have, or None for dense."""
        return {"dense": None, "int8": "Linear8bitLt", "4bit": "Linear4bit"}[self.kind]

    def settings(self, compute_dtype: str | None = None, llm_int8_threshold: float = LLM_INT8_THRESHOLD) -> dict[str, object]:
        """Flat, JSON-friendly description for the record (`dense_dtype` of the `dense` arm: the compute dtype;
        `llm_int8_threshold`: the suite's quantization.llm_int8_threshold, recorded for int8 only)."""
        return {
            "kind": self.kind,
            "dense_dtype": (self.dense_dtype or compute_dtype) if self.kind == "dense" else None,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": BNB_4BIT_BLOCKSIZE if self.kind == "4bit" else None,
            "llm_int8_threshold": float(llm_int8_threshold) if self.kind == "int8" else None,
        }


def _four_bit(quant_type: str, double_quant: bool, what: str) -> Precision:
    name = quant_type + ("-dq" if double_quant else "")
    extra = ", absmax quantized again to 8 bits (double quantization)" if double_quant else ""
    return Precision(name, "4bit", f"4-bit {what}, blocks of 64{extra}", quant_type=quant_type, double_quant=double_quant)


# the dense arm in whatever the run computes in: bf16 on a GPU or a CPU with bf16 instructions, float32 on
# other CPUs (see qbench.machine.compute), so one suite's baseline reads right on every device
DENSE = "dense"

REGISTRY: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(DENSE, "dense", "unquantized base in the compute dtype (bf16 where native, else fp16 on a GPU, fp32 on a CPU)"),
        Precision("bf16", "dense", "unquantized bfloat16 base", dense_dtype="bfloat16"),
        Precision("fp16", "dense", "unquantized float16 base", dense_dtype="float16"),
        Precision("fp32", "dense", "unquantized float32 base", dense_dtype="float32"),
        Precision("int8", "int8", "LLM.int8 (8-bit rows; input columns with outliers above the threshold, 6.0 unless "
                                  "quantization.llm_int8_threshold says otherwise, in 16-bit)"),
        _four_bit("fp4", False, "FP4 (E2M1)"),
        _four_bit("fp4", True, "FP4 (E2M1)"),
        _four_bit("nf4", False, "NormalFloat"),
        _four_bit("nf4", True, "NormalFloat"),
    )
}

DEFAULT_MATRIX = (DENSE, "int8", "fp4", "fp4-dq", "nf4", "nf4-dq")


def dense_dtypes(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The fixed storage dtypes of the dense arms among `names` (bf16 -> bfloat16, ...; `dense` has none)."""
    return tuple(dict.fromkeys(REGISTRY[n].dense_dtype for n in names if n in REGISTRY and REGISTRY[n].dense_dtype))


def get(name: str) -> Precision:
    """The precision called `name`; KeyError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown precision {name!r}; known: {', '.join(REGISTRY)}") from None

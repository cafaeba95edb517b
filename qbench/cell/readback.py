"""What the base really is once loaded: where it sits, its format read back and checked, its exact bytes,
and how far its dequantized weights are from the checkpoint's."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qbench.suite.precisions import Precision
    from qbench.suite.spec import Suite


def inspect_base(model: torch.nn.Module, precision: Precision, suite: Suite, model_path: str,
                 fields: dict[str, Any]) -> None:
    """Add the loaded base's record fields to `fields` as they are read, so that when the base is not in the
    format its precision names (FormatMismatch is raised) what was read back stays in the record as evidence."""
    from qbench.cell import models
    from qbench.measure import weight_error, weights

    fields.update(models.placement(model))
    fields["bnb.cpu_weight_packing_disabled_layers"] = models.disable_bnb_cpu_weight_packing(model)
    fields.update(weights.read_format(model))
    fields.update(weights.account_base(model))
    weights.check_format(model, precision, suite.compute_dtype)  # the arm must be what its name says
    started = time.perf_counter()  # outside every phase: reading the originals is the harness's work
    fields.update(weight_error.measure(model, model_path, suite.model.revision))
    fields["time.weight_error_s"] = time.perf_counter() - started

"""qbench: the same LoRA fine-tune under every weight format, measured side by side."""

from qbench import _moved

__version__ = "0.1.0"

_moved.install()  # the flat 0.1 module paths (qbench.metrics, qbench.models, ...) keep importing

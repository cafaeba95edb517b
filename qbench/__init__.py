"""qbench: the same LoRA fine-tune under every weight format, measured side by side."""

__version__ = "0.1.0"

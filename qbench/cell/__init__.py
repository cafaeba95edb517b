"""One cell's child process (imports torch): load, quantize, attach LoRA, train, evaluate, measure, write its record."""

"""One module per task; each supplies model loading, batches, loss and evaluation."""

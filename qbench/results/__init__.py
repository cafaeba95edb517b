"""Records on disk -> one flat DataFrame, the metric vocabulary and per-precision statistics (any process)."""

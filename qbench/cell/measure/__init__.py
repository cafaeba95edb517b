"""Memory, timing and weight-byte accounting."""

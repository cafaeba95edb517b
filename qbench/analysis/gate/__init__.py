"""The regression gate (parent process): a new run against a committed baseline, with tolerances and noise."""

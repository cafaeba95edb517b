"""A fake pynvml for tests without a GPU (see pynvml.py)."""

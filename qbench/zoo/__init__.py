"""Builtin tiny models and the commands that build their checkpoints."""

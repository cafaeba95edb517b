"""Exit codes of every qbench command, in one place: a CI job reads them."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # `run`: a cell did not finish; `compare`: a regression
    BAD_INPUT = 2  # a suite, data, model, path or set of records that cannot give what was asked; nothing (more) ran
    SIGHUP = 129  # 128 + the signal number, as a shell reports it
    SIGINT = 130
    SIGTERM = 143

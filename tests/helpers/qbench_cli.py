"""`python -m tests.helpers.qbench_cli ARGS`: the qbench command line with the faulty cell (QBENCH_TEST_FAULTS,
tests/helpers/faults.py) in place of qbench's own, for the tests that run it as a process of its own."""

from __future__ import annotations

import sys

from qbench.cli import main

from .executors import FAULTY, install

if __name__ == "__main__":
    install(FAULTY)
    sys.exit(main())

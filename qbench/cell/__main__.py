"""`python -m qbench.cell`: run one cell, its spec as JSON on standard input (see qbench.cell.pipeline)."""

import sys

from qbench.cell.pipeline import main

sys.exit(main())

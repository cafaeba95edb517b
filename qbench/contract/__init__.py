"""What every qbench process agrees on: the suite, the registries (precisions, optimizers, tasks), the grid of
cells, the parent<->cell protocol and the record. Imports neither torch nor pandas, nor any other part of qbench."""

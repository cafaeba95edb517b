"""Records on disk -> one flat DataFrame, the metric vocabulary and per-precision statistics (any process)."""


def __getattr__(name: str):  # names of the flat 0.1 module this package replaced (see qbench._moved)
    from qbench._moved import forward

    return forward(__name__, ('records',), name)

"""One cell's child process (imports torch): load, quantize, attach LoRA, train, evaluate, measure, write its record."""


def __getattr__(name: str):  # names of the flat 0.1 module this package replaced (see qbench._moved)
    from qbench._moved import forward

    return forward(__name__, ('pipeline',), name)

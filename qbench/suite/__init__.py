"""What to run (parent process): suite TOML -> validated spec -> cells; precision registry; preflight checks."""


def __getattr__(name: str):  # names of the flat 0.1 module this package replaced (see qbench._moved)
    from qbench._moved import forward

    return forward(__name__, ('spec',), name)

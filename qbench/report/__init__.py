"""What people read (parent process): DataFrame -> Markdown / HTML / CSV / Parquet tables and plots."""


def __getattr__(name: str):  # names of the flat 0.1 module this package replaced (see qbench._moved)
    from qbench._moved import forward

    return forward(__name__, ('summary', 'tables', 'explain', 'write'), name)

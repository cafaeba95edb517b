"""A limit of the machine or the shell hit while qbench works (a low address-space limit: `ulimit -v`,
`prlimit --as`, common on shared login nodes), told apart from a broken input so that it is said in one line:
what ran out, in which step, and under which limit."""

from __future__ import annotations

import errno
import resource
from types import TracebackType

# what the dynamic loader and Python say when an address-space limit stops them
OUT_OF_MEMORY_TEXTS = ("failed to map segment", "cannot allocate memory", "out of memory")


def exhausted(error: BaseException) -> str | None:
    """"memory" or "a thread" when `error` comes from running out of memory or threads (MemoryError, a shared
    library that cannot be mapped, ENOMEM, "can't start new thread"; "probably memory" for an internal error
    under an address-space limit), else None."""
    if isinstance(error, MemoryError):
        return "memory"
    if isinstance(error, SystemError) and address_space_limit() is not None:
        return "probably memory"  # a C extension that failed to allocate under the limit without saying so
    text = str(error).lower()
    if isinstance(error, RuntimeError) and "can't start new thread" in text:
        return "a thread"
    if isinstance(error, (ImportError, OSError)) and (getattr(error, "errno", None) == errno.ENOMEM
                                                        or any(t in text for t in OUT_OF_MEMORY_TEXTS)):
        return "memory"
    return None


def reraise_exhausted(error: BaseException) -> None:
    """Raise `error` again when it is a limit hit (see `exhausted`), for a handler of "anything that can go wrong"
    that would otherwise blame an input for it."""
    if exhausted(error) is not None:
        raise error


def address_space_limit() -> int | None:
    """This process's address-space limit in bytes (RLIMIT_AS), or None when there is none."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


# below this address-space limit torch cannot even be imported and a model loaded: its C++ side aborts the
# process (std::bad_alloc) where Python would have raised MemoryError, so the limit is refused up front
MIN_ADDRESS_SPACE_BYTES = 2 * 1024**3


def address_space_problem() -> str | None:
    """Why this process's address-space limit is too low for any run, or None."""
    limit = address_space_limit()
    if limit is None or limit >= MIN_ADDRESS_SPACE_BYTES:
        return None
    return (f"this process's address-space limit is {limit:,} bytes (ulimit -v / prlimit --as), below the "
            f"{MIN_ADDRESS_SPACE_BYTES // 1024**3} GiB torch and the smallest model need; raise it (ulimit -v "
            f"{MIN_ADDRESS_SPACE_BYTES // 1024} or more, in KiB) or run where it is unlimited")


def step_of(traceback: TracebackType | None) -> str:
    """Where in qbench it happened: the innermost qbench function on the traceback ("qbench.cell.data.tsv.load_tsv")."""
    found = "qbench"
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if module.startswith("qbench."):
            found = f"{module}.{traceback.tb_frame.f_code.co_name}".replace(".<module>", " (importing it)")
        traceback = traceback.tb_next
    return found


def exhausted_line(error: BaseException, what: str) -> str:
    """One line for `error` (`what`: exhausted()'s answer): what ran out, where, and the limit."""
    limit = address_space_limit()
    ran_out = {"memory": "out of memory", "a thread": "could not start a thread"}.get(
        what, f"failed ({type(error).__name__}: {error}), most likely out of memory,")
    under = (f"under this process's address-space limit of {limit:,} bytes (ulimit -v / prlimit --as); raise it, a run "
             "needs a few GB for torch and the model alone" if limit is not None else "the machine's memory is used up")
    return f"{ran_out} in {step_of(error.__traceback__)}: {under}"

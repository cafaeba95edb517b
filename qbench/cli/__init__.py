"""The `qbench` command line (parent process; never imports torch): parser, thin commands, rich rendering."""

from __future__ import annotations

import errno
import sys

from qbench.contract.exitcodes import Exit
from qbench.contract.suite import SuiteError
from qbench.machine import limits  # imported first: what says "out of memory" must not need memory to import


def main(argv: list[str] | None = None) -> int:
    from qbench.cli.parser import build_parser
    from qbench.cli.render import echo, errors
    from qbench.cli.render import error as print_error
    from qbench.runner.runner import signals_as_interrupts

    for stream in (sys.stdout, sys.stderr):  # under an ASCII locale, "café" in a path is shown as caf\xe9, not a traceback
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    args = build_parser().parse_args(argv)
    heard: list[str] = []  # SIGTERM and SIGHUP (a closed terminal) end a command as Ctrl-C does, with a line
    try:
        with signals_as_interrupts(heard.append):
            return int(args.handler(args))
    except SuiteError as error:
        for problem in error.problems:
            print_error(f"{error.path}: {problem}")
        return Exit.BAD_INPUT
    except KeyboardInterrupt:  # before any cell started (checks, device probe): nothing to keep
        name = heard[0] if heard else "SIGINT"
        errors.print(f"[yellow]interrupted[/] by {echo(name)}", highlight=False)
        return Exit.__members__.get(name, Exit.SIGINT)
    except (MemoryError, RuntimeError, ImportError, OSError, SystemError) as error:
        return _exhausted(error)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _exhausted(error: BaseException) -> int:
    """A limit hit (memory, threads) in one line and exit 2; a file that could not be read or written too;
    anything else goes on as the error it is."""
    import os

    what = limits.exhausted(error)
    if what is not None:  # written without rich, which would need memory of its own to say so
        os.write(2, f"error: {limits.exhausted_line(error, what)}\n".encode("utf-8", "backslashreplace"))
        return Exit.BAD_INPUT
    if isinstance(error, OSError) and error.filename:  # a file a command could not read or write
        from qbench.cli.render import error as print_error
        from qbench.contract.files import OutputError

        shown = str(error) if isinstance(error, OutputError) else f"{error.filename}: {error.strerror or error}"
        print_error(shown)
        return Exit.BAD_INPUT
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:  # a write without a file name (a log, a pipe)
        from qbench.cli.render import error as print_error

        print_error(f"{error.strerror or error} (errno {error.errno}) while writing; the records written so far "
                    "are whole (each file is written in one piece); free space and run the command again, or "
                    "resume a stopped run with `qbench run --resume RUN_DIR`")
        return Exit.BAD_INPUT
    raise error


if __name__ == "__main__":
    sys.exit(main())

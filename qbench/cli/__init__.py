"""The `qbench` command line (parent process; never imports torch): parser, thin commands, rich rendering."""

from __future__ import annotations

import sys

from qbench.contract.exitcodes import Exit
from qbench.contract.suite import SuiteError


def main(argv: list[str] | None = None) -> int:
    from qbench.cli.parser import build_parser
    from qbench.cli.render import error as print_error
    from qbench.cli.render import errors

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except SuiteError as error:
        for problem in error.problems:
            print_error(f"{error.path}: {problem}")
        return Exit.BAD_INPUT
    except KeyboardInterrupt:  # before any cell started (checks, device probe): nothing to keep
        errors.print("[yellow]interrupted[/]")
        return Exit.SIGINT
    except OSError as error:  # a file a command could not read or write (commands handle the ones they expect)
        if not error.filename:
            raise
        from qbench.contract.files import OutputError

        shown = str(error) if isinstance(error, OutputError) else f"{error.filename}: {error.strerror or error}"
        print_error(shown)
        return Exit.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""The command-line conventions that `hart-generate` and `hart-convert` share.

An expected failure (a bad argument, a missing folder or file, a corrupt checkpoint, an input the pipeline refuses)
prints one line `PROG: error: MESSAGE` on stderr and exits with status 2, argparse's own convention; `--debug` shows
the traceback instead. Any other exception is a bug and keeps its traceback.
"""

import argparse
from typing import Callable, Optional, Sequence, Tuple, Type


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` with a `--debug` flag, one-line errors, and `run` to give a command the same errors.

    The description is printed as written (`RawDescriptionHelpFormatter`), so usage examples keep their lines.
    """

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: off)")

    def error(self, message: str):
        # argparse prints its usage block before the error; without it, every error of a command has one shape,
        # one line (`--help` shows the usage). Messages of other libraries may span lines: join them.
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def run(
        self,
        command: Callable[[argparse.Namespace], None],
        argv: Optional[Sequence[str]] = None,
        expected: Tuple[Type[BaseException], ...] = (OSError, ValueError),
    ) -> int:
        """Parse `argv` and run `command(args)`; returns 0, or exits with status 2 on an `expected` exception."""
        args = self.parse_args(argv)
        try:
            command(args)
        except expected as error:
            if args.debug:
                raise
            self.error(str(error) or type(error).__name__)
        return 0


def positive_int(text: str) -> int:
    """argparse type of counts: `int(text)`, refused below 1 (a count of 0 is never what was meant)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value

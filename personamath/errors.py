"""One exception for every mistake a user can fix; the CLIs print it as a single line."""
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or configuration: reported in one line, without a traceback; the CLI exits with
    `status` (2 unless a more telling exit status applies, e.g. a budget reached)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@contextmanager
def exit_on_user_error():
    """Wrap a CLI's main: a UserError becomes `error: ...` on stderr and its exit status (2)."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)

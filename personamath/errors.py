"""One exception for every mistake a user can fix; the CLIs print it as a single line."""
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or configuration: reported in one line, without a traceback."""


@contextmanager
def exit_on_user_error():
    """Wrap a CLI's main: a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

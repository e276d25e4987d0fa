"""One error type for everything a user can get wrong, and the CLI wrapper that prints it.

Expected failures (bad path, bad checkpoint, bad option) raise `UserError`; the CLI prints
one line `error: ...` and exits with status 2 instead of a traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def cli(main):
    """Decorate a `main(argv=None)` so a UserError becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped

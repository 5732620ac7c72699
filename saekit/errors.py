"""The one exception type for mistakes a user can fix.

The CLI prints a `SaekitError` as a single line and exits non-zero; any other
exception is a bug and keeps its traceback.  Messages name the problem *and* the fix.
"""

import difflib


class SaekitError(Exception):
    """A user-fixable problem (bad input, bad config, damaged file)."""


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""

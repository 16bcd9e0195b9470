"""User-facing errors: one clear sentence naming the thing and what to do.

Every module raises `UserError` (or a subclass) for anything a user can fix: an unknown model, a missing
data folder, a corrupt file. The command line prints its message alone, never a traceback, and exits 2.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path


class UserError(Exception):
    """An error the user can fix; `str(err)` is the whole message shown to them."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to `name`, best first (for 'did you mean' messages)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        prefix = [c for c in choices if c.startswith(name[:3])] if len(name) >= 3 else []
        found = prefix[:n]
    return found


def user_path(text: str | os.PathLike) -> Path:
    """`text` as a Path with a leading ~ or ~user expanded; a user name that does not exist is a UserError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise UserError(f"'{os.fspath(text)}' starts with a home directory that does not exist on this machine; "
                        f"give the path in full.") from None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean a, b?)' or '' when nothing is close."""
    near = closest(name, choices)
    return f" (did you mean {', '.join(near)}?)" if near else ""

"""The one error type for what a user can fix: a recipe key, an override, a data file, a
checkpoint, a command-line argument. ``mml`` prints its message as one line (no traceback),
so each message names the file, key or value at fault and what would be valid."""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input, phrased for the user: names the file/key/value and
    what is valid."""

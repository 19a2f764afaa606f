"""The error a user can fix: :class:`UsageError`.

``kid`` commands turn it (and the ``ValueError`` / ``OSError`` that kid's own input checks raise) into one line
``kid <command>: error: ...`` and exit status 2; anything else is a bug and is shown with its traceback.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input (an option, a file, a combination of them): the message says what is wrong and how to fix it."""

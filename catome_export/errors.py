"""The one exception type of the project.

Every error a user can cause (bad input, missing optional package, missing or
damaged engine folder) is raised as :class:`CatomeError` with a message that
says what went wrong and what to do. The CLI turns it into a one-line message
and exit code 1, without a traceback.
"""

from __future__ import annotations


class CatomeError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""

"""Errors a user can fix, shared by every package: the entry points print their message alone.

A ``UsageError`` says what is wrong and what is allowed (a bad value, a missing checkpoint, a run
directory that holds other results); ``runners.errors.reported_errors`` prints it as one line
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake the user can fix; the message names the bad value and the allowed ones."""


class ConfigError(UsageError, ValueError):
    """A bad or missing setting, found before anything is loaded or written."""

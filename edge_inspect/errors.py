"""Errors a user can act on. The CLI prints their message (no traceback) and exits with `exit_code`."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad config or a missing prerequisite: the message says what and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config file that does not validate. The message names the key, the value and the fix."""


class CalibrationError(UserError):
    """A product calibration that cannot be built or loaded."""

"""Errors that rlloop reports to the user as one clear line (no traceback), exit code 2."""


class RlloopError(Exception):
    """Base of errors caused by the user's input: config, data, model paths, reward functions."""


class ConfigError(RlloopError, ValueError):
    """An impossible or inconsistent config value; the message names the key."""

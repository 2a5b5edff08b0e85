"""Errors that rlloop reports to the user as one clear line (no traceback), exit code 2."""


class RlloopError(Exception):
    """Base of errors caused by the user's input: config, data, model paths, reward functions."""


class ConfigError(RlloopError, ValueError):
    """An impossible or inconsistent config value; the message names the key."""


class exit_on_user_error:
    """`with exit_on_user_error(logger): ...` in a CLI's main: a `RlloopError` or `FileNotFoundError`
    (the user's input is wrong) becomes one `error: ...` line on `logger` and exit code 2, no traceback.
    A class rather than a `contextlib` generator so that this module keeps importing nothing."""

    def __init__(self, logger):
        self.logger = logger

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, err, traceback) -> None:
        if isinstance(err, (RlloopError, FileNotFoundError)):
            self.logger.error("error: %s", err)
            raise SystemExit(2)

"""Exceptions that carry a message meant for the user: the CLI prints them without a stack trace."""


class TailclipError(Exception):
    """Base class for every error whose message alone tells the user what to fix."""


class ConfigError(TailclipError, ValueError):
    """An unknown config key, or a value outside the accepted ones (the message names both)."""


class WeightsNotFoundError(TailclipError, FileNotFoundError):
    """Pretrained weights are not available offline; the message says which file and how to point at a copy."""


class DataError(TailclipError):
    """A dataset is missing, incomplete or inconsistent (the message names the file or the mismatch)."""


class CorruptImageError(DataError):
    """An image file exists but cannot be decoded; carries the path."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = path
        super().__init__(f"corrupt or unreadable image: {path}" + (f" ({reason})" if reason else ""))


class UnknownNameError(TailclipError, KeyError):
    """A name (dataset, method, model, tuner…) that no registry knows; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

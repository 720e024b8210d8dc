"""The one exception family the CLI turns into a message, a hint and an exit code."""

from __future__ import annotations


class SandboxError(Exception):
    """An error the user can act on: what went wrong, and what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(SandboxError):
    """Bad input from the user: a name, an address, an option."""

    exit_code = 2


class NotFoundError(SandboxError):
    """A sandbox or image that does not exist."""

    exit_code = 3


class ConflictError(SandboxError):
    """Something that already exists or is busy."""

    exit_code = 4


class HypervisorError(SandboxError):
    """libvirt could not be reached or refused an operation."""

    exit_code = 5


class GuestError(SandboxError):
    """The guest did not come up, or SSH to it failed."""

    exit_code = 6


class HostKeyMismatchError(GuestError):
    """The guest presented an SSH host key other than the one we pinned."""


class ImageError(SandboxError):
    """Building or finding a base image failed."""

    exit_code = 7


class OutputTooLarge(GuestError):
    """The guest sent more than the host takes for one command or file."""


class TimeoutExpired(SandboxError):
    """A wait ran past its deadline."""

    exit_code = 8

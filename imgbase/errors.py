"""Errors that reach the user: one line, a hint, and a stable exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: the update's helper processes import this module
    from typing import NoReturn

# One table of exit codes for every command.
EXIT_OK = 0
EXIT_FAILURE = 1  # an operation failed (a command, a build step)
EXIT_USAGE = 2  # bad input: arguments, spec files, preconditions
EXIT_NO_RESULT = 3  # a guest ended without giving the result asked for
EXIT_REFUSED = 65  # an image refused for what it is (signature, checksum, age, content)
EXIT_INTERRUPTED = 130  # Ctrl-C


class ImgbaseError(Exception):
    """An error with a message and an optional hint, printed on one line."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def oneline(self) -> str:
        """The error as a single line, e.g. for stderr.

        >>> ImgbaseError("disk full", hint="free some space").oneline()
        'disk full (hint: free some space)'
        """
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class InputError(ImgbaseError):
    """Bad input from the user: arguments, spec files, preconditions."""

    exit_code = EXIT_USAGE


class ImageRefused(InputError):
    """An image refused for what it is: a bad or untrusted signature, a checksum that does
    not match, older than the node accepted, a malformed image.json. Asking again for the
    same image gets the same answer (the agent does not retry it); a missing file, the
    network, a lock or a full disk are plain input errors, worth another try."""

    exit_code = EXIT_REFUSED


def die(message: str, hint: str | None = None) -> NoReturn:
    """Stop with a user-facing error about bad input."""
    raise InputError(message, hint=hint)


def refuse(message: str, hint: str | None = None) -> NoReturn:
    """Stop: the image itself is refused (see :class:`ImageRefused`)."""
    raise ImageRefused(message, hint=hint)

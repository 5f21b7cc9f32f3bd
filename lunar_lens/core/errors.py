"""The one user-facing error type (kept free of heavy imports so the CLI and loaders start fast)."""

from __future__ import annotations

from collections.abc import Callable


class LunarError(Exception):
    """A user-facing error: the message names the problem and the fix.

    Parameters the message names are written `{name}` and listed in `parameters`: a Python caller
    reads the parameter's name, the command line its flag (`render`)."""

    def __init__(self, message: str, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parameters = parameters

    def render(self, name: Callable[[str], str] = str) -> str:
        message = self.args[0]
        for parameter in self.parameters:
            message = message.replace("{" + parameter + "}", name(parameter))
        return message

    def __str__(self) -> str:
        return self.render()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

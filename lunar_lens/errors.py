"""The one user-facing error type (kept free of heavy imports so the CLI and loaders start fast)."""


class LunarError(Exception):
    """A user-facing error: the message names the problem and the fix."""

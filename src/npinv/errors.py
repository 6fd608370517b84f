"""The one exception type for errors a user can cause (bad file, unknown model, bad option)."""


class NpinvError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""

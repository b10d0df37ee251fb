"""User-facing errors: each carries a one-line message that the CLI prints instead of a traceback."""


class Blip2Error(Exception):
    """An error caused by the user's input or environment, explained in one line."""

    exit_code = 1  # the process's exit status when the CLI reports it
    heading = "error"  # printed as "blip2: <heading>: <message>"


class ModelNotFoundError(Blip2Error):
    pass


class CheckpointError(Blip2Error):
    pass


class ImageError(Blip2Error):
    pass

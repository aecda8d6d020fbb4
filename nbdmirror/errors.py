"""The refusals every layer may raise, in a module that imports nothing, so
that the CLI can name them without loading the job machinery."""


class EndpointError(Exception):
    """An endpoint cannot be opened or used; str() is a one-line reason."""


class JobError(Exception):
    """A refused request; str() is the one-line reason."""

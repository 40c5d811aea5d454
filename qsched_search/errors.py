"""The one exception type whose message the CLI prints as a one-line error."""


class QschedError(ValueError):
    """Bad input or a missing resource, with a message that names the value, what is allowed and the fix."""

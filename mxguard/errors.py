"""Errors that carry a message meant for an operator, never a stack trace."""


class MxguardError(Exception):
    """Base class: the message is shown to the user as it is."""


class ConfigError(MxguardError):
    """A bootstrap setting or a data-dir file is missing or invalid."""


class ValidationFailed(MxguardError):
    """A value given to a service function (CLI, console, API) is invalid.

    Attributes:
        field: the name of the offending field, as the caller spelt it.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(MxguardError):
    """The named object (domain, message, ...) does not exist."""


class AlreadyExists(MxguardError):
    """An object with this name exists already."""


class Conflict(MxguardError):
    """The object is in a state that does not allow the action now (HTTP 409), e.g. a spool
    entry a worker is delivering at this moment."""


class PermissionDenied(MxguardError):
    """The actor's role does not allow this action (HTTP 403)."""

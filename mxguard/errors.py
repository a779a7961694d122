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
        #: Every problem found in the request as ``(field, message)``; the first is ``field``.
        self.errors: list[tuple[str, str]] = [(field, message)]

    @classmethod
    def combine(cls, failures: list["ValidationFailed"]) -> "ValidationFailed":
        """One exception carrying every failure (the API lists them all, as FastAPI does).

        Args:
            failures: at least one :class:`ValidationFailed`, in the order found.
        """
        first = failures[0]
        combined = cls(first.field, first.message)
        combined.errors = [e for f in failures for e in f.errors]
        combined.args = ("; ".join(f"{f}: {m}" for f, m in combined.errors),)
        return combined


class ValidationCollector:
    """Collects :class:`ValidationFailed` raised inside ``with collector:`` blocks.

    Each block checks one field; a failure is recorded and the next block runs,
    so one request is told about every bad field at once.
    """

    def __init__(self) -> None:
        self.failures: list[ValidationFailed] = []

    def __enter__(self) -> "ValidationCollector":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ValidationFailed):
            self.failures.append(exc)
            return True
        return False

    def raise_if_any(self) -> None:
        """Raises: ValidationFailed: the combined failures, when there was one."""
        if self.failures:
            raise ValidationFailed.combine(self.failures)


class NotFound(MxguardError):
    """The named object (domain, message, ...) does not exist."""


class AlreadyExists(MxguardError):
    """An object with this name exists already."""


class Conflict(MxguardError):
    """The object is in a state that does not allow the action now (HTTP 409), e.g. a spool
    entry a worker is delivering at this moment."""


class PermissionDenied(MxguardError):
    """The actor's role does not allow this action (HTTP 403)."""


class AcmeFailed(MxguardError):
    """An ACME order (RFC 8555) did not give a certificate; the message says at which step and what
    the CA said (HTTP 502 in the API). Defined here, not with the ACME client, so callers can catch
    it without importing the client's libraries."""

"""The one exception tree of indostar-jobs, and the rule that says which errors are worth retrying.

    JobError
    ├── TransientError              may succeed later: retried (timeouts, SMTP 4xx, HTTP 429/5xx)
    │   └── ServiceUnavailableError a service does not answer (PostgreSQL, Redis, the Prefect API)
    └── PermanentError              fails again however often it is tried: never retried
        ├── InvalidInputError       a parameter or payload is malformed (rejected before any write)
        ├── NotFoundError           an id that names no row
        ├── ConfigError             a setting is missing, malformed or refused (e.g. a dev secret in production)
        ├── SignatureError          a webhook body does not match its signature
        └── RejectedError           a well-formed request we refuse on its merits (e.g. a charge of the wrong amount)

``is_transient`` is the single retry rule: our own errors say what they are; errors from
drivers count as transient only when they mean "the connection went away" (a dropped
PostgreSQL or Redis connection, a socket timeout); anything else is permanent.
"""

from __future__ import annotations


class JobError(Exception):
    """Base of the errors raised on purpose by indostar-jobs."""


class TransientError(JobError):
    """May succeed later: timeouts, refused connections, SMTP 4xx, HTTP 429/5xx."""


class ServiceUnavailableError(TransientError):
    """A service does not answer; the message says which, at which address, and how to start it."""


class PermanentError(JobError):
    """Will fail again however often it is tried: bad input, SMTP 5xx, HTTP 4xx, unknown template."""


class InvalidInputError(PermanentError, ValueError):
    """A flow parameter or payload is malformed; rejected before anything is written."""


def positive_int(value: object, name: str, after: str = "") -> int:
    """``value`` if it is a whole number in 1..2**63-1 (bools refused), else InvalidInputError naming it.

    The one check for ids, day counts, batch sizes and lane counts; ``after`` ends the
    message (e.g. "; nothing was deleted").
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise InvalidInputError(f"{name} must be a whole number > 0, got {value!r}{after}")
    return value


def no_nul(value: object, name: str) -> None:
    """InvalidInputError naming the first text inside ``value`` (nested lists and dicts too) with a NUL.

    PostgreSQL's text and jsonb cannot hold U+0000: refused here in one line, before a row (ours, or a
    flow run in Prefect's database) fails to be written with a driver error.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInputError(f"{name} contains a NUL character")
    elif isinstance(value, dict):
        for k, v in value.items():
            no_nul(k, name)
            no_nul(v, f"{name}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            no_nul(v, f"{name}[{i}]")


class NotFoundError(PermanentError, LookupError):
    """An id that names no row."""


class ConfigError(PermanentError):
    """A setting is missing, malformed or refused; the message names the variable."""


class SignatureError(PermanentError):
    """A webhook signature does not match the body: rejected, nothing written."""


class RejectedError(PermanentError):
    """A well-formed request refused on its merits (recorded with the reason before it is raised)."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: ours say so; driver errors only when the connection went away."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return _driver_connection_lost(exc)


def _driver_connection_lost(exc: BaseException) -> bool:
    # Imported here so that this module stays importable without the drivers.
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # psycopg2 raises OperationalError for a lost or refused connection, a server shutdown and a
    # statement timeout; data errors (constraint, type) are IntegrityError / DataError instead.
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def rebuild(error_type: str | None, message: str) -> Exception:
    """An error stored by name (e.g. a background task's) raised again as its class here, if it is one of ours.

    Anything else (a driver's error, a bug) comes back as a PermanentError naming the original class.
    """
    known: dict[str, type[Exception]] = {
        cls.__name__: cls
        for cls in (
            JobError,
            TransientError,
            ServiceUnavailableError,
            PermanentError,
            InvalidInputError,
            NotFoundError,
            ConfigError,
            SignatureError,
            RejectedError,
        )
    }
    cls = known.get(error_type or "")
    if cls is None:
        return PermanentError(f"{error_type}: {message}" if error_type else message)
    return cls(message)

"""The two error families every job uses: transient (worth retrying) and permanent.

Task retry conditions retry only ``TransientError``; a ``PermanentError`` fails at
once with its message (and, for notifications, lands in the dead-letter state).
"""

from __future__ import annotations


class JobError(Exception):
    """Base of the errors raised on purpose by indostar-jobs."""


class TransientError(JobError):
    """May succeed later: timeouts, refused connections, SMTP 4xx, HTTP 429/5xx."""


class PermanentError(JobError):
    """Will fail again however often it is tried: bad input, SMTP 5xx, HTTP 4xx, unknown template."""


class InvalidInputError(PermanentError, ValueError):
    """A flow parameter or payload is malformed; rejected before anything is written."""


class NotFoundError(PermanentError, LookupError):
    """An id that names no row."""

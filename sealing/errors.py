"""Errors of the ``sealing`` package. Every error it raises derives from :class:`SealingError`.

The tree, by failure area::

    SealingError
    ├── ParameterError             a caller passed an unusable argument (also a ValueError)
    ├── InvalidKeyError            a recipient key is malformed (bad KEM, bad length, bad point)
    │   └── KeyFileError           a key file cannot be read, written or parsed
    ├── HpkeError                  HPKE sealing or opening failed
    ├── SealingIOError             reading or writing a stream failed
    └── EnvelopeError              a sealed stream cannot be opened
        ├── HeaderError            not a sealed stream, unsupported version, malformed header
        ├── HeaderAuthenticationError   header fields or a wrapped key were modified
        ├── WrongKeyError          the data key given is not the one the file was sealed with
        │   └── NoMatchingRecipientError   the private key is not one of the file's recipients
        ├── SegmentAuthenticationError  a segment was modified, reordered or dropped
        ├── TruncatedError         the stream ends before its final segment
        └── TrailingDataError      bytes follow the final segment

Messages never contain key material or plaintext.
"""

from __future__ import annotations

from cleanroom.errors import CleanroomError


class SealingError(CleanroomError):
    """Root of every error the ``sealing`` package raises."""


class ParameterError(SealingError, ValueError):
    """An argument is out of range or inconsistent (chunk size, key id, data key length)."""


class InvalidKeyError(SealingError):
    """A recipient key is malformed: unknown KEM, wrong raw length, or rejected by the KEM."""


class KeyFileError(InvalidKeyError):
    """A key file cannot be read, written or parsed."""


class HpkeError(SealingError):
    """HPKE sealing or opening failed (wrong key, wrong info, corrupted ciphertext)."""


class SealingIOError(SealingError):
    """Reading or writing a stream failed.

    The library lets the ``OSError`` itself propagate from the caller's streams and raises this
    on later reads of a reader left mid-segment by it; the CLI wraps every ``OSError`` in it.
    """


class EnvelopeError(SealingError):
    """A sealed stream cannot be opened or is not well formed."""


class HeaderError(EnvelopeError):
    """The stream is not a sealed stream, has an unsupported version, or a malformed header."""


class HeaderAuthenticationError(EnvelopeError):
    """The header failed authentication: a header field or a wrapped data key was modified."""


class WrongKeyError(EnvelopeError):
    """The data key does not match the key the stream was sealed with."""


class NoMatchingRecipientError(WrongKeyError):
    """The private key is not among the stream's recipients."""


class SegmentAuthenticationError(EnvelopeError):
    """A segment failed authentication: modified, reordered, dropped or from another stream."""


class TruncatedError(EnvelopeError):
    """The stream ends before its final segment (or inside the header or a segment)."""


class TrailingDataError(EnvelopeError):
    """Bytes follow the final segment (for example an appended segment)."""

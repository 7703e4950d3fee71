"""The one error hierarchy of the ledger package: every failure it reports is a LedgerError.

Callers (the CLI, the node, the auditor) catch :class:`LedgerError` and print its message; the
subclasses let them tell a bad payload from a bad proof from a broken store, and
:class:`VerificationError` carries the exact place of a fault in a ledger.
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Base of every error the ledger package raises."""


class CanonicalError(LedgerError):
    """A value cannot go on the ledger: not JSON-canonicalisable, a float, a non-ASCII key..."""


class EntryError(LedgerError):
    """An entry, block header or block is malformed."""


class ProofError(LedgerError):
    """A Merkle inclusion or consistency proof is malformed or does not verify."""


class KeyFileError(LedgerError):
    """A key file is missing, unreadable, of the wrong kind or has unsafe permissions."""


class BLSError(LedgerError):
    """A BLS operation was given bad input, or no usable backend could be set up."""


class SecretKeyFileError(BLSError, KeyFileError):
    """A BLS secret-key file cannot be read, written or parsed."""


class SignatureError(LedgerError):
    """A signature is malformed or does not verify."""


class RosterError(LedgerError):
    """A roster is malformed, wrongly signed, or does not list what is asked of it."""


class CheckpointError(LedgerError):
    """A checkpoint or certificate is malformed or does not verify."""


class StoreError(LedgerError):
    """The chain store cannot do what was asked (no such chain, not initialised, busy...)."""


class SigningHeld(StoreError):
    """This node signs no block now: its own chain was found longer elsewhere (the reason says
    where, and what to do); nothing was appended."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"this node signs nothing on its chain now: {reason}")


class VerificationError(LedgerError):
    """A ledger failed verification. ``chain``, ``height`` and ``seq`` name where, when known."""

    def __init__(
        self,
        what: str,
        *,
        chain: str | None = None,
        height: int | None = None,
        seq: int | None = None,
    ) -> None:
        self.what = what
        self.chain = chain
        self.height = height
        self.seq = seq
        super().__init__(self.describe())

    def describe(self) -> str:
        place = []
        if self.chain is not None:
            place.append(f"chain {self.chain}")
        if self.height is not None:
            place.append(f"block height {self.height}")
        if self.seq is not None:
            place.append(f"seq {self.seq}")
        return f"{', '.join(place)}: {self.what}" if place else self.what

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (a parallel verification's worker processes send their faults)."""
        return (_verification_error, (self.what, self.chain, self.height, self.seq))


def _verification_error(
    what: str, chain: str | None, height: int | None, seq: int | None
) -> VerificationError:
    return VerificationError(what, chain=chain, height=height, seq=seq)


class PeerUnavailable(LedgerError):
    """A member could not be reached, or answered with an error."""


class PeerTimeout(PeerUnavailable):
    """A member did not answer in time."""

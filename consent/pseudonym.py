"""The pseudonym that stands for a patient on the ledger (docs/spec.md §13.1).

``HMAC-SHA256(consortium pseudonym key, "<identifier system>|<identifier value>")``, in
lowercase hex. Every member holds the same key (``hrx node join --secret``), so one patient
gets the same pseudonym at every member and can be matched across them, while the ledger
holds nothing an outsider could turn back into an identifier.

The identifier is used as written, but for surrounding white space, and for the resident
identity card number (居民身份证号), whose check character ``x`` is written either way and is
upper-cased here, so that ``…002x`` and ``…002X`` are the same patient.
"""

from __future__ import annotations

import hashlib
import hmac

# The resident identity card number, as the OID WS/T 500 (the national shared-document
# standard) gives it; the default identifier members match patients by.
RESIDENT_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"

PSEUDONYM_LENGTH = 64  # hex digits


def normalized(system: str, value: str) -> str:
    value = value.strip()
    return value.upper() if system == RESIDENT_ID_SYSTEM else value


def pseudonym(secret: bytes, system: str, value: str) -> str:
    """The patient's pseudonym for the identifier ``system|value``."""
    if not system or not value.strip():
        raise ValueError("a pseudonym needs an identifier system and a value")
    message = f"{system}|{normalized(system, value)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def is_pseudonym(text: object) -> bool:
    return (
        isinstance(text, str)
        and len(text) == PSEUDONYM_LENGTH
        and all(c in "0123456789abcdef" for c in text)
    )

"""BLS12-381 signatures for the hrx ledger, behind one small bytes-in/bytes-out API.

Every BLS operation the ledger does goes through this module: members' co-signatures of
checkpoints, their aggregation into one quorum certificate, the proofs of possession rosters
carry against rogue-key aggregation, and the node's secret-key file. (Blocks and rosters are
signed with Ed25519, see :mod:`ledger.keys`.)

The ciphersuite is the IETF proof-of-possession one, exactly as
``py_ecc.bls.G2ProofOfPossession``: public keys are compressed G1 points (48 bytes),
signatures compressed G2 points (96 bytes), secret keys 32-byte big-endian integers.

Two backends give byte-identical results:

* ``py_ecc`` - the pure-Python reference; always there, slow (about 0.1-0.2 s to sign and
  0.4 s to verify).
* ``milagro`` - ``milagro_bls_binding`` (Rust), used when importable; a few milliseconds.
  It has no proof-of-possession functions and no way to hash with another domain tag, so
  :func:`prove_possession` and :func:`verify_possession` always run on ``py_ecc``.

The backend is picked at import time and named by :data:`BACKEND`. The environment variable
``HRX_BLS_BACKEND`` may force it: ``py_ecc`` or ``milagro`` (an error if milagro cannot be
imported or fails its known-answer self-test); empty or ``auto`` picks milagro when it works.

Verification functions never raise: a key or signature of the wrong length, not a point, not
in the subgroup, or the point at infinity makes them return False. Everything else given bad
input (a malformed secret key, an empty list to aggregate, a non-bytes message) raises
:class:`BLSError`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import secrets
import stat
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

_RECURSION_LIMIT = sys.getrecursionlimit()

from eth_utils.exceptions import ValidationError as _PyEccValidationError  # noqa: E402
from py_ecc.bls.ciphersuites import G2ProofOfPossession  # noqa: E402
from py_ecc.optimized_bls12_381.optimized_curve import curve_order as _curve_order  # noqa: E402

from ledger.errors import BLSError, SecretKeyFileError  # noqa: E402

# Importing py_ecc raises the interpreter's recursion limit to 100000, for the whole process.
# A node parses untrusted JSON: at that limit a deeply nested body ("[[[[…") overflows a
# thread's C stack in the parser and kills the process (found by the FHIR fuzz tests once a
# web process imported this module at start-up). py_ecc's BLS code needs no such depth.
sys.setrecursionlimit(_RECURSION_LIMIT)

__all__ = [
    "BACKEND",
    "CURVE_ORDER",
    "PUBLIC_KEY_SIZE",
    "SECRET_KEY_SIZE",
    "SIGNATURE_SIZE",
    "BLSError",
    "SecretKeyFileError",
    "aggregate",
    "fast_aggregate_verify",
    "generate_secret_key",
    "load_or_create_secret_key",
    "prove_possession",
    "public_key",
    "read_secret_key",
    "sign",
    "verify",
    "verify_possession",
    "write_secret_key",
]

SECRET_KEY_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 48
SIGNATURE_SIZE: Final = 96
CURVE_ORDER: Final[int] = int(_curve_order)
"""The order r of the BLS12-381 groups: a secret key is an integer in [1, r)."""

MIN_SEED_SIZE: Final = 32
"""KeyGen needs at least 32 bytes of input keying material (IETF BLS draft, section 2.3)."""

ENV_VAR: Final = "HRX_BLS_BACKEND"

_KEY_FILE_MODE: Final = 0o600
_KEY_FILE_MAX_READ: Final = 1024
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")

# Known answer, computed with py_ecc: KeyGen(bytes(range(32))), SkToPk, Sign(_KAT_MESSAGE).
# A backend that does not reproduce it is not used.
_KAT_SECRET_KEY: Final = bytes.fromhex(
    "23360db7e337b0a32b264e06bc11c1b474d16f55665373de1ce93cf15ddb3456"
)
_KAT_PUBLIC_KEY: Final = bytes.fromhex(
    "9112a0386a2340714ba0c6d2df235377a8679c3899d03e6ef04dba7a50ef49e5"
    "a1dc93105e9374e93ed301b63487e17c"
)
_KAT_MESSAGE: Final = b"hrx ledger BLS known-answer test"
_KAT_SIGNATURE: Final = bytes.fromhex(
    "a76acdf66a65135f942b06f0d6ea67806231a2a79913db81d1197b080087b832"
    "83aff7bcf3f50a176768f950e03c51ef11712d064fccfbb29003f07ddf6f8884"
    "b635c33a266cfce1dcac41f79532f8c6faddd29e43872d9a7230e541bcbc5510"
)


# py_ecc annotates its API with eth_typing's NewTypes (BLSPubkey, BLSSignature); this module
# checks its input itself, so it calls the ciphersuite untyped, as it does milagro.
_PopSuite: Any = G2ProofOfPossession


# py_ecc signals bad input with eth_utils' ValidationError (not a ValueError), ValueError or
# AssertionError; milagro with ValueError or TypeError.
_BACKEND_FAILURES: Final[tuple[type[Exception], ...]] = (
    _PyEccValidationError,
    ValueError,
    TypeError,
    AssertionError,
    ArithmeticError,
)


def _as_bytes(value: object) -> bytes | None:
    """``value`` as ``bytes`` if it is bytes-like, else None."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return None


def _check_secret_key(secret_key: object) -> tuple[bytes, int]:
    """The secret key as bytes and as an integer; BLSError unless it is 32 bytes in [1, r)."""
    sk = _as_bytes(secret_key)
    if sk is None:
        raise BLSError(f"secret key must be bytes, not {type(secret_key).__name__}")
    if len(sk) != SECRET_KEY_SIZE:
        raise BLSError(f"secret key must be {SECRET_KEY_SIZE} bytes, got {len(sk)}")
    value = int.from_bytes(sk, "big")
    if not 0 < value < CURVE_ORDER:
        raise BLSError("secret key is out of range: it must be an integer in [1, r)")
    return sk, value


def _check_message(message: object) -> bytes:
    msg = _as_bytes(message)
    if msg is None:
        raise BLSError(f"message must be bytes, not {type(message).__name__}")
    return msg


class _Backend:
    """One implementation of the API. Subclasses supply the ``_raw_*`` operations.

    The public methods check and normalise their input the same way for every backend, so the
    backends differ only in speed; the ``_raw_*`` methods get checked ``bytes`` and lists.
    """

    name: str = ""

    # --- operations a backend implements ---------------------------------------------------

    def _raw_public_key(self, sk: bytes, sk_int: int) -> bytes:
        raise NotImplementedError

    def _raw_sign(self, sk: bytes, sk_int: int, message: bytes) -> bytes:
        raise NotImplementedError

    def _raw_verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        raise NotImplementedError

    def _raw_aggregate(self, signatures: list[bytes]) -> bytes:
        raise NotImplementedError

    def _raw_fast_aggregate_verify(self, pks: list[bytes], message: bytes, sig: bytes) -> bool:
        raise NotImplementedError

    # Proofs of possession need hashing with the POP domain tag, which only py_ecc offers.
    def _raw_prove_possession(self, sk: bytes, sk_int: int) -> bytes:
        return bytes(_PopSuite.PopProve(sk_int))

    def _raw_verify_possession(self, pk: bytes, proof: bytes) -> bool:
        return bool(_PopSuite.PopVerify(pk, proof))

    # --- the checked API -------------------------------------------------------------------

    def public_key(self, secret_key: bytes) -> bytes:
        sk, sk_int = _check_secret_key(secret_key)
        return self._raw_public_key(sk, sk_int)

    def sign(self, secret_key: bytes, message: bytes) -> bytes:
        sk, sk_int = _check_secret_key(secret_key)
        return self._raw_sign(sk, sk_int, _check_message(message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        pk, msg, sig = _as_bytes(public_key), _as_bytes(message), _as_bytes(signature)
        if pk is None or msg is None or sig is None:
            return False
        if len(pk) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
            return False
        try:
            return self._raw_verify(pk, msg, sig)
        except _BACKEND_FAILURES:
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        if isinstance(signatures, bytes | bytearray | memoryview | str):
            raise BLSError("aggregate takes a sequence of signatures, not one byte string")
        checked: list[bytes] = []
        for index, signature in enumerate(signatures):
            sig = _as_bytes(signature)
            if sig is None or len(sig) != SIGNATURE_SIZE:
                raise BLSError(f"signature {index} is not {SIGNATURE_SIZE} bytes")
            checked.append(sig)
        if not checked:
            raise BLSError("cannot aggregate an empty list of signatures")
        try:
            return self._raw_aggregate(checked)
        except _BACKEND_FAILURES as exc:
            raise BLSError(
                f"cannot aggregate: a signature is not a valid G2 point ({exc})"
            ) from exc

    def fast_aggregate_verify(
        self, public_keys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        if isinstance(public_keys, bytes | bytearray | memoryview | str):
            return False
        msg, sig = _as_bytes(message), _as_bytes(signature)
        if msg is None or sig is None or len(sig) != SIGNATURE_SIZE:
            return False
        pks: list[bytes] = []
        for public_key in public_keys:
            pk = _as_bytes(public_key)
            if pk is None or len(pk) != PUBLIC_KEY_SIZE:
                return False
            pks.append(pk)
        if not pks:  # milagro and py_ecc both say False; be explicit about it.
            return False
        try:
            return self._raw_fast_aggregate_verify(pks, msg, sig)
        except _BACKEND_FAILURES:
            return False

    def prove_possession(self, secret_key: bytes) -> bytes:
        sk, sk_int = _check_secret_key(secret_key)
        return self._raw_prove_possession(sk, sk_int)

    def verify_possession(self, public_key: bytes, proof: bytes) -> bool:
        pk, sig = _as_bytes(public_key), _as_bytes(proof)
        if pk is None or sig is None:
            return False
        if len(pk) != PUBLIC_KEY_SIZE or len(sig) != SIGNATURE_SIZE:
            return False
        return _verify_possession_cached(self, pk, sig)


@functools.lru_cache(maxsize=4096)
def _verify_possession_cached(backend: _Backend, pk: bytes, proof: bytes) -> bool:
    """PopVerify, remembered: it always runs on py_ecc (~0.4 s) and rosters repeat it for
    the same members every time they are opened. A pure function, so caching is safe."""
    try:
        return backend._raw_verify_possession(pk, proof)
    except _BACKEND_FAILURES:
        return False


class _PyEccBackend(_Backend):
    """The reference: ``py_ecc.bls.G2ProofOfPossession``."""

    name = "py_ecc"

    def _raw_public_key(self, sk: bytes, sk_int: int) -> bytes:
        return bytes(_PopSuite.SkToPk(sk_int))

    def _raw_sign(self, sk: bytes, sk_int: int, message: bytes) -> bytes:
        return bytes(_PopSuite.Sign(sk_int, message))

    def _raw_verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        return bool(_PopSuite.Verify(pk, message, signature))

    def _raw_aggregate(self, signatures: list[bytes]) -> bytes:
        return bytes(_PopSuite.Aggregate(signatures))

    def _raw_fast_aggregate_verify(self, pks: list[bytes], message: bytes, sig: bytes) -> bool:
        return bool(_PopSuite.FastAggregateVerify(pks, message, sig))


class _MilagroBackend(_Backend):
    """``milagro_bls_binding``: same ciphersuite (its DST is the POP one), compiled.

    It wants exactly ``bytes`` and ``list`` (a tuple or bytearray is a TypeError), which the
    checked API guarantees.
    """

    name = "milagro"

    def __init__(self, module: ModuleType) -> None:
        self._m = module

    def _raw_public_key(self, sk: bytes, sk_int: int) -> bytes:
        return bytes(self._m.SkToPk(sk))

    def _raw_sign(self, sk: bytes, sk_int: int, message: bytes) -> bytes:
        return bytes(self._m.Sign(sk, message))

    def _raw_verify(self, pk: bytes, message: bytes, signature: bytes) -> bool:
        return bool(self._m.Verify(pk, message, signature))

    def _raw_aggregate(self, signatures: list[bytes]) -> bytes:
        return bytes(self._m.Aggregate(signatures))

    def _raw_fast_aggregate_verify(self, pks: list[bytes], message: bytes, sig: bytes) -> bool:
        return bool(self._m.FastAggregateVerify(pks, message, sig))

    def self_test(self) -> str | None:
        """None if milagro reproduces the py_ecc known answer, else what went wrong."""
        sk_int = int.from_bytes(_KAT_SECRET_KEY, "big")
        try:
            pk = self._raw_public_key(_KAT_SECRET_KEY, sk_int)
            sig = self._raw_sign(_KAT_SECRET_KEY, sk_int, _KAT_MESSAGE)
            good = self._raw_verify(pk, _KAT_MESSAGE, sig)
            bad = self._raw_verify(pk, _KAT_MESSAGE + b"!", sig)
        except Exception as exc:  # any failure at all means: do not use it
            return f"self-test raised {type(exc).__name__}: {exc}"
        if pk != _KAT_PUBLIC_KEY or sig != _KAT_SIGNATURE:
            return "self-test output differs from py_ecc's"
        if not good or bad:
            return "self-test verification gave the wrong answer"
        return None


def _load_milagro() -> tuple[_MilagroBackend | None, str]:
    """The milagro backend if it imports and passes its self-test, else None and why not."""
    try:
        with warnings.catch_warnings():
            # 1.9 warns on import that it is "deprecated and no longer maintained"; the
            # self-test below is what decides whether it is used.
            warnings.filterwarnings(
                "ignore", "milagro_bls_binding is deprecated", DeprecationWarning
            )
            module = importlib.import_module("milagro_bls_binding")
    except ImportError as exc:
        return None, f"milagro_bls_binding is not importable ({exc})"
    backend = _MilagroBackend(module)
    problem = backend.self_test()
    if problem is not None:
        return None, f"milagro_bls_binding is unusable: {problem}"
    return backend, ""


_PY_ECC: Final[_PyEccBackend] = _PyEccBackend()
_MILAGRO, _MILAGRO_PROBLEM = _load_milagro()


def _choose_backend(requested: str | None) -> _Backend:
    """The backend that ``HRX_BLS_BACKEND=requested`` asks for (None or "" for automatic)."""
    wanted = (requested or "").strip().lower()
    if wanted in ("", "auto"):
        if _MILAGRO is not None:
            return _MILAGRO
        if not _MILAGRO_PROBLEM.startswith("milagro_bls_binding is not importable"):
            # Installed but broken is worth saying; merely absent is the normal slow path.
            warnings.warn(f"{_MILAGRO_PROBLEM}; using py_ecc", RuntimeWarning, stacklevel=2)
        return _PY_ECC
    if wanted == "py_ecc":
        return _PY_ECC
    if wanted == "milagro":
        if _MILAGRO is None:
            raise BLSError(
                f"{ENV_VAR}=milagro but {_MILAGRO_PROBLEM}; install it with "
                "pip install 'hrx[fast-bls]', or unset the variable to use py_ecc"
            )
        return _MILAGRO
    raise BLSError(f"{ENV_VAR} must be 'py_ecc', 'milagro' or 'auto', not {requested!r}")


_ACTIVE: Final[_Backend] = _choose_backend(os.environ.get(ENV_VAR))
BACKEND: Final[str] = _ACTIVE.name
"""The backend in use: "milagro" or "py_ecc"."""


# --- the public API -----------------------------------------------------------------------


def generate_secret_key(seed: bytes | None = None) -> bytes:
    """A new 32-byte secret key: IETF BLS KeyGen (as py_ecc's) of ``seed``.

    ``seed`` is the input keying material, at least 32 bytes; the same seed always gives the
    same key. Without one, 32 bytes from :mod:`secrets` are used.
    """
    if seed is None:
        ikm = secrets.token_bytes(MIN_SEED_SIZE)
    else:
        checked = _as_bytes(seed)
        if checked is None:
            raise BLSError(f"seed must be bytes, not {type(seed).__name__}")
        if len(checked) < MIN_SEED_SIZE:
            raise BLSError(f"seed must be at least {MIN_SEED_SIZE} bytes, got {len(checked)}")
        ikm = checked
    value = int(_PopSuite.KeyGen(ikm))
    return value.to_bytes(SECRET_KEY_SIZE, "big")


def public_key(secret_key: bytes) -> bytes:
    """The 48-byte compressed G1 public key of ``secret_key``."""
    return _ACTIVE.public_key(secret_key)


def sign(secret_key: bytes, message: bytes) -> bytes:
    """The 96-byte signature of ``message`` under ``secret_key``."""
    return _ACTIVE.sign(secret_key, message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``message``. Never raises."""
    return _ACTIVE.verify(public_key, message, signature)


def aggregate(signatures: Sequence[bytes]) -> bytes:
    """The aggregate of one or more signatures (the sum of their G2 points).

    Raises :class:`BLSError` on an empty list or on an entry that is not a 96-byte encoding of
    a point on the curve. As in the IETF draft, subgroup membership is not checked here but
    when the aggregate is verified.
    """
    return _ACTIVE.aggregate(signatures)


def fast_aggregate_verify(public_keys: Sequence[bytes], message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` aggregates signatures of ``message`` by exactly ``public_keys``.

    Sound only for keys whose possession was proven (:func:`verify_possession`). An empty
    key list, like any malformed input, gives False. Never raises.
    """
    return _ACTIVE.fast_aggregate_verify(public_keys, message, signature)


def prove_possession(secret_key: bytes) -> bytes:
    """The proof of possession of ``secret_key``: its signature of its own public key, under
    the ciphersuite's POP tag. Runs on py_ecc whatever the backend (about 0.2 s)."""
    return _ACTIVE.prove_possession(secret_key)


def verify_possession(public_key: bytes, proof: bytes) -> bool:
    """Whether ``proof`` proves possession of ``public_key``'s secret key; also checks that the
    key is a valid, non-infinity subgroup point. Runs on py_ecc (about 0.4 s; results are
    cached). Never raises."""
    return _ACTIVE.verify_possession(public_key, proof)


# --- the secret-key file ------------------------------------------------------------------


def write_secret_key(path: str | os.PathLike[str], secret_key: bytes) -> None:
    """Create ``path`` holding ``secret_key`` as 64 lowercase hex digits and a newline.

    The file is created with mode 0600 (whatever the umask), so it is never readable by
    others, and never overwrites: an existing file is an error.
    """
    sk, _ = _check_secret_key(secret_key)
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, _KEY_FILE_MODE)
    except FileExistsError as exc:
        raise SecretKeyFileError(f"{target}: refusing to overwrite an existing file") from exc
    except OSError as exc:
        raise SecretKeyFileError(f"{target}: cannot create key file: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), _KEY_FILE_MODE)  # the umask may have cleared u+w
            handle.write(sk.hex().encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            target.unlink()
        raise SecretKeyFileError(f"{target}: cannot write key file: {exc.strerror}") from exc
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a new directory entry durable, where the platform allows it."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_secret_key(path: str | os.PathLike[str]) -> bytes:
    """The secret key stored in ``path`` by :func:`write_secret_key`.

    Raises :class:`SecretKeyFileError` (a :class:`BLSError`) when the file is missing,
    unreadable, accessible to group or others (POSIX; like ``ledger.keys``), not 64 hex digits
    (surrounding whitespace is allowed) or not a valid key.
    """
    target = Path(path)
    try:
        with open(target, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read(_KEY_FILE_MAX_READ + 1)
    except FileNotFoundError as exc:
        raise SecretKeyFileError(f"{target}: no such key file") from exc
    except OSError as exc:
        raise SecretKeyFileError(f"{target}: cannot read key file: {exc.strerror}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretKeyFileError(
            f"{target}: key file is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {target}"
        )
    if len(raw) > _KEY_FILE_MAX_READ:
        raise SecretKeyFileError(f"{target}: not a BLS secret key file (too long)")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise SecretKeyFileError(f"{target}: not a BLS secret key file (not ASCII)") from exc
    if not _HEX_KEY.fullmatch(text):
        raise SecretKeyFileError(
            f"{target}: not a BLS secret key file (expected {2 * SECRET_KEY_SIZE} hex digits)"
        )
    sk = bytes.fromhex(text)
    try:
        _check_secret_key(sk)
    except BLSError as exc:
        raise SecretKeyFileError(f"{target}: {exc}") from exc
    return sk


def load_or_create_secret_key(path: str | os.PathLike[str]) -> bytes:
    """The secret key in ``path``; if there is no such file, a new random key written there."""
    target = Path(path)
    if target.exists():
        return read_secret_key(target)
    secret_key = generate_secret_key()
    try:
        write_secret_key(target, secret_key)
    except SecretKeyFileError:
        if target.exists():  # another process created it first: use theirs
            return read_secret_key(target)
        raise
    return secret_key

"""Tests of ledger.bls: the two backends agree byte for byte, verification accepts exactly what
it should on both, and the secret-key file is private, exact and never overwritten.

py_ecc takes ~0.15 s to sign and ~0.4 s to verify, so the expensive values are made once per
module (with the fast backend when there is one) and py_ecc is run only where it is the thing
under test.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from py_ecc.bls.ciphersuites import G2ProofOfPossession

from ledger import bls
from ledger.errors import KeyFileError, LedgerError

PY_ECC = bls._PY_ECC
MILAGRO = bls._MILAGRO
FAST = MILAGRO if MILAGRO is not None else PY_ECC
"""The backend used to make test values that are not themselves under test."""

needs_milagro = pytest.mark.skipif(MILAGRO is None, reason="milagro_bls_binding not importable")

BACKENDS = [
    pytest.param(PY_ECC, id="py_ecc"),
    pytest.param(MILAGRO, id="milagro", marks=needs_milagro),
]

SEEDS = [bytes([i]) * 32 for i in range(1, 6)] + [bytes(range(32)), b"\xff" * 40]
MESSAGES = [b"", b"block 1", b"\x00" * 200, "consent \u2713".encode()]
INFINITY_G1 = b"\xc0" + bytes(47)
INFINITY_G2 = b"\xc0" + bytes(95)

# Known answer, from py_ecc 8.0.0: pins the ciphersuite, whichever backend is in use.
KAT_SEED = bytes(range(32))
KAT_SECRET_KEY = "23360db7e337b0a32b264e06bc11c1b474d16f55665373de1ce93cf15ddb3456"
KAT_PUBLIC_KEY = (
    "9112a0386a2340714ba0c6d2df235377a8679c3899d03e6ef04dba7a50ef49e5"
    "a1dc93105e9374e93ed301b63487e17c"
)
KAT_MESSAGE = b"hrx ledger BLS known-answer test"
KAT_SIGNATURE = (
    "a76acdf66a65135f942b06f0d6ea67806231a2a79913db81d1197b080087b832"
    "83aff7bcf3f50a176768f950e03c51ef11712d064fccfbb29003f07ddf6f8884"
    "b635c33a266cfce1dcac41f79532f8c6faddd29e43872d9a7230e541bcbc5510"
)
KAT_PROOF = (
    "915993b4e43e717ec8079234490be46018bdc7d70e81de1bbec515844a3754cc"
    "0a387ddf825a2faa0984fa794a96b5a20da605161aa42c1d4028abeb3c52ffbf"
    "35d41bd26398e7110d0b6566e0b74b30b3431c4b821cc85a9d61ad5ffd3f9042"
)


def write_private(path: Path, content: bytes) -> None:
    """Put ``content`` in ``path`` as a key file would be: readable by its owner only."""
    path.write_bytes(content)
    path.chmod(0o600)


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 1 << bit
    return bytes(changed)


class Keys:
    """Three signers, their public keys, and signatures of one message, made once."""

    message = b"block header 7"

    def __init__(self) -> None:
        self.secret = [bls.generate_secret_key(seed) for seed in SEEDS[:3]]
        self.public = [FAST.public_key(sk) for sk in self.secret]
        self.sigs = [FAST.sign(sk, self.message) for sk in self.secret]
        self.all3 = FAST.aggregate(self.sigs)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


# --- backend choice -----------------------------------------------------------------------


def test_backend_constant_names_the_active_backend() -> None:
    assert bls.BACKEND in ("milagro", "py_ecc")
    assert bls._ACTIVE.name == bls.BACKEND
    wanted = os.environ.get(bls.ENV_VAR, "").strip().lower()
    if wanted in ("", "auto"):
        wanted = "milagro" if MILAGRO is not None else "py_ecc"
    assert wanted == bls.BACKEND


def test_choose_backend() -> None:
    assert bls._choose_backend("py_ecc") is PY_ECC
    assert bls._choose_backend(" PY_ECC ") is PY_ECC
    automatic = MILAGRO if MILAGRO is not None else PY_ECC
    assert bls._choose_backend(None) is automatic
    assert bls._choose_backend("") is automatic
    assert bls._choose_backend("auto") is automatic
    if MILAGRO is not None:
        assert bls._choose_backend("milagro") is MILAGRO
    else:
        with pytest.raises(bls.BLSError, match="not importable"):
            bls._choose_backend("milagro")
    with pytest.raises(bls.BLSError, match=bls.ENV_VAR):
        bls._choose_backend("blst")


@needs_milagro
def test_milagro_passes_its_self_test() -> None:
    assert MILAGRO is not None
    assert MILAGRO.self_test() is None


def test_errors_belong_to_the_ledger_hierarchy() -> None:
    assert issubclass(bls.BLSError, LedgerError)
    assert issubclass(bls.SecretKeyFileError, bls.BLSError)
    assert issubclass(bls.SecretKeyFileError, KeyFileError)


# --- key generation -----------------------------------------------------------------------


def test_generate_secret_key_is_ietf_keygen() -> None:
    for seed in SEEDS:
        sk = bls.generate_secret_key(seed)
        assert len(sk) == bls.SECRET_KEY_SIZE
        assert int.from_bytes(sk, "big") == G2ProofOfPossession.KeyGen(seed)
        assert 0 < int.from_bytes(sk, "big") < bls.CURVE_ORDER
    assert bls.generate_secret_key(KAT_SEED).hex() == KAT_SECRET_KEY
    assert bls.generate_secret_key(SEEDS[0]) == bls.generate_secret_key(SEEDS[0])


def test_generate_secret_key_without_seed_is_random() -> None:
    first, second = bls.generate_secret_key(), bls.generate_secret_key()
    assert len(first) == len(second) == bls.SECRET_KEY_SIZE
    assert first != second


def test_generate_secret_key_refuses_short_or_non_bytes_seed() -> None:
    with pytest.raises(bls.BLSError, match="at least 32 bytes"):
        bls.generate_secret_key(b"\x01" * 31)
    with pytest.raises(bls.BLSError):
        bls.generate_secret_key("x" * 40)  # type: ignore[arg-type]


# --- the backends agree byte for byte -----------------------------------------------------


def test_known_answer_on_active_backend() -> None:
    sk = bytes.fromhex(KAT_SECRET_KEY)
    assert bls.public_key(sk).hex() == KAT_PUBLIC_KEY
    assert bls.sign(sk, KAT_MESSAGE).hex() == KAT_SIGNATURE


@needs_milagro
def test_public_keys_identical() -> None:
    assert MILAGRO is not None
    for seed in SEEDS:  # py_ecc needs only ~7 ms per public key
        sk = bls.generate_secret_key(seed)
        assert MILAGRO.public_key(sk) == PY_ECC.public_key(sk)
    sk = (bls.CURVE_ORDER - 1).to_bytes(32, "big")  # the largest valid key
    assert MILAGRO.public_key(sk) == PY_ECC.public_key(sk)


@needs_milagro
def test_signatures_identical() -> None:
    assert MILAGRO is not None
    # Three py_ecc signatures (~0.5 s): two keys, three messages including the empty one.
    cases = [(SEEDS[0], MESSAGES[0]), (SEEDS[1], MESSAGES[1]), (SEEDS[5], MESSAGES[3])]
    for seed, message in cases:
        sk = bls.generate_secret_key(seed)
        assert MILAGRO.sign(sk, message) == PY_ECC.sign(sk, message)
    sk = bytes.fromhex(KAT_SECRET_KEY)
    assert MILAGRO.sign(sk, KAT_MESSAGE).hex() == KAT_SIGNATURE


@needs_milagro
def test_aggregates_identical(keys: Keys) -> None:
    assert MILAGRO is not None
    more = [MILAGRO.sign(sk, message) for sk in keys.secret for message in MESSAGES]
    for group in (keys.sigs[:1], keys.sigs[:2], keys.sigs, more, [*more, *keys.sigs]):
        assert MILAGRO.aggregate(group) == PY_ECC.aggregate(group)
    assert MILAGRO.aggregate(keys.sigs) == PY_ECC.aggregate(list(reversed(keys.sigs)))
    for group in ([INFINITY_G2], [keys.sigs[0], INFINITY_G2], [INFINITY_G2, INFINITY_G2]):
        assert MILAGRO.aggregate(group) == PY_ECC.aggregate(group)
    assert PY_ECC.aggregate([INFINITY_G2]) == INFINITY_G2


@needs_milagro
def test_proofs_of_possession_identical() -> None:
    assert MILAGRO is not None
    sk = bytes.fromhex(KAT_SECRET_KEY)
    assert MILAGRO.prove_possession(sk).hex() == KAT_PROOF
    reference = G2ProofOfPossession.PopProve(int(KAT_SECRET_KEY, 16))
    assert PY_ECC.prove_possession(sk) == reference == bytes.fromhex(KAT_PROOF)


# --- verification -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_accepts_good_and_rejects_wrong(backend: bls._Backend, keys: Keys) -> None:
    pk, sig, message = keys.public[0], keys.sigs[0], keys.message
    assert backend.verify(pk, message, sig)
    assert not backend.verify(pk, message + b"!", sig)  # wrong message
    assert not backend.verify(keys.public[1], message, sig)  # wrong key
    # Flipped bits: the last byte (usually no longer on the curve) and the sign flag.
    assert not backend.verify(pk, message, flip_bit(sig, 95))
    assert not backend.verify(pk, message, flip_bit(sig, 0, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_rejects_malformed_without_raising(backend: bls._Backend, keys: Keys) -> None:
    pk, sig, message = keys.public[0], keys.sigs[0], keys.message
    bad_lengths = [
        (pk[:-1], sig),
        (pk + b"\x00", sig),
        (pk, sig[:-1]),
        (pk, sig + b"\x00"),
        (b"", sig),
        (pk, b""),
    ]
    for bad_pk, bad_sig in bad_lengths:
        assert not backend.verify(bad_pk, message, bad_sig)
    assert not backend.verify(INFINITY_G1, message, INFINITY_G2)
    assert not backend.verify(INFINITY_G1, message, sig)
    assert not backend.verify(b"\xff" * 48, message, sig)
    assert not backend.verify(pk, message, b"\xff" * 96)
    assert not backend.verify(pk, message, bytes(96))
    assert not backend.verify(flip_bit(pk, 0, 7), message, sig)  # compression flag cleared
    assert not backend.verify(pk, "text", sig)  # type: ignore[arg-type]
    assert not backend.verify(None, message, sig)  # type: ignore[arg-type]


@needs_milagro
def test_milagro_accepts_bytes_like_input(keys: Keys) -> None:
    # milagro itself raises TypeError on bytearray; the wrapper normalises.
    assert MILAGRO is not None
    pk, sig, message = keys.public[0], keys.sigs[0], keys.message
    assert MILAGRO.verify(bytearray(pk), memoryview(message), bytearray(sig))  # type: ignore[arg-type]
    assert MILAGRO.sign(bytearray(keys.secret[0]), bytearray(message)) == sig  # type: ignore[arg-type]
    assert MILAGRO.fast_aggregate_verify(tuple(keys.public), message, keys.all3)
    assert MILAGRO.aggregate(tuple(keys.sigs)) == keys.all3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_aggregate_verify(backend: bls._Backend, keys: Keys) -> None:
    message = keys.message
    assert backend.fast_aggregate_verify(keys.public, message, keys.all3)
    # A subset of the signers does not verify against the aggregate of all three.
    assert not backend.fast_aggregate_verify(keys.public[:2], message, keys.all3)


@needs_milagro
def test_fast_aggregate_verify_subset_and_more_on_milagro(keys: Keys) -> None:
    assert MILAGRO is not None
    message = keys.message
    two = MILAGRO.aggregate(keys.sigs[:2])
    assert MILAGRO.fast_aggregate_verify(keys.public[:2], message, two)
    assert not MILAGRO.fast_aggregate_verify(keys.public, message, two)
    assert not MILAGRO.fast_aggregate_verify(keys.public[:2], message + b"!", two)
    assert not MILAGRO.fast_aggregate_verify([keys.public[0], keys.public[2]], message, two)
    one = keys.sigs[0]
    assert MILAGRO.fast_aggregate_verify(keys.public[:1], message, one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_aggregate_verify_rejects_malformed(backend: bls._Backend, keys: Keys) -> None:
    # All rejected before any pairing, so cheap on py_ecc too.
    message, agg = keys.message, keys.all3
    assert not backend.fast_aggregate_verify([], message, agg)
    assert not backend.fast_aggregate_verify([], message, INFINITY_G2)
    assert not backend.fast_aggregate_verify([*keys.public, INFINITY_G1], message, agg)
    assert not backend.fast_aggregate_verify([keys.public[0][:-1]], message, agg)
    assert not backend.fast_aggregate_verify(keys.public, message, agg[:-1])
    assert not backend.fast_aggregate_verify(keys.public[0], message, agg)  # type: ignore[arg-type]
    assert not backend.fast_aggregate_verify([b"\xff" * 48], message, agg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregate_refuses_bad_input(backend: bls._Backend, keys: Keys) -> None:
    with pytest.raises(bls.BLSError, match="empty"):
        backend.aggregate([])
    with pytest.raises(bls.BLSError, match="not 96 bytes"):
        backend.aggregate([keys.sigs[0], keys.sigs[1][:-1]])
    with pytest.raises(bls.BLSError, match="not a valid G2 point"):
        backend.aggregate([keys.sigs[0], b"\xff" * 96])
    with pytest.raises(bls.BLSError):
        backend.aggregate(keys.sigs[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_secret_key_raises(backend: bls._Backend) -> None:
    bad_keys: list[object] = [
        b"",
        b"\x01" * 31,
        b"\x01" * 33,
        bytes(32),  # zero
        bls.CURVE_ORDER.to_bytes(32, "big"),
        (bls.CURVE_ORDER + 1).to_bytes(32, "big"),
        b"\xff" * 32,
        "01" * 32,
        12345,
    ]
    for bad in bad_keys:
        with pytest.raises(bls.BLSError):
            backend.public_key(bad)  # type: ignore[arg-type]
        with pytest.raises(bls.BLSError):
            backend.sign(bad, b"m")  # type: ignore[arg-type]
        with pytest.raises(bls.BLSError):
            backend.prove_possession(bad)  # type: ignore[arg-type]
    with pytest.raises(bls.BLSError, match="message"):
        backend.sign(bls.generate_secret_key(SEEDS[0]), "text")  # type: ignore[arg-type]


# --- proofs of possession -----------------------------------------------------------------


@pytest.fixture(scope="module")
def proofs(keys: Keys) -> list[bytes]:
    return [bls.prove_possession(sk) for sk in keys.secret[:2]]


def test_proof_of_possession(keys: Keys, proofs: list[bytes]) -> None:
    # PoP runs on py_ecc whatever the backend (milagro has no POP domain tag): ~0.4 s each.
    assert bls.verify_possession(keys.public[0], proofs[0])
    assert not bls.verify_possession(keys.public[1], proofs[0])  # one key's proof, another key
    assert proofs[0] != proofs[1]
    # A proof of possession is not a signature of the public key under the signing tag...
    assert proofs[0] != FAST.sign(keys.secret[0], keys.public[0])


def test_proof_of_possession_rejects_malformed(keys: Keys, proofs: list[bytes]) -> None:
    pk, proof = keys.public[0], proofs[0]
    assert not bls.verify_possession(pk[:-1], proof)
    assert not bls.verify_possession(pk, proof[:-1])
    assert not bls.verify_possession(INFINITY_G1, INFINITY_G2)
    assert not bls.verify_possession(pk, flip_bit(proof, 95))
    assert not bls.verify_possession(b"\xff" * 48, proof)
    assert not bls.verify_possession(pk, None)  # type: ignore[arg-type]


# --- public wrappers ----------------------------------------------------------------------


def test_module_functions_use_the_active_backend(keys: Keys) -> None:
    sk, message = keys.secret[0], keys.message
    assert bls.public_key(sk) == keys.public[0]
    assert bls.sign(sk, message) == keys.sigs[0]
    assert bls.verify(keys.public[0], message, keys.sigs[0])
    assert bls.aggregate(keys.sigs) == keys.all3
    assert bls.fast_aggregate_verify(keys.public, message, keys.all3)
    assert not bls.verify(keys.public[0], message, keys.sigs[1][:10])


# --- the secret-key file ------------------------------------------------------------------


@pytest.fixture
def zero_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("zero_umask")
def test_key_file_is_private_even_with_zero_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    bls.write_secret_key(path, bls.generate_secret_key(SEEDS[0]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    sk = bls.generate_secret_key(SEEDS[1])
    bls.write_secret_key(path, sk)
    assert path.read_bytes() == sk.hex().encode() + b"\n"
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bls.read_secret_key(path) == sk
    assert bls.read_secret_key(str(path)) == sk


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = bls.generate_secret_key(SEEDS[0])
    bls.write_secret_key(path, first)
    with pytest.raises(bls.BLSError, match="refusing to overwrite"):
        bls.write_secret_key(path, bls.generate_secret_key(SEEDS[1]))
    assert bls.read_secret_key(path) == first


def test_write_refuses_bad_key_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    with pytest.raises(bls.BLSError):
        bls.write_secret_key(path, bytes(32))
    assert not path.exists()
    with pytest.raises(bls.SecretKeyFileError, match="cannot create"):
        bls.write_secret_key(path.parent / "missing-dir" / "k", bls.generate_secret_key())


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"zz" * 32 + b"\n",
        b"ab" * 31 + b"\n",
        b"ab" * 33 + b"\n",
        b"ab " * 32 + b"\n",
        b"0x" + b"ab" * 31 + b"\n",
        b"00" * 32 + b"\n",  # zero is not a key
        b"ff" * 32 + b"\n",  # >= r
        b"\xff\xfe" * 32,
        b"a" * 5000,
    ],
    ids=[
        "empty",
        "newline",
        "not-hex",
        "short",
        "long",
        "spaced",
        "0x",
        "zero",
        "too-big",
        "binary",
        "huge",
    ],
)
def test_reading_corrupt_key_file_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    write_private(path, content)
    with pytest.raises(bls.BLSError, match=r"node\.key: not a BLS secret key file|range"):
        bls.read_secret_key(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o700 | 0o001])
def test_reading_key_file_others_may_access_raises(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    bls.write_secret_key(path, bls.generate_secret_key(SEEDS[0]))
    path.chmod(mode)
    with pytest.raises(bls.SecretKeyFileError, match="chmod 600"):
        bls.read_secret_key(path)
    path.chmod(0o400)  # owner-only, even read-only, is fine
    assert bls.read_secret_key(path) == bls.generate_secret_key(SEEDS[0])


def test_reading_tolerates_whitespace_and_case(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    sk = bls.generate_secret_key(SEEDS[2])
    write_private(path, b"  " + sk.hex().upper().encode() + b"\r\n")
    assert bls.read_secret_key(path) == sk


def test_reading_missing_key_file_raises(tmp_path: Path) -> None:
    with pytest.raises(bls.SecretKeyFileError, match="no such key file"):
        bls.read_secret_key(tmp_path / "absent.key")


def test_load_or_create_secret_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    created = bls.load_or_create_secret_key(path)
    assert path.exists()
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bls.load_or_create_secret_key(path) == created
    assert bls.read_secret_key(path) == created
    path.unlink()
    write_private(path, b"not a key\n")
    with pytest.raises(bls.BLSError, match="not a BLS secret key file"):
        bls.load_or_create_secret_key(path)


def test_importing_bls_leaves_the_recursion_limit_alone() -> None:
    """py_ecc raises the process's recursion limit to 100000 when imported; a node parsing a
    deeply nested JSON body at that limit overflows a thread's C stack and dies."""
    import subprocess
    import sys

    code = "import sys; before = sys.getrecursionlimit(); import ledger.bls; "
    code += "print(before, sys.getrecursionlimit())"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    before, after = answer.stdout.split()
    assert before == after, answer.stderr

"""The offline auditor's ledger verification: everything docs/spec.md §8 lets a third party check,
from an export file or straight from a node's database, streamed in bounded memory.

Checked, in order of reading: each roster's form, its authority signature (when the auditor
gives the authority key, the trust anchor) and every member's BLS proof of possession; then
for every block of every chain: the header's form, that its chain is a member of the roster
version it names, its Ed25519 signature by that member's key, height and ``prev`` links,
``seq`` continuity, every entry's form, that block times never go backwards and no entry is
later than its block, and the block's ``tree_root`` against the RFC 9162 tree recomputed from
all the chain's entries so far.
Because each root is recomputed over the same growing sequence of leaves, every pair of
consecutive heads is consistent by construction; a signed head whose root differs fails here.

Read from a database, the rows themselves are checked too: stored bytes are canonical, row
keys agree with the JSON they hold, the stored Merkle subtree hashes are the recomputed ones,
and no entry row lies outside a block. The first fault stops verification and is reported as a
:class:`~ledger.errors.VerificationError` naming chain, height and seq.
"""

from __future__ import annotations

import gc
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import keys, merkle
from ledger.canonical import (
    canonical_bytes,
    canonical_many,
    canonical_of_parsed,
    check_unique_keys,
    parse_canonical,
    parse_canonical_many,
    parse_json,
)
from ledger.checkpoint import verify_certificate
from ledger.errors import LedgerError, VerificationError
from ledger.model import (
    ENTRY_KEYS,
    ENTRY_TYPE,
    VERSION,
    ZERO_HASH,
    block_bytes,
    block_hash,
    check_block_shape,
    check_header,
    parse_time,
)
from ledger.resolution import open_resolution, resolves
from ledger.roster import Roster, open_roster
from ledger.store import ChainStore

try:  # compiled where the build could (setup.py); else the pure-Python path decides alone
    from ledger import _speedups
except ImportError:  # pragma: no cover - a build without a C compiler
    _speedups = None  # type: ignore[assignment]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsed JSON holds no cycles, and collections
    triggered by its many small objects would take most of the verification time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_LEAF_PART = operator.itemgetter(slice(0, 32))
_ENTRY_COLUMNS = operator.itemgetter("seq", "chain", "v", "type", "time", "body")

Progress = Callable[[int], None]
"""Called with the number of entries just verified."""


@dataclass
class ChainSummary:
    blocks: int = 0
    entries: int = 0
    height: int = -1
    head_hash: str = ZERO_HASH
    tree_root: str = merkle.EMPTY_ROOT.hex()
    time: str = ""
    roster: int = 0


EMERGENCY = "emergency.access"


@dataclass(frozen=True)
class Emergency:
    """One ``emergency.access`` entry: who broke the glass, on which chain, when."""

    chain: str
    seq: int
    time: str
    requester: str


@dataclass
class Summary:
    """What a successful verification covered."""

    rosters: list[int] = field(default_factory=list)
    anchored: bool = False
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    certificates: list[int] = field(default_factory=list)  # epochs verified
    # epochs of the certificates given from elsewhere, which the copy was held to
    given: list[int] = field(default_factory=list)
    # chain -> (epoch, height) of the newest certificate covering it
    covered: dict[str, tuple[int, int]] = field(default_factory=dict)
    forks: list[str] = field(default_factory=list)  # proven by valid evidence
    resolved: list[str] = field(default_factory=list)  # forks the authority's resolution settles
    # break-glass accesses (docs/spec.md §14.3, emergency.access), always shown to the auditor
    emergencies: list[Emergency] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return sum(c.blocks for c in self.chains.values())

    @property
    def entries(self) -> int:
        return sum(c.entries for c in self.chains.values())


@dataclass
class _ChainState:
    summary: ChainSummary
    frontier: merkle.Frontier = field(default_factory=merkle.Frontier)
    hashes: list[bytes] = field(default_factory=list)  # block hash at each height


class Verifier:
    """Feed rosters, then blocks (chains in any interleaving, each in height order)."""

    def __init__(
        self,
        authority: Ed25519PublicKey | None,
        *,
        watch: frozenset[str] = frozenset(),
        observe: Callable[[dict[str, Any]], None] | None = None,
        resolutions: Sequence[Any] = (),
    ) -> None:
        """``observe`` is given every entry whose type is in ``watch``, once its block's
        entries are checked (for audits built on top: the replay of access decisions).
        ``resolutions``: the authority's signed resolutions of forks (:mod:`ledger.resolution`),
        checked against ``authority``; a fork one of them settles is reported as resolved."""
        self.authority = authority
        self._watch = watch if observe is not None else frozenset()
        self._observe = observe
        self.rosters: dict[int, Roster] = {}
        self.summary = Summary(anchored=authority is not None)
        self._chains: dict[str, _ChainState] = {}
        self._keys: dict[tuple[int, str], Ed25519PublicKey] = {}
        self._valid_times: set[str] = set()  # entry times already found valid
        self._entry_types: set[str] = set()
        self._block_types: set[str] = set()  # the entry types of the block being verified
        if resolutions and authority is None:
            raise VerificationError("a resolution is checked against the authority's key: give it")
        self._resolutions = [
            open_resolution(document, authority) for document in resolutions if authority
        ]

    def add_roster(self, roster: Any, signature: Any, *, check_possession: bool = True) -> None:
        """Take the next roster version. ``check_possession=False`` skips its members' BLS
        proofs of possession (about 0.25 s each): only for rosters that were checked when they
        were stored, as a node's own replicas were when it installed them."""
        version = roster.get("version") if isinstance(roster, dict) else None
        try:
            opened = open_roster(
                roster, signature, self.authority, check_possession=check_possession
            )
        except LedgerError as exc:
            raise VerificationError(f"roster version {version}: {exc}") from exc
        if self.rosters and opened.version <= max(self.rosters):
            raise VerificationError(
                f"roster version {opened.version} does not follow version {max(self.rosters)}"
            )
        if self._chains:
            raise VerificationError(f"roster version {opened.version} comes after blocks")
        self.rosters[opened.version] = opened
        self.summary.rosters.append(opened.version)

    def finish(self) -> Summary:
        """The summary, with a warning for every chain whose newest block is signed with a key
        that a later roster version replaced or removed: until checkpoints certify heads,
        blocks signed with a revoked key cannot be told from the chain's real ones."""
        newest = self.rosters[max(self.rosters)]
        for chain, summary in self.summary.chains.items():
            if summary.roster == newest.version:
                continue
            old_key = self.rosters[summary.roster].member(chain)["ed25519"]
            listed = {m["id"]: m["ed25519"] for m in newest.body["members"]}
            if listed.get(chain) != old_key:
                self.summary.warnings.append(
                    f"chain {chain}: its newest block is signed under roster version "
                    f"{summary.roster}, and roster version {newest.version} "
                    + ("no longer lists it" if chain not in listed else "gives it another key")
                )
        return self.summary

    def add_certificate(self, certificate: Any, *, given: bool = False) -> None:
        """A checkpoint certificate: its quorum signature under the (anchored) roster it
        names, and every head it certifies against the chains verified so far. ``given``: a
        certificate obtained elsewhere than from the ledger being verified, which holds the
        copy to everything it certifies (a copy cannot prove its own tail)."""
        try:
            checkpoint = verify_certificate(certificate, self.rosters)
        except LedgerError as exc:
            raise VerificationError(f"certificate: {exc}") from exc
        epoch = checkpoint["epoch"]
        for chain, head in checkpoint["heads"].items():
            state = self._chains.get(chain)
            height = head["height"]
            if state is None or height >= len(state.hashes):
                ends = f"ends at height {len(state.hashes) - 1}" if state else "does not hold it"
                raise VerificationError(
                    f"certificate of epoch {epoch} certifies height {height}, but this copy "
                    f"{ends}: blocks the consortium certified are missing from it (cut off, or "
                    "the copy is older than the certificate)",
                    chain=chain,
                )
            if state.hashes[height].hex() != head["hash"]:
                raise VerificationError(
                    f"certificate of epoch {epoch} certifies another block at height {height}: "
                    "a fork the quorum signed",
                    chain=chain,
                    height=height,
                )
            if chain not in self.summary.covered or self.summary.covered[chain][0] < epoch:
                self.summary.covered[chain] = (epoch, height)
        (self.summary.given if given else self.summary.certificates).append(epoch)

    def add_evidence(self, evidence: Any) -> None:
        """Fork evidence: valid only as two headers of one chain and height, with different
        hashes, each signed by the key the roster gives that chain."""
        try:
            headers = evidence["headers"]
            if not isinstance(headers, list) or len(headers) != 2:
                raise VerificationError("fork evidence holds two signed headers")
            hashes = set()
            for signed in headers:
                header = signed["header"]
                check_header(header)
                key = self._member_key(header["roster"], header["chain"], header["height"])
                keys.verify(key, keys.BLOCK_DOMAIN, block_hash(header), signed["signature"])
                hashes.add(block_hash(header))
            first, second = (h["header"] for h in headers)
        except (LedgerError, KeyError, TypeError) as exc:
            raise VerificationError(f"fork evidence does not hold: {exc}") from None
        if (first["chain"], first["height"]) != (second["chain"], second["height"]) or len(
            hashes
        ) != 2:
            raise VerificationError("fork evidence: not two different blocks of one height")
        fork = f"chain {first['chain']} signed two different blocks at height {first['height']}"
        kept = [r["keep"] for r in self._resolutions if resolves(r, evidence)]
        if kept:
            self.summary.resolved.append(f"{fork}; the authority's resolution keeps {kept[0]}")
        else:
            self.summary.forks.append(fork)

    def for_chains(self, observe: Callable[[dict[str, Any]], None] | None) -> Verifier:
        """A verifier of further chains under this one's rosters (shared, not copied), giving
        the entries this one watches to ``observe``: what each process of a parallel
        verification verifies its chains with (:mod:`ledger.verify_parallel`)."""
        other = Verifier(self.authority, watch=self._watch, observe=observe)
        other.rosters = self.rosters
        other.summary.rosters = self.summary.rosters
        return other

    def chain_states(self) -> dict[str, _ChainState]:
        """Every chain verified so far, to be handed to another verifier (:meth:`adopt`)."""
        return self._chains

    def adopt(
        self, chains: Iterable[tuple[str, _ChainState]], emergencies: list[Emergency]
    ) -> None:
        """Take chains that another verifier under the same rosters verified
        (:meth:`chain_states`), none of them verified here, and their break-glass entries, as
        if they had been verified here, in the order given."""
        for chain, state in chains:
            self._chains[chain] = state
            self.summary.chains[chain] = state.summary
        self.summary.emergencies.extend(emergencies)

    def resume(self, header: dict[str, Any], frontier: merkle.Frontier) -> None:
        """Continue a chain from a block already verified and stored (replication checks only
        what comes after the local head): its header, and the tree's right edge after it."""
        chain = header["chain"]
        summary = ChainSummary(
            height=header["height"],
            head_hash=block_hash(header).hex(),
            tree_root=header["tree_root"],
            time=header["time"],
            roster=header["roster"],
        )
        self._chains[chain] = _ChainState(summary, frontier)
        self.summary.chains[chain] = summary

    def _member_key(self, version: int, chain: str, height: int) -> Ed25519PublicKey:
        cached = self._keys.get((version, chain))
        if cached is not None:
            return cached
        roster = self.rosters.get(version)
        if roster is None:
            raise VerificationError(
                f"names roster version {version}, which is not given", chain=chain, height=height
            )
        try:
            key = roster.ed25519_key(chain)
        except LedgerError as exc:
            raise VerificationError(str(exc), chain=chain, height=height) from exc
        self._keys[(version, chain)] = key
        return key

    def _note_emergency(self, chain: str, seq: int, entry: dict[str, Any]) -> None:
        requester = entry["body"].get("requester_org")
        self.summary.emergencies.append(
            Emergency(chain, seq, entry["time"], requester if isinstance(requester, str) else "?")
        )

    def add_block(
        self,
        header: Any,
        signature: Any,
        entries: list[Any] | None = None,
        *,
        stored: list[bytes] | None = None,
        stored_nodes: list[bytes] | None = None,
        columns: _speedups.Columns | None = None,
    ) -> list[bytes]:
        """Verify one block: its header, signature, and its entries given either parsed
        (``entries``, from an export) or as their canonical bytes (``stored``: from a
        database, with the Merkle subtree hashes stored beside them in ``stored_nodes``, or
        cut from an export line that is canonical itself; ``columns``: then their fields as
        ``_speedups.split_block`` read them).

        Returns the entries' leaf data (their canonical bytes).
        """
        if not self.rosters:
            raise VerificationError("a block comes before any roster")
        chain = header.get("chain") if isinstance(header, dict) else None
        height = header.get("height") if isinstance(header, dict) else None
        where: dict[str, Any] = {
            "chain": chain if isinstance(chain, str) else None,
            "height": height if type(height) is int else None,
        }
        try:
            check_header(header)
        except LedgerError as exc:
            raise VerificationError(f"malformed header: {exc}", **where) from exc
        chain = header["chain"]
        state = self._chains.get(chain)
        if state is None:
            state = self._chains[chain] = _ChainState(ChainSummary())
            self.summary.chains[chain] = state.summary
        summary = state.summary
        if height != summary.height + 1:
            raise VerificationError(f"expected height {summary.height + 1}", **where)
        if header["prev"] != summary.head_hash:
            raise VerificationError(
                f"prev {header['prev']} is not the hash {summary.head_hash} of the block before",
                **where,
            )
        if header["roster"] < summary.roster:
            raise VerificationError(
                f"roster version {header['roster']} goes back from {summary.roster}", **where
            )
        digest = block_hash(header)
        key = self._member_key(header["roster"], chain, height)
        try:
            keys.verify(key, keys.BLOCK_DOMAIN, digest, signature)
        except LedgerError as exc:
            raise VerificationError(f"block signature: {exc}", **where) from exc
        if header["time"] < summary.time:
            raise VerificationError(
                f"block time {header['time']} is before the previous block's {summary.time}",
                **where,
            )
        frontier, block_time, first_seq = state.frontier, header["time"], header["first_seq"]
        if first_seq != frontier.size:
            raise VerificationError(f"first_seq {first_seq} should be {frontier.size}", **where)
        count = len(entries if entries is not None else stored or ())
        if count != header["count"]:
            raise VerificationError(
                f"the block holds {count} entries, its header says {header['count']}", **where
            )

        # The whole block at once when nothing is amiss, else entry by entry to name the fault.
        datas: list[bytes] | None
        parsed: list[Any] | None
        plain: bool
        if stored is None:
            parsed = entries
            bodies = self._plain_bodies(entries or [], chain, first_seq, block_time)
            datas = None if bodies is None else canonical_many(entries or [], floats_in=bodies)
            plain = bodies is not None and datas is not None
        elif columns is not None or (
            _speedups is not None and (columns := _speedups.entry_columns(stored)) is not None
        ):
            datas, parsed = stored, None  # canonical entries, their bodies never built
            plain = self._plain_columns(*columns, chain, first_seq, block_time)
        else:
            datas = stored
            parsed = parse_canonical_many(stored)
            plain = (
                parsed is not None
                and self._plain_bodies(parsed, chain, first_seq, block_time) is not None
            )
        if not plain or datas is None:
            datas = self._entry_by_entry(entries, stored, chain, first_seq, block_time, where)
            self._block_types = {parse_canonical(data)["type"] for data in datas}
            parsed = None
        if EMERGENCY in self._block_types or self._watch & self._block_types:
            for offset, data in enumerate(datas):
                entry = parsed[offset] if parsed is not None else parse_canonical(data)
                if entry["type"] == EMERGENCY:
                    self._note_emergency(chain, first_seq + offset, entry)
                if entry["type"] in self._watch and self._observe is not None:
                    self._observe(entry)
        leaves = merkle.leaf_hashes(datas)
        before = frontier.copy() if stored_nodes is not None else None
        completed = frontier.extend(leaves)
        if before is not None and not _stored_nodes_match(
            stored_nodes or [], first_seq, leaves, completed
        ):
            _name_stored_node_fault(before, leaves, stored_nodes or [], first_seq, where)
        if frontier.root().hex() != header["tree_root"]:
            raise VerificationError(
                f"tree_root {header['tree_root']} is not the root {frontier.root().hex()} "
                f"of entries 0..{frontier.size - 1}",
                **where,
            )
        if len(state.hashes) == height:
            state.hashes.append(digest)
        summary.blocks += 1
        summary.entries += count
        summary.height = height
        summary.head_hash = digest.hex()
        summary.tree_root = header["tree_root"]
        summary.time = block_time
        summary.roster = header["roster"]
        return datas

    def _entry_by_entry(
        self,
        entries: list[Any] | None,
        stored: list[bytes] | None,
        chain: str,
        first_seq: int,
        block_time: str,
        where: dict[str, Any],
    ) -> list[bytes]:
        """Every check of :meth:`add_block` on one entry after another, so that the first
        fault in seq order is the one named; returns the leaf data."""
        datas = []
        for offset in range(len(stored if stored is not None else entries or ())):
            seq = first_seq + offset
            try:
                if stored is not None:
                    data = stored[offset]
                    entry = parse_canonical(data, "entry")
                else:
                    entry = entries[offset]  # type: ignore[index]
                    data = canonical_of_parsed(entry, "entry")
            except LedgerError as exc:
                raise VerificationError(str(exc), seq=seq, **where) from exc
            self._check_entry(entry, chain, seq, block_time, where)
            datas.append(data)
        return datas

    def _plain_bodies(
        self, entries: list[Any], chain: str, first_seq: int, block_time: str
    ) -> list[dict[str, Any]] | None:
        """The entries' bodies when every entry passes :meth:`_check_entry`, decided column by
        column with no Python code per entry; None means "check each", not "invalid"."""
        try:
            if set(map(type, entries)) != {dict} or set(map(len, entries)) != {len(ENTRY_KEYS)}:
                return None
            # Six keys, each present: exactly ENTRY_KEYS (a missing one is a KeyError).
            seqs, chains, versions, types, times, bodies = zip(
                *map(_ENTRY_COLUMNS, entries), strict=True
            )
        except (KeyError, TypeError, ValueError):
            return None
        if set(map(type, bodies)) != {dict} or not self._plain_columns(
            seqs, chains, versions, types, times, chain, first_seq, block_time
        ):
            return None
        return list(bodies)

    def _plain_columns(
        self,
        seqs: Sequence[Any],
        chains: Sequence[Any],
        versions: Sequence[Any],
        types: Sequence[Any],
        times: Sequence[Any],
        chain: str,
        first_seq: int,
        block_time: str,
    ) -> bool:
        """Whether a block's entry fields, column by column, pass every check of
        :meth:`_check_entry` but the shape of the entries themselves; False means "check each",
        not "invalid"."""
        try:
            block_types, block_times = set(types), set(times)  # (only a str equals a str)
            if (
                tuple(seqs) != tuple(range(first_seq, first_seq + len(seqs)))
                or set(map(type, seqs)) != {int}
                or set(chains) != {chain}
                or set(map(type, versions)) != {int}
                or set(versions) != {VERSION}
                or set(map(type, block_types)) != {str}
                or set(map(type, block_times)) != {str}
                or max(block_times) > block_time
            ):
                return False
            self._block_types = block_types
            for entry_type in block_types - self._entry_types:
                if not ENTRY_TYPE.fullmatch(entry_type):
                    return False
                self._entry_types.add(entry_type)
            for time in block_times - self._valid_times:
                parse_time(time)
            self._valid_times = block_times
        except (TypeError, ValueError, LedgerError):
            return False
        return True

    def _check_entry(
        self, entry: Any, chain: str, seq: int, block_time: str, where: dict[str, Any]
    ) -> None:
        if type(entry) is not dict or entry.keys() != ENTRY_KEYS:
            fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise VerificationError(f"malformed entry: fields {fields}", seq=seq, **where)
        if entry["seq"] != seq or type(entry["seq"]) is not int:
            raise VerificationError(
                f"entry says seq {entry['seq']!r} where seq {seq} belongs", seq=seq, **where
            )
        if entry["chain"] != chain:
            raise VerificationError(f"entry says chain {entry['chain']!r}", seq=seq, **where)
        if entry["v"] != VERSION or type(entry["v"]) is not int:
            raise VerificationError(f"entry version {entry['v']!r}", seq=seq, **where)
        entry_type = entry["type"]
        if type(entry_type) is not str or entry_type not in self._entry_types:
            if type(entry_type) is not str or not ENTRY_TYPE.fullmatch(entry_type):
                raise VerificationError(
                    f"entry type {entry_type!r} is not dotted lowercase words", seq=seq, **where
                )
            self._entry_types.add(entry_type)
        if type(entry["body"]) is not dict:
            raise VerificationError("entry body is not a JSON object", seq=seq, **where)
        time = entry["time"]
        if type(time) is not str or time not in self._valid_times:  # batches share a time
            try:
                parse_time(time, "entry time")
            except LedgerError as exc:
                raise VerificationError(str(exc), seq=seq, **where) from exc
            self._valid_times.add(time)
        if time > block_time:
            raise VerificationError(
                f"entry time {time} is after its block's time {block_time}", seq=seq, **where
            )


def _stored_nodes_match(
    stored: list[bytes],
    first_seq: int,
    leaves: list[bytes],
    completed: dict[int, tuple[int, list[bytes]]],
) -> bool:
    """Whether each entry row of a block stores exactly the subtree hashes its append
    completed (leaf ``s`` completes levels 0..t, t the trailing 1-bits of ``s``), compared a
    level at a time."""
    seqs = range(first_seq, first_seq + len(stored))
    if list(map(len, stored)) != [32 * (s ^ (s + 1)).bit_length() for s in seqs]:
        return False
    if list(map(_LEAF_PART, stored)) != leaves:
        return False
    for level, (first, hashes) in completed.items():
        step = 1 << level
        start = ((first + 1) << level) - 1 - first_seq  # the row of the leaf completing it
        part = slice(32 * level, 32 * (level + 1))
        if [row[part] for row in stored[start::step]] != hashes:
            return False
    return True


def _name_stored_node_fault(
    frontier: merkle.Frontier,
    leaves: list[bytes],
    stored: list[bytes],
    first_seq: int,
    where: dict[str, Any],
) -> None:
    """Replay a block whose stored subtree hashes are wrong one leaf at a time, and name the
    first entry row that is."""
    for offset, leaf in enumerate(leaves):
        if b"".join(frontier.append(leaf)) != stored[offset]:
            what = (
                "stored Merkle subtree hashes differ from the recomputed ones"
                if stored[offset][:32] == leaf
                else "the entry's bytes do not hash to the leaf hash stored with it"
            )
            raise VerificationError(what, seq=first_seq + offset, **where)
    raise VerificationError("stored Merkle subtree hashes differ from the recomputed ones", **where)


def verify_export(
    path: Path,
    authority: Ed25519PublicKey | None,
    progress: Progress | None = None,
    *,
    given: Sequence[Any] = (),
    **watching: Any,
) -> Summary:
    """Verify an export file (JSON Lines: rosters, then blocks), line by line; ``given``:
    certificates obtained elsewhere, which the export must hold everything of; ``watching``:
    the ``watch`` and ``observe`` of :class:`Verifier`."""
    verifier = Verifier(authority, **watching)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise VerificationError(f"cannot read {path}: {exc.strerror}") from exc
    with handle, _collector_paused():
        _verify_lines(verifier, path, handle, progress)
    if not verifier.rosters:
        raise VerificationError(f"{path} holds no roster")
    _hold_to(verifier, given)
    return verifier.finish()


def _hold_to(verifier: Verifier, given: Sequence[Any]) -> None:
    for number, certificate in enumerate(given, start=1):
        try:
            verifier.add_certificate(certificate, given=True)
        except VerificationError as exc:
            raise VerificationError(f"given checkpoint {number}: {exc}") from exc


def _verify_lines(
    verifier: Verifier, path: Path, handle: Iterable[bytes], progress: Progress | None
) -> None:
    for number, line in enumerate(handle, start=1):
        verify_line(verifier, path, number, line, progress)


class Misrouted(Exception):
    """A block line whose header names another chain than the one it was routed to by its
    text (:func:`verify_line`'s ``chain``): only a line spelled unlike hrx writes it can be."""

    def __init__(self, number: int) -> None:
        super().__init__(f"line {number} holds a block of another chain than its text showed")
        self.number = number


def verify_line(
    verifier: Verifier,
    path: Path,
    number: int,
    line: bytes,
    progress: Progress | None,
    chain: str | None = None,
) -> None:
    """Verify line ``number`` of an export. ``chain``: the chain a parallel verification
    routed the line to (:mod:`ledger.verify_parallel`); a block whose header names another
    raises :class:`Misrouted` before it is verified."""
    text = line.strip()
    if not text:
        return
    if _speedups is not None and text.startswith(b'{"entries":['):
        # A canonical block line, as hrx writes them: its entries' bytes are cut from it.
        split = _speedups.split_block(text)
        if split is not None:
            datas, columns, header_text, signature_text = split
            header = parse_json(header_text)
            if chain is not None and header.get("chain") != chain:
                raise Misrouted(number)
            verifier.add_block(header, parse_json(signature_text), stored=datas, columns=columns)
            if progress:
                progress(len(datas))
            return
    try:
        record = parse_json(line)
        if isinstance(record, dict) and "roster" in record:
            check_unique_keys(line)
    except LedgerError as exc:
        raise VerificationError(f"{path}:{number}: {exc}") from exc
    if isinstance(record, dict) and "roster" in record:
        if record.keys() != {"roster", "signature"}:
            raise VerificationError(f'{path}:{number}: a roster line is {{"roster", "signature"}}')
        verifier.add_roster(record["roster"], record["signature"])
        return
    if isinstance(record, dict) and record.keys() in ({"certificate"}, {"evidence"}):
        try:
            check_unique_keys(line)
        except LedgerError as exc:
            raise VerificationError(f"{path}:{number}: {exc}") from exc
        try:
            if "certificate" in record:
                verifier.add_certificate(record["certificate"])
            else:
                verifier.add_evidence(record["evidence"])
        except VerificationError as exc:
            raise VerificationError(f"{path}:{number}: {exc}") from exc
        return
    try:
        check_block_shape(record)
    except LedgerError as exc:
        raise VerificationError(f"{path}:{number}: {exc}") from exc
    header = record["header"]
    if chain is not None and (header.get("chain") if isinstance(header, dict) else None) != chain:
        raise Misrouted(number)
    datas = verifier.add_block(header, record["signature"], record["entries"])
    if block_bytes(datas, canonical_bytes(header), record["signature"]) != line.strip():
        try:  # not as hrx writes it: look for what canonical text cannot hold
            check_unique_keys(line)
        except LedgerError as exc:
            raise VerificationError(f"{path}:{number}: {exc}") from exc
    if progress:
        progress(len(datas))


def verify_database(
    store: ChainStore,
    authority: Ed25519PublicKey | None,
    progress: Progress | None = None,
    *,
    given: Sequence[Any] = (),
    **watching: Any,
) -> Summary:
    """Verify a node's database: the ledger it holds, and the rows that hold it; ``given``
    and ``watching`` as :func:`verify_export` takes them."""
    verifier = database_verifier(store, authority, **watching)
    with _collector_paused():
        for chain in store.chains():
            verify_chain_rows(verifier, store, chain, progress)
    return finish_database(verifier, store, given)


def database_verifier(
    store: ChainStore, authority: Ed25519PublicKey | None, **watching: Any
) -> Verifier:
    """A verifier holding the database's rosters, each checked, before any block."""
    verifier = Verifier(authority, **watching)
    try:
        with store.engine.connect() as conn:  # the rows as they are now, never a cached copy
            rosters = store.rosters(conn)
    except LedgerError as exc:
        raise VerificationError(f"stored roster: {exc}") from exc
    if not rosters:
        raise VerificationError("the database holds no roster")
    for roster, signature in rosters:
        verifier.add_roster(roster, signature)
    return verifier


def finish_database(verifier: Verifier, store: ChainStore, given: Sequence[Any]) -> Summary:
    """What follows the chains of a database: its certificates and evidence, the certificates
    ``given``, and the check that no row lies outside the verified chains."""
    for certificate in store.certificates():
        verifier.add_certificate(certificate)
    for evidence in store.evidence():
        verifier.add_evidence(evidence)
    _hold_to(verifier, given)
    # Every row must belong to the chain: in one snapshot, the rows are exactly the entries and
    # blocks of each chain's newest block, and hold at least what was verified. What a live
    # node stored after the verification read its chains is not covered, and is said so.
    chains = verifier.summary.chains
    entry_stats, block_stats, tree_sizes = store.row_stats_snapshot()
    for chain in sorted(set(entry_stats) | set(block_stats)):
        verified = chains.get(chain)
        tree_size = tree_sizes.get(chain, 0)
        height = block_stats[chain][2] if chain in block_stats else -1
        for what, stats, expected, counted in (
            ("block", block_stats, height + 1, "blocks"),
            ("entry", entry_stats, tree_size, "entries"),
        ):
            rows, lowest, highest = stats.get(chain, (0, 0, -1))
            size = getattr(verified, counted) if verified is not None else 0
            if (rows, lowest, highest) != (expected, 0, expected - 1) or rows < size:
                raise VerificationError(
                    f"{rows} {what} rows numbered {lowest}..{highest}, "
                    f"but the verified chain has {size} {counted}",
                    chain=chain,
                )
        later = tree_size - (verified.entries if verified is not None else 0)
        if later:
            verifier.summary.warnings.append(
                f"chain {chain}: {later} entries were stored while verifying; they are not "
                "covered by this verification"
            )
    return verifier.finish()


def verify_chain_rows(
    verifier: Verifier, store: ChainStore, chain: str, progress: Progress | None
) -> None:
    """Verify one chain's block and entry rows, block by block."""
    try:
        for block in store.block_rows(chain):
            where: dict[str, Any] = {"chain": chain, "height": block.row_height}
            header = block.header
            if header.get("chain") != chain or header.get("height") != block.row_height:
                raise VerificationError(
                    f"the row's key (chain {chain}, height {block.row_height}) is not the "
                    f"header's (chain {header.get('chain')}, height {header.get('height')})",
                    **where,
                )
            if header.get("tree_size") != block.row_tree_size:
                raise VerificationError(
                    f"the row's tree_size {block.row_tree_size} is not the header's", **where
                )
            expected = header.get("first_seq")
            for seq in block.entry_seqs:
                if seq != expected:
                    break
                expected += 1
            if expected != header.get("tree_size"):
                raise VerificationError("entry row is missing", seq=expected, **where)
            datas = verifier.add_block(
                header,
                block.signature,
                stored=block.entry_data,
                stored_nodes=block.entry_nodes,
            )
            if progress:
                progress(len(datas))
    except VerificationError:
        raise
    except LedgerError as exc:
        raise VerificationError(str(exc)) from exc

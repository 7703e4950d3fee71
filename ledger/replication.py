"""Replication: pull members' chains, verify every block, store it, catch forks.

Whom a node asks is its caller's choice (docs/spec.md §11): a witness compares heads with the
other witnesses (:meth:`Replicator.run_round`) and follows the signed heads that authors send it
when their chains grow (:meth:`Replicator.follow_notice`); an ordinary member fetches a chain
only when a decision needs it, from its author or else from a witness
(:meth:`Replicator.sync_chains`). A head beyond the local one is pulled from whoever showed
it, block by block, each verified exactly as the auditor verifies (signature by the roster's
key, hash link, entries, Merkle root) before anything is stored, and none is stored that
conflicts with the latest checkpoint certificate held here (a certified head is final). Two
validly signed headers of one chain at one height with different hashes are fork evidence
(docs/spec.md §7): stored, and the chain is frozen — no more of its blocks are accepted —
until people sort it out. A member that is unreachable or that serves something that does not
verify is backed off from, more each time.

The transport is not this module's business: a :class:`Peers` object fetches JSON from a
member (the node signs those requests, docs/spec.md §10).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import keys, merkle
from ledger.canonical import canonical_bytes, parse_canonical
from ledger.errors import LedgerError, PeerUnavailable, StoreError, VerificationError
from ledger.model import ZERO_HASH, block_hash, check_header
from ledger.store import ChainStore, Head
from ledger.verify import Verifier

log = logging.getLogger(__name__)

PAGE_BLOCKS = 200  # blocks asked for at once (a block holds at most 1000 entries)
MAX_BACKOFF_SECONDS = 4.0  # the longest a silent member is left alone
MAX_UNANCHORED_ENTRIES = 200_000  # held in memory while waiting for an anchor


class Peers(Protocol):
    """How replication talks to other members."""

    def heads(self, member: str) -> dict[str, Any]:
        """``GET /ledger/heads`` of a member."""

    def blocks(self, member: str, chain: str, start: int, limit: int) -> list[dict[str, Any]]:
        """``GET /ledger/chains/<chain>/blocks?from=<start>&limit=<limit>`` of a member."""


@dataclass
class RoundReport:
    """What one round did."""

    pulled: dict[str, int] = field(default_factory=dict)  # chain -> entries stored
    evidence: list[dict[str, Any]] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # member -> why
    refused: dict[str, str] = field(default_factory=dict)  # member -> what did not verify


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


class Replicator:
    """Replicates into ``store`` for the member ``own``; ``authority`` anchors the rosters."""

    def __init__(
        self,
        store: ChainStore,
        own: str,
        peers: Peers,
        authority: Ed25519PublicKey | None,
        *,
        on_evidence: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        writes: ChainStore | None = None,
        on_synced: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        # where blocks and evidence are written (on SQLite: an engine that takes the write
        # lock up front; ``store`` then reads without it)
        self.writes = writes or store
        self.own = own
        self.peers = peers
        self.authority = authority
        self.on_evidence = on_evidence
        # told of each chain found current with its author's own head (for freshness)
        self.on_synced = on_synced
        self.clock = clock
        self._backoff: dict[str, _Backoff] = {}
        self._rosters: dict[int, dict[str, Any]] = {}  # every stored version
        self._members: frozenset[str] = frozenset()  # of the newest version
        self._certified: tuple[int | None, dict[str, tuple[int, str]]] = (None, {})
        self._deadline: float | None = None  # of the sync under way (monotonic)
        # after a restore from a backup: take this node's own newer blocks back from the
        # members that hold them (verified like any other chain's), never while it appends
        self.recovering = False

    # -- one round ------------------------------------------------------------------------

    def run_round(self, sources: Iterable[str]) -> RoundReport:
        """Ask ``sources`` (members) for their heads, and pull, verify and store every chain
        that is behind; a head a source shows that differs from the one held here at its
        height is fork evidence."""
        report = RoundReport()
        self._load_rosters()
        members = set(self._members)
        heads: dict[str, dict[str, Any]] = {}
        for member in sorted(set(sources) & members - {self.own}):
            if self._backed_off(member):
                report.unreachable[member] = "backed off"
                continue
            try:
                heads[member] = self.peers.heads(member)
            except PeerUnavailable as exc:
                self._fail(member)
                report.unreachable[member] = str(exc)
        frozen = self.store.frozen_chains()
        held = {chain: head.hash for chain, head in self.store.heads().items()}
        for chain in sorted(members - frozen):
            # the author first, then everyone else who reports on the chain
            for source in sorted(heads, key=lambda m: (m != chain, m)):
                claimed = heads[source].get(chain)
                if claimed is None:
                    continue
                if _same_head(claimed, held.get(chain)):  # nothing new: no signature checked
                    self._current(chain, source)
                    continue
                if not self._follow_guarded(chain, source, claimed, report):
                    break
        return report

    def follow_notice(self, source: str, chain: str, claimed: Any) -> RoundReport:
        """A member says (``POST /peer/heads``) that ``chain`` has grown to the signed head
        ``claimed``: pull it from that member, or find the head in conflict with the copy
        here (fork evidence)."""
        report = RoundReport()
        self._load_rosters()
        if chain not in self._members:
            return report
        current = self.store.head(chain)  # one row: a heartbeat costs no more at any size
        if _same_head(claimed, None if current is None else current.hash):
            self._current(chain, source)
            return report
        if chain not in self.store.frozen_chains():
            self._follow_guarded(chain, source, claimed, report)
        return report

    def _follow_guarded(self, chain: str, source: str, claimed: Any, report: RoundReport) -> bool:
        """Follow one source's head of one chain; whatever it serves is reported, never raised.
        False when fork evidence stopped the chain."""
        try:
            self._follow(chain, source, claimed, report)
        except _Forked:
            return False
        except PeerUnavailable as exc:
            self._fail(source)
            report.unreachable[source] = str(exc)
        except (VerificationError, _Refused) as exc:
            self._fail(source)
            report.refused[source] = f"chain {chain}: {exc}"
            log.warning("refused what %s served of chain %s: %s", source, chain, exc)
        except (LedgerError, KeyError, TypeError, ValueError, AttributeError) as exc:
            # whatever a member sends, it must not stop this node's replication
            self._fail(source)
            report.refused[source] = f"chain {chain}: {type(exc).__name__}: {exc}"
            log.warning("refused what %s served of chain %s", source, chain, exc_info=True)
        else:
            self._current(chain, source)
        return True

    def _current(self, chain: str, source: str) -> None:
        """``source`` showed nothing beyond this node's copy of ``chain``."""
        self._backoff.pop(source, None)
        if source == chain and self.on_synced is not None:
            self.on_synced(chain)  # current with its author: the staleness bound counts from now

    def _load_rosters(self) -> None:
        """Read the stored rosters again when a newer version was installed."""
        newest = self.store.roster_version()
        if newest is not None and newest not in self._rosters:
            self._rosters = {body["version"]: body for body, _ in self.store.rosters()}
            self._members = frozenset(m["id"] for m in self._rosters[newest]["members"])

    def sync_chains(
        self, chains: Iterable[str], witnesses: Iterable[str] = (), seconds: float | None = None
    ) -> dict[str, str]:
        """Bring ``chains`` up to their authors' heads now — from the author, or when it cannot
        be reached or serves what does not verify or conflicts with the certified head, from
        the ``witnesses`` in turn (up to at least the certified head); for each chain that
        could not be brought to its author's head, why. ``on_synced`` is told of each chain
        found current with its author; a copy from a witness is not "current" (the staleness
        bound counts from the last time the author was matched). ``seconds``: no new page of
        blocks is asked for after that long (a chain taken whole for the first time can be
        long); what was stored stays, and the next sync goes on from there."""
        failed: dict[str, str] = {}
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self._load_rosters()
        frozen = self.store.frozen_chains()
        for chain in sorted(set(chains) - {self.own}):
            if chain in frozen:
                failed[chain] = "frozen by fork evidence"
                continue
            try:
                self._catch_up(chain, chain)
            except (LedgerError, _Refused, _Forked, KeyError, TypeError, ValueError) as exc:
                failed[chain] = str(exc) or type(exc).__name__
            else:
                if self.on_synced is not None:
                    self.on_synced(chain)
                continue
            for witness in [w for w in witnesses if w not in (chain, self.own)]:
                try:
                    self._catch_up(chain, witness)
                except (LedgerError, _Refused, _Forked, KeyError, TypeError, ValueError) as exc:
                    failed[chain] += f"; {witness}: {exc or type(exc).__name__}"
                else:
                    failed[chain] += f"; taken from {witness}"
                    break
        return failed

    def _catch_up(self, chain: str, source: str) -> None:
        """Ask ``source`` (the chain's author, or a witness) for its blocks after the local
        head — one round trip when there are none or few — and pull, verify and store them;
        _Refused when what it holds then is behind the certified head. Only this source's
        answer counts here: whether the author showed another member another history at a
        height this node already holds is for the witnesses, which compare heads."""
        while True:
            local = self.store.head(chain)
            start = local.header["height"] + 1 if local is not None else 0
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise _Refused(
                    f"still taking chain {chain} from {source}: held up to height {start - 1} "
                    "when the time for syncing ran out (the next sync goes on from there)"
                )
            page = self.peers.blocks(source, chain, start, PAGE_BLOCKS)
            if not isinstance(page, list):
                raise _Refused(f"{source} served blocks that are not a JSON array")
            if page:
                header, signature = self._checked_head(chain, page[-1])
                self._pull(chain, source, local, Head(header, signature), RoundReport(), page)
            if len(page) < PAGE_BLOCKS:
                break
        certified = self._certified_head(chain)
        held = self.store.head(chain)
        if certified is not None and (held is None or held.header["height"] < certified[0]):
            raise _Refused(
                f"{source} holds chain {chain} up to height "
                f"{-1 if held is None else held.header['height']}, behind its certified head at "
                f"height {certified[0]}"
            )

    # -- one chain from one source --------------------------------------------------------

    def _follow(self, chain: str, source: str, claimed: Any, report: RoundReport) -> None:
        header, signature = self._checked_head(chain, claimed)
        local = self.store.head(chain)
        local_height = local.header["height"] if local is not None else -1
        if header["height"] <= local_height:
            ours = self.store.block_at(chain, header["height"])
            assert ours is not None
            if block_hash(ours.header) != block_hash(header):
                self._evidence(ours, Head(header, signature), source, report)
            return
        if chain == self.own and not self.recovering:
            reason = (
                f"{source} holds this node's own chain up to height {header['height']}, beyond "
                f"its head here at {local_height} (restored from a backup?): stop the node and "
                "run hrx node recover"
            )
            if self.writes.signing_hold() is None:
                self.writes.hold_signing(reason)  # a block signed now would fork the chain
            raise _Refused(reason)
        pulled = self._pull(chain, source, local, Head(header, signature), report)
        report.pulled[chain] = report.pulled.get(chain, 0) + pulled

    def _checked_head(self, chain: str, claimed: Any) -> tuple[dict[str, Any], str]:
        if not isinstance(claimed, dict) or not isinstance(claimed.get("signature"), str):
            raise _Refused("a head is not {header, signature}")
        header = claimed.get("header")
        if not isinstance(header, dict):
            raise _Refused("a head has no header")
        try:
            check_header(header)
        except LedgerError as exc:
            raise _Refused(f"malformed head: {exc}") from None
        if header["chain"] != chain:
            raise _Refused(f"the head listed for {chain} is of chain {header['chain']}")
        self._verify_signature(header, claimed["signature"])
        return header, claimed["signature"]

    def _verify_signature(self, header: dict[str, Any], signature: str) -> None:
        body = self._rosters.get(header["roster"])
        if body is None:
            raise _Refused(f"the head names roster version {header['roster']}, unknown here")
        members = {m["id"]: m["ed25519"] for m in body["members"]}
        if header["chain"] not in members:
            raise _Refused(f"roster version {header['roster']} does not list {header['chain']}")
        try:
            keys.verify(members[header["chain"]], keys.BLOCK_DOMAIN, block_hash(header), signature)
        except LedgerError as exc:
            raise _Refused(f"head signature: {exc}") from None

    def _signer_is_current(self, header: dict[str, Any]) -> bool:
        """Whether the key that signed this header is the one the newest roster gives its
        chain."""
        newest = self._rosters[max(self._rosters)]
        named = self._rosters.get(header["roster"], {"members": []})
        current = {m["id"]: m["ed25519"] for m in newest["members"]}.get(header["chain"])
        signer = {m["id"]: m["ed25519"] for m in named["members"]}.get(header["chain"])
        return signer is not None and signer == current

    def _pull(
        self,
        chain: str,
        source: str,
        local: Head | None,
        advertised: Head,
        report: RoundReport,
        first_page: list[Any] | None = None,
    ) -> int:
        """Pull, verify and store blocks after the local head up to the ``advertised`` head;
        the number of entries stored. ``first_page``: the blocks after the local head, when
        the caller has them already.

        Blocks signed with a key the newest roster no longer gives the chain are held back
        until an anchor follows them: a block signed with the current key, or the block a
        checkpoint certificate certifies (same height and hash). Unanchored, they are never
        stored."""
        target = advertised.header
        certified = self._certified_head(chain)
        verifier = Verifier(self.authority)
        for body, roster_signature in self.store.rosters():
            # checked, proofs of possession and all, when this node installed them
            verifier.add_roster(body, roster_signature, check_possession=False)
        if local is not None:
            frontier = self.store.frontier(chain, local)
            verifier.resume(local.header, frontier.copy())
            after, next_height = local.hash, local.header["height"] + 1
        else:
            frontier = merkle.Frontier()
            after, next_height = ZERO_HASH, 0
        stored_after = after  # the hash of the newest block stored
        waiting: list[tuple[bytes, str, list[bytes], list[bytes]]] = []  # unanchored yet
        stored = 0
        while next_height <= target["height"]:
            limit = min(PAGE_BLOCKS, target["height"] - next_height + 1)
            if first_page is not None:
                wire, first_page = first_page, None
            else:
                wire = self.peers.blocks(source, chain, next_height, limit)
            if not isinstance(wire, list) or not wire:
                raise _Refused(f"served no block at height {next_height} below its head")
            ready: list[tuple[bytes, str, list[bytes], list[bytes]]] = []
            for block in wire:
                header = self._block_header(block, chain, next_height)
                first = local is not None and not ready and not waiting
                if first and local is not None and stored_after == local.hash != header["prev"]:
                    self._check_divergence(chain, source, local, report)
                datas = verifier.add_block(header, block["signature"], block["entries"])
                nodes = [b"".join(frontier.append(merkle.leaf_hash(d))) for d in datas]
                digest = block_hash(header).hex()
                if (
                    certified is not None
                    and (header["height"], digest) != certified
                    and (
                        header["height"] == certified[0]  # a certified head is final
                    )
                ):
                    raise _Refused(
                        f"its block of chain {chain} at height {header['height']} is not the "
                        "one the latest checkpoint certificate certifies"
                    )
                row = (canonical_bytes(header), block["signature"], datas, nodes)
                current = self._signer_is_current(header)
                anchor = current or (
                    certified is not None and certified == (header["height"], digest)
                )
                if waiting or not current:
                    waiting.append(row)
                    if anchor:
                        ready.extend(waiting)
                        waiting.clear()
                    elif sum(len(w[2]) for w in waiting) > MAX_UNANCHORED_ENTRIES:
                        raise _Refused("too many blocks signed with a rotated-out key")
                else:
                    ready.append(row)
                after = digest
                next_height += 1
            if ready:
                try:
                    self.writes.import_blocks(chain, stored_after, ready)
                except StoreError:
                    return stored  # another replicator stored these meanwhile
                stored += sum(len(datas) for _, _, datas, _ in ready)
                stored_after = block_hash(parse_canonical(ready[-1][0])).hex()
        if waiting:
            raise _Refused(
                f"blocks from height {next_height - len(waiting)} are signed with a key that "
                f"roster version {max(self._rosters)} no longer lists for {chain}, and neither a "
                "block signed with the current key nor a certified one follows them"
            )
        if block_hash(target).hex() != after:
            ours = self.store.block_at(chain, target["height"])
            assert ours is not None
            self._evidence(ours, advertised, source, report)
        return stored

    def _block_header(self, block: Any, chain: str, height: int) -> dict[str, Any]:
        """A served block's header, once the block has the right form, chain and height."""
        if (
            not isinstance(block, dict)
            or not isinstance(block.get("header"), dict)
            or not isinstance(block.get("signature"), str)
            or not isinstance(block.get("entries"), list)
        ):
            raise _Refused("a block is not {header, signature, entries}")
        header: dict[str, Any] = block["header"]
        try:
            check_header(header)
        except LedgerError as exc:
            raise _Refused(f"malformed block header: {exc}") from None
        if header["chain"] != chain or header["height"] != height:
            raise _Refused(
                f"sent {header['chain']}@{header['height']} when asked for {chain}@{height}"
            )
        if header["roster"] not in self._rosters:
            raise _Refused(f"a block names roster version {header['roster']}, unknown here")
        return header

    def _certified_head(self, chain: str) -> tuple[int, str] | None:
        """The height and hash the newest certificate held here gives ``chain`` (the
        certificate is read again only when a newer one was stored: it names every chain)."""
        epoch = self.store.certificate_epoch()
        if epoch is None:
            return None
        if self._certified[0] != epoch:
            certificate = self.store.certificate(epoch)
            heads = {} if certificate is None else certificate["checkpoint"]["heads"]
            self._certified = (epoch, {c: (h["height"], h["hash"]) for c, h in heads.items()})
        return self._certified[1].get(chain)

    def _check_divergence(self, chain: str, source: str, local: Head, report: RoundReport) -> None:
        """The source's next block does not link to our head: fetch its block at our head's
        height; validly signed and different, it is fork evidence."""
        height = local.header["height"]
        theirs = self.peers.blocks(source, chain, height, 1)
        if isinstance(theirs, list) and theirs:
            header, signature = self._checked_head(chain, theirs[0])
            if header["height"] == height and block_hash(header) != block_hash(local.header):
                self._evidence(local, Head(header, signature), source, report)
        raise _Refused("its next block does not follow this node's head")

    def _evidence(self, ours: Head, theirs: Head, source: str, report: RoundReport) -> None:
        evidence = {
            "chain": ours.header["chain"],
            "height": ours.header["height"],
            "headers": [
                {"header": ours.header, "signature": ours.signature},
                {"header": theirs.header, "signature": theirs.signature},
            ],
            "source": source,
        }
        if self.writes.add_evidence(evidence):
            log.error(
                "FORK: chain %s has two signed blocks at height %s (one from %s); the chain "
                "is frozen",
                evidence["chain"],
                evidence["height"],
                source,
            )
            report.evidence.append(evidence)
            if self.on_evidence is not None:
                self.on_evidence(evidence)
        if evidence["chain"] not in self.writes.frozen_chains():  # the authority kept ours
            raise _Refused(
                f"it serves a block of chain {evidence['chain']} at height {evidence['height']} "
                "that the authority's resolution of the fork there did not keep"
            )
        raise _Forked()

    # -- backoff --------------------------------------------------------------------------

    def _backed_off(self, member: str) -> bool:
        state = self._backoff.get(member)
        return state is not None and self.clock() < state.until

    def _fail(self, member: str) -> None:
        state = self._backoff.setdefault(member, _Backoff())
        state.failures += 1
        state.until = self.clock() + min(MAX_BACKOFF_SECONDS, 0.25 * 2 ** (state.failures - 1))

    def reset_backoff(self, member: str) -> None:
        """The member spoke up (a push hint): try it again at once."""
        self._backoff.pop(member, None)


def _same_head(claimed: Any, held: str | None) -> bool:
    """Whether a claimed head is the head held here (same block hash); anything malformed is
    not (it is then checked, and refused)."""
    if held is None or not isinstance(claimed, dict) or not isinstance(claimed.get("header"), dict):
        return False
    try:
        return block_hash(claimed["header"]).hex() == held
    except (LedgerError, TypeError, ValueError):
        return False


class _Refused(Exception):
    """What a member served does not verify."""


class _Forked(Exception):
    """Fork evidence was found for the chain: stop following it."""

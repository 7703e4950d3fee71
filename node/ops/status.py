"""What an operator needs to know about a node, and what to do about each problem: the facts
behind ``hrx node status`` (read from the node's directory and database, the node itself
running or not).

Each :class:`Finding` is a fact with a level — ``ok``, ``note`` (worth knowing), ``warning``
(something will go wrong, or already goes wrong for some requests) or ``problem`` (the node
cannot do its work) — and, unless it is ok, what to do. The same states drive ``/healthz``
(the schema, the hold on signing) and ``/metrics`` (frozen chains, replication ages, the
newest checkpoint, the quarantine), so the documented alerts and this screen agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from ledger import keys
from ledger.errors import LedgerError
from ledger.model import parse_time
from ledger.roster import is_witness
from ledger.store import ChainStore
from node.base.config import NodeConfig
from node.consortium.membership import NEXT_ENROLLMENT_FILE
from node.consortium.worker import synced_age
from node.db.engines import Database, current_revision, head_revision
from node.db.schema import quarantine_table

LEVELS = ("ok", "note", "warning", "problem")


@dataclass(frozen=True)
class Finding:
    topic: str
    level: str  # one of LEVELS
    what: str
    do: str = ""


@dataclass
class Status:
    node: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, topic: str, level: str, what: str, do: str = "") -> None:
        self.findings.append(Finding(topic, level, what, do))

    @property
    def worst(self) -> str:
        return max((f.level for f in self.findings), key=LEVELS.index, default="ok")


def node_status(config: NodeConfig, database: Database) -> Status:
    """Every finding about the node in ``config``'s directory, whose database is open."""
    status = Status(config.node_id)
    revision, head = current_revision(database.engine), head_revision()
    if revision != head:
        status.add(
            "schema",
            "problem",
            f"the database is at revision {revision or 'none'}, this hrx needs {head}: no "
            "process of the node starts",
            f"hrx node upgrade --dir {config.directory}",
        )
        return status
    status.add("schema", "ok", f"revision {revision}")
    store = ChainStore(database.engine)
    try:
        rosters = store.rosters()
    except LedgerError as exc:
        status.add("roster", "problem", f"the stored rosters cannot be read: {exc}")
        return status
    if not rosters:
        status.add(
            "roster",
            "problem",
            "the node has joined no consortium: it records no consent and exchanges nothing",
            f"hrx node join --dir {config.directory} --roster ROSTER --secret SECRET "
            "--authority KEY (docs/operations.md)",
        )
        return status
    _membership(status, config, rosters[-1][0])
    _signing(status, store)
    _replication(status, config, store, rosters[-1][0])
    _checkpoints(status, store)
    _quarantine(status, database)
    return status


def _membership(status: Status, config: NodeConfig, roster: dict[str, object]) -> None:
    members = {m["id"]: m for m in roster["members"]}  # type: ignore[attr-defined]
    version = roster["version"]
    entry = members.get(config.node_id)
    if entry is None:
        status.add(
            "roster",
            "problem",
            f"roster version {version} does not list {config.node_id}: the members refuse its "
            "requests and blocks",
            "ask the consortium authority for a roster that lists this node",
        )
        return
    roles = entry.get("roles")
    role = "witness (no roles listed)" if roles is None else (", ".join(roles) or "ordinary")
    status.add("roster", "ok", f"version {version}, {len(members)} members; role: {role}")
    own = keys.public_key_text(keys.load_private_key(config.ed25519_key))
    if entry["ed25519"] != own:
        status.add(
            "keys",
            "problem",
            f"keys/node.pem is not the key roster version {version} lists for this node: the "
            "members refuse everything it signs",
            "put the key the roster lists back, or ask the authority for a roster with this "
            "node's enrollment.json",
        )
    else:
        status.add("keys", "ok", "the signing key is the one the roster lists")
    if (config.directory / NEXT_ENROLLMENT_FILE).exists():
        status.add(
            "keys",
            "note",
            "next keys are waiting (enrollment-next.json): they take over when a roster lists them",
            f"send {NEXT_ENROLLMENT_FILE} to the authority; then hrx node join with its roster",
        )
    unlevelled = sorted(m for m, body in members.items() if not body.get("level"))
    if unlevelled:
        mine = config.node_id in unlevelled
        status.add(
            "recognition",
            "warning",
            f"roster version {version} gives no level to {len(unlevelled)} member(s)"
            + (", this one among them" if mine else "")
            + f" ({', '.join(unlevelled[:5])}{', ...' if len(unlevelled) > 5 else ''}): "
            "no result from them is ever recognised (mutual recognition needs each "
            "member's level and accreditation)",
            "the authority writes the next roster with --members-info (docs/operations.md)",
        )


def _signing(status: Status, store: ChainStore) -> None:
    hold = store.signing_hold()
    if hold is not None:
        status.add(
            "signing",
            "problem",
            f"held: {hold}; the node records no consent and no access meanwhile",
            "stop the node's processes; hrx node recover --dir DIR; start them again",
        )
    else:
        status.add("signing", "ok", "this node signs its chain")
    for evidence in store.evidence():
        status.add(
            "fork",
            "problem",
            f"chain {evidence['chain']} is frozen here: two blocks at height "
            f"{evidence['height']} are both validly signed by its member",
            "a member signed two histories: tell the consortium authority; "
            "hrx audit verify shows the evidence",
        )


def _replication(
    status: Status, config: NodeConfig, store: ChainStore, roster: dict[str, object]
) -> None:
    members = {m["id"]: m for m in roster["members"]}  # type: ignore[attr-defined]
    others = [m for m in members if m != config.node_id]
    if config.node_id in members and not is_witness(members[config.node_id]):
        held = set(store.heads())
        others = [m for m in others if m in held]
        if not others:
            status.add(
                "replication",
                "ok",
                "an ordinary member: it holds its own chain and fetches another only when a "
                "decision needs it (none held now)",
            )
            return
    if not others:
        return
    worst: list[tuple[float, str]] = []
    for member in others:
        age = synced_age(store, member)
        worst.append((float("inf") if age is None else age, member))
    worst.sort(reverse=True)
    stale = [(age, m) for age, m in worst if age > config.staleness_seconds]
    oldest, member = worst[0]
    shown = "never" if oldest == float("inf") else f"{oldest:.0f} s ago"
    if stale:
        status.add(
            "replication",
            "warning",
            f"{len(stale)} of {len(others)} members' chains not confirmed within the consent "
            f"staleness bound ({config.staleness_seconds} s); the oldest, {member}: {shown}. "
            "Requests about patients whose consents they hold are denied while they cannot be "
            "reached",
            f"is the replication worker running (hrx node replicate --dir {config.directory})? "
            "its log names each member it cannot reach",
        )
    else:
        status.add(
            "replication",
            "ok",
            f"every member's chain confirmed within {config.staleness_seconds} s (oldest "
            f"{member}, {shown})",
        )


def _checkpoints(status: Status, store: ChainStore) -> None:
    certificate = store.certificate()
    if certificate is None:
        status.add(
            "checkpoints",
            "note",
            "no checkpoint certified yet",
            "they come once the chains grow and a quorum of members signs",
        )
        return
    checkpoint = certificate["checkpoint"]
    age = time.time() - parse_time(checkpoint["time"]).timestamp()
    status.add(
        "checkpoints",
        "ok",
        f"the newest, epoch {checkpoint['epoch']}, is {age:.0f} s old, signed by "
        f"{', '.join(certificate['signers'])}",
    )


def _quarantine(status: Status, database: Database) -> None:
    Q = quarantine_table
    with database.engine.connect() as conn:
        waiting: dict[str, int] = {
            str(adapter): int(count)
            for adapter, count in conn.execute(
                sa.select(Q.c.adapter, sa.func.count())
                .where(Q.c.replayed_at.is_(None))
                .group_by(Q.c.adapter)
            )
        }
    if waiting:
        counts = ", ".join(f"{adapter} {count}" for adapter, count in sorted(waiting.items()))
        status.add(
            "adapters",
            "warning",
            f"refused by the adapters and not yet replayed: {counts}",
            "hrx adapters quarantine list --dir DIR; fix the source, then replay",
        )
    else:
        status.add("adapters", "ok", "nothing in the quarantine")

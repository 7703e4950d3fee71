"""The record locator (docs/spec.md §15.5): which members hold results for a patient, so that a
referral asks only those.

A member with the ``registry`` role keeps, in its own database, one row per (pseudonym, member,
category) with the date of that member's newest result in that category — pseudonyms only,
never a name or identifier, as on the ledger. Every member keeps it up to date with signed
requests (``POST /peer/locator/holdings``): :class:`Publisher` sends, from the member's
replication worker, the holdings of every patient whose results or Patient changed since the
last update it got through (all of them the first time, in pages). The registry answers
lookups (:mod:`node.flows.locator_lookup`) from :func:`holders`.

Costs: a member's updates grow with its own new results, not with the consortium; the
registry's rows with the patients and their holders (a few per patient), its lookups with the
referrals. A deleted result is not taken back from the registry: the member it names answers
"no records" when asked, which costs one request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from consent.pseudonym import is_pseudonym
from exchange.recognition import CATEGORIES, result_of
from fhir_adapters.store import ResourceStore, tables
from ledger.errors import PeerUnavailable
from ledger.store import ChainStore
from node.base.errors import Refused
from node.consortium.peers import SignedPeers
from node.db.schema import locator_table, pseudonyms_table

log = logging.getLogger(__name__)

RESULT_TYPES = ("Observation", "DiagnosticReport", "ImagingStudy")
WATCHED_TYPES = (*RESULT_TYPES, "Patient")  # a new identifier gives a patient a pseudonym
MAX_HOLDINGS = 2000  # holdings in one update
PUBLISHED = "locator:published:"  # + registry id: the newest version time it has been sent
OVERLAP_MICROS = 5_000_000  # versions committed late with an earlier time are sent again
DATE_LENGTH = 10  # YYYY-MM-DD
_ZONE = timezone(timedelta(hours=8))  # a result's date as the consortium's clinics read it


class LocatorError(Refused):
    """An update or a lookup the registry refuses (409), saying why."""


# -- at the registry ---------------------------------------------------------------------------


def check_holdings(holdings: Any) -> list[dict[str, str]]:
    """An update's holdings, once each is ``{"patient": pseudonym, "category", "newest":
    YYYY-MM-DD}``; LocatorError naming the first that is not."""
    if not isinstance(holdings, list) or len(holdings) > MAX_HOLDINGS:
        raise LocatorError(f"holdings must be a list of at most {MAX_HOLDINGS}")
    for n, holding in enumerate(holdings):
        if (
            not isinstance(holding, dict)
            or set(holding) != {"patient", "category", "newest"}
            or not is_pseudonym(holding["patient"])
            or holding["category"] not in CATEGORIES
            or not isinstance(holding["newest"], str)
            or len(holding["newest"]) != DATE_LENGTH
            or not holding["newest"][:4].isdigit()
        ):
            raise LocatorError(
                f"holding {n} is not {{patient: a pseudonym, category: one of "
                f"{', '.join(CATEGORIES)}, newest: YYYY-MM-DD}}"
            )
    return holdings


def record_holdings(write_engine: Engine, member: str, holdings: list[dict[str, str]]) -> int:
    """Store ``member``'s holdings (a newer date replaces an older one, never the reverse);
    how many were given."""
    if not holdings:
        return 0
    now = time.time_ns() // 1000
    rows = [
        {
            "patient": h["patient"],
            "member": member,
            "category": h["category"],
            "newest": h["newest"],
            "updated": now,
        }
        for h in holdings
    ]
    dialect = postgresql if write_engine.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(locator_table)
    statement = insert.on_conflict_do_update(
        index_elements=["patient", "member", "category"],
        set_={
            "newest": sa.func.max(locator_table.c.newest, insert.excluded.newest)
            if dialect is sqlite
            else sa.func.greatest(locator_table.c.newest, insert.excluded.newest),
            "updated": insert.excluded.updated,
        },
    )
    with write_engine.begin() as conn:
        conn.execute(statement, rows)
    return len(rows)


def holders(engine: Engine, patient: str, categories: Iterable[str]) -> list[str]:
    """The members holding results of ``patient`` in any of ``categories``, sorted."""
    query = (
        sa.select(locator_table.c.member)
        .where(
            locator_table.c.patient == patient,
            locator_table.c.category.in_(list(categories)),
        )
        .distinct()
    )
    with engine.connect() as conn:
        return sorted(row[0] for row in conn.execute(query))


# -- at every member ---------------------------------------------------------------------------


def holdings_of(
    store: ResourceStore, engine: Engine, patient_ids: Iterable[str]
) -> list[dict[str, str]]:
    """The holdings of these local patients: for each pseudonym and category, the date of the
    newest result (results without a date count as stored today)."""
    wanted = sorted(set(patient_ids))
    if not wanted:
        return []
    with engine.connect() as conn:
        pseudonyms = dict(
            conn.execute(
                sa.select(pseudonyms_table.c.patient_id, pseudonyms_table.c.pseudonym).where(
                    pseudonyms_table.c.patient_id.in_(wanted)
                )
            ).all()
        )
    newest: dict[tuple[str, str], str] = {}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    for patient_id, pseudonym in sorted(pseudonyms.items()):
        for stored in store.in_compartments([patient_id], RESULT_TYPES):
            found = result_of(stored.resource(), _ZONE)
            if found.category not in CATEGORIES:
                continue
            day = found.when.date().isoformat() if found.when is not None else today
            key = (pseudonym, found.category)
            newest[key] = max(newest.get(key, day), day)
    return [
        {"patient": patient, "category": category, "newest": day}
        for (patient, category), day in sorted(newest.items())
    ]


def changed_patients(engine: Engine, since: int | None) -> tuple[list[str], int]:
    """The local patients whose results or Patient resource changed after ``since`` (µs;
    None: every patient with a pseudonym), and the newest change time seen."""
    V, C = tables.versions, tables.compartment
    with engine.connect() as conn:
        newest = conn.execute(
            sa.select(sa.func.max(V.c.last_updated)).where(V.c.type.in_(WATCHED_TYPES))
        ).scalar_one_or_none()
        if since is None:
            patients = conn.execute(sa.select(pseudonyms_table.c.patient_id).distinct())
            return sorted(row[0] for row in patients), int(newest or 0)
        changed = sa.select(V.c.res_pk).where(V.c.type.in_(RESULT_TYPES), V.c.last_updated > since)
        found = {
            row[0]
            for row in conn.execute(
                sa.select(C.c.patient_id).where(C.c.res_pk.in_(changed)).distinct()
            )
        }
        patient_rows = sa.select(V.c.res_pk).where(V.c.type == "Patient", V.c.last_updated > since)
        found |= {
            row[0]
            for row in conn.execute(
                sa.select(tables.resources.c.id).where(tables.resources.c.res_pk.in_(patient_rows))
            )
        }
    return sorted(found), int(newest or since)


def _pages(items: list[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Publisher:
    """Keeps every registry of the roster up to date with this member's holdings (run by the
    replication worker; a registry updates its own table directly)."""

    PATIENTS_AT_ONCE = 500

    def __init__(
        self,
        own: str,
        chains: ChainStore,
        writes: ChainStore,
        records: ResourceStore,
        engine: Engine,
        write_engine: Engine,
        peers: SignedPeers,
    ) -> None:
        self.own = own
        self.chains, self.writes = chains, writes
        self.records, self.engine, self.write_engine = records, engine, write_engine
        self.peers = peers

    def publish(self, registries: Iterable[str]) -> int:
        """Send each of ``registries`` what changed since it last took an update; holdings
        sent."""
        sent = 0
        for registry in registries:
            setting = self.chains.setting(PUBLISHED + registry)
            since = None if setting is None else int(setting)
            patients, newest = changed_patients(
                self.engine, None if since is None else since - OVERLAP_MICROS
            )
            if since is not None and newest <= since:
                continue
            try:
                for start in range(0, len(patients), self.PATIENTS_AT_ONCE):
                    batch = patients[start : start + self.PATIENTS_AT_ONCE]
                    holdings = holdings_of(self.records, self.engine, batch)
                    for page in _pages(holdings, MAX_HOLDINGS):
                        sent += self._send(registry, page)
            except (PeerUnavailable, Refused) as exc:
                log.info("the record locator %s took no update: %s", registry, exc)
                continue
            self.writes.set_setting(PUBLISHED + registry, str(newest))
        return sent

    def _send(self, registry: str, holdings: list[dict[str, str]]) -> int:
        if registry == self.own:
            return record_holdings(self.write_engine, self.own, holdings)
        self.peers.post(registry, "/peer/locator/holdings", {"holdings": holdings})
        return len(holdings)

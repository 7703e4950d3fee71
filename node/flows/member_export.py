"""A Group export from other members (``Group/[id]/$export?source=…``): the results that
members hold about a cohort of this node's patients, as the Bulk Data IG's NDJSON files,
each patient's release decided by its source under the patient's consent.

The Group names this node's Patients; each is asked for by its pseudonym (one without the
consortium's identifier cannot be, and is reported in the manifest's error file). For each
source, :data:`~node.flows.cohort_release.MOST_REQUESTS` patients at a time, this node records
one ``access.requested`` a patient on its own chain (in one block), then sends them, with their
proofs, in one signed ``POST /peer/export``. The source decides each patient as it decides a
referral's request and records every decision before it sends anything
(:mod:`node.flows.cohort_release`); what it streams back is checked line by line: a resource
whose hash is not among those the source recorded releasing, or not of an asked type, ends
that batch from that source with an error, as does a released resource never sent. A patient
the source denied is an OperationOutcome in the error file, saying why; one it does not hold
is nothing.

So an export to another organization leaves the same trail as a referral: the question on the
asker's chain, the decision on the source's, both shown to the patient in the portal and
replayed by the auditor; a consent revoked before the next export makes the source deny it.
Each patient's export is also an AuditEvent here naming what was received (source URL and
hash), that patient only.

The purpose is the consent's: ``TREAT``, ``PUBHLTH`` (the regional platform's statistics) or
``HRESCH`` (research), released only for patients whose consent names it; a consent naming no
purpose covers care only. A research export names the ResearchStudy it is for (held here,
approved or active), and each question carries that study's hash as its ``referral``.

An export whose process is lost goes on, when its job is run again, from the last batch it
finished: the files are synced and a checkpoint written after each batch, and whatever came
after it is cut off. Only the batch that was under way is asked again (its questions and the
source's decisions are then on the ledger twice, as they were made twice).

Cost: per patient and source, one entry on each chain and one line of decision; per source,
one request per :data:`~node.flows.cohort_release.MOST_REQUESTS` patients. Only the sources
named are asked: nothing fans out to the whole consortium.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_adapters.store import jsonio
from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError, PeerUnavailable
from node.consortium.peers import SignedPeers
from node.flows.cohort_release import MOST_REQUESTS
from node.flows.export_files import TypeFiles
from node.flows.prior_results import record_questions
from node.records.audit_trail import Caller
from node.records.pseudonym_index import pseudonym_of_patient
from node.services import Services

CHECKPOINT = "checkpoint.json"  # in the export's folder; never a file of the manifest
COHORT = "cohort.json"  # beside it: (patient, pseudonym) of each patient asked about, in order
MAX_LINE = 32 * 1024 * 1024  # the longest resource a source may send
READ_SECONDS = 300.0  # a source decides a whole batch before its first byte


@dataclass
class Outcomes:
    """What went wrong, as OperationOutcomes written to the manifest's error files."""

    files: TypeFiles

    def add(self, code: str, text: str, patient: str | None = None) -> None:
        outcome: dict[str, Any] = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        }
        if patient is not None:
            outcome["issue"][0]["expression"] = [f"Patient/{patient}"]
        self.files.write("OperationOutcome", jsonio.dump(outcome))


def export_from_members(
    svc: Services,
    caller: Caller,
    request: Any,  # node.flows.bulk_export.ExportRequest
    patients: list[str],
    folder: Path,
    url: str,
    advance: Callable[[int], None],
    progress: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ask ``request.sources`` for the results of ``patients`` (this node's ids), writing what
    is received and what went wrong as NDJSON files in ``folder`` (served under ``url``); call
    ``advance`` as lines arrive and say in ``progress`` which source and patients are being
    asked. The manifest's ``output`` and ``error`` items.

    After each batch the files are synced and :data:`CHECKPOINT` records how far the export
    is; an export started again in ``folder`` (its process was lost) goes on from there, so
    the patients of the batches done are not asked again."""
    principal = caller.principal
    assert principal is not None
    checkpoint = _checkpoint(folder)
    if checkpoint is None:
        files, errors = TypeFiles(folder, url), TypeFiles(folder, url)
        outcomes = Outcomes(errors)
        asked = _matched(svc, patients, outcomes)
        done: dict[str, int] = {}
        _write_durably(folder / COHORT, asked)  # once: a checkpoint names only batches
        _save(folder, done, files, errors, progress)
    else:
        files = TypeFiles(folder, url, checkpoint["files"])
        errors = TypeFiles(folder, url, checkpoint["errors"])
        outcomes = Outcomes(errors)
        cohort = json.loads((folder / COHORT).read_bytes())
        asked = [(patient, pseudonym) for patient, pseudonym in cohort]
        done = checkpoint["done"]
        progress["resources"] = checkpoint["resources"]
    peers = SignedPeers(
        svc.chain_store, svc.config.node_id, keys.load_private_key(svc.config.ed25519_key)
    )
    try:
        for source in request.sources:
            for number, start in enumerate(range(0, len(asked), MOST_REQUESTS)):
                if number < done.get(source, 0):
                    continue
                batch = {str(uuid.uuid4()): pair for pair in asked[start : start + MOST_REQUESTS]}
                end = start + len(batch)
                progress["now"] = f"{source}, patients {start + 1}-{end} of {len(asked)}"
                advance(0)  # the job's heartbeat (and a cancelled job stops here)
                try:
                    _ask(svc, caller, peers, source, request, batch, files.write, advance, outcomes)
                except (PeerUnavailable, LedgerError) as exc:
                    outcomes.add("transient", f"{source}: {exc}")
                done[source] = number + 1
                _save(folder, done, files, errors, progress)
    finally:
        files.close()
        errors.close()
    (folder / CHECKPOINT).unlink()
    (folder / COHORT).unlink()
    return files.output, errors.output


def _matched(svc: Services, patients: list[str], outcomes: Outcomes) -> list[tuple[str, str]]:
    """(patient, pseudonym) of each of ``patients`` that members can be asked about; each
    other is an outcome."""
    asked = []
    for patient in patients:
        pseudonym = pseudonym_of_patient(svc.database.engine, patient)
        if pseudonym is None:
            outcomes.add(
                "not-found",
                f"Patient/{patient} has no identifier of {svc.config.identifier_system}, which "
                "members match patients by: it was not asked for",
                patient,
            )
        else:
            asked.append((patient, pseudonym))
    return asked


def _checkpoint(folder: Path) -> dict[str, Any] | None:
    """The last checkpoint of an export in ``folder``, or None when it has none."""
    try:
        checkpoint: dict[str, Any] = json.loads((folder / CHECKPOINT).read_bytes())
    except FileNotFoundError:
        return None
    return checkpoint


def _save(
    folder: Path,
    done: dict[str, int],
    files: TypeFiles,
    errors: TypeFiles,
    progress: dict[str, Any],
) -> None:
    """Record how far the export is, once what it wrote is on disk (replaced atomically)."""
    checkpoint = {
        "done": done,
        "files": files.standing(),
        "errors": errors.standing(),
        "resources": progress.get("resources", 0),
    }
    _write_durably(folder / CHECKPOINT, checkpoint)


def _write_durably(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, synced, replacing what was there at once."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(json.dumps(value).encode())
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def has_checkpoint(folder: Path) -> bool:
    """Whether an export from members in ``folder`` stopped after a checkpoint."""
    return (folder / CHECKPOINT).exists()


def _ask(
    svc: Services,
    caller: Caller,
    peers: SignedPeers,
    source: str,
    request: Any,
    batch: dict[str, tuple[str, str]],
    write: Callable[[str, bytes], None],
    advance: Callable[[int], None],
    outcomes: Outcomes,
) -> None:
    """One batch of patients from one source (see the module docstring)."""
    principal = caller.principal
    assert principal is not None
    proofs = record_questions(
        svc,
        [(request_id, pseudonym) for request_id, (_, pseudonym) in batch.items()],
        principal.username,
        request.purpose,
        list(request.categories),
        request.study_hash,
    )
    body = {
        "purpose": request.purpose,
        "categories": list(request.categories),
        "since": request.since,
        "types": list(request.types),
        "requests": [
            {"request_id": request_id, "patient": pseudonym, "asked": proof}
            for (request_id, (_, pseudonym)), proof in zip(batch.items(), proofs, strict=True)
        ],
    }
    received: dict[str, list[tuple[str, str]]] = {request_id: [] for request_id in batch}
    decisions: dict[str, dict[str, Any]] = {}
    try:
        lines = peers.lines(source, "/peer/export", body, READ_SECONDS, MAX_LINE)
        decisions = _decisions(source, next(lines, b""), set(batch))
        _receive(svc, source, request, decisions, lines, write, advance, received)
    finally:  # what was asked and received is audited, whatever became of the rest
        for request_id, (patient, _) in batch.items():
            _audit(
                svc,
                caller,
                source,
                request,
                patient,
                decisions.get(request_id),
                received[request_id],
                outcomes,
            )


def _receive(
    svc: Services,
    source: str,
    request: Any,
    decisions: dict[str, dict[str, Any]],
    lines: Iterator[bytes],
    write: Callable[[str, bytes], None],
    advance: Callable[[int], None],
    received: dict[str, list[tuple[str, str]]],
) -> None:
    """Check and write the released resources as they arrive (see the module docstring)."""
    owner = {
        digest: request_id
        for request_id, decision in decisions.items()
        for digest in decision.get("released", [])
    }
    base = svc.chain_store.roster().member(source)["url"].rstrip("/") + "/fhir"
    for line in _counted(lines, advance):
        digest = hashlib.sha256(line).hexdigest()
        request_id = owner.pop(digest, None)
        if request_id is None:
            raise PeerUnavailable(
                f"{source} sent a resource (sha256 {digest}) it did not record releasing, "
                "or sent it twice"
            )
        resource = parse_json(line)
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        if kind not in request.types:
            raise PeerUnavailable(f"{source} sent a {kind} resource, which was not asked for")
        write(str(kind), line)
        received[request_id].append((f"{base}/{kind}/{resource.get('id')}", digest))
    if owner:
        raise PeerUnavailable(
            f"{source} recorded releasing {len(owner)} resource(s) it did not send"
        )


def _audit(
    svc: Services,
    caller: Caller,
    source: str,
    request: Any,
    patient: str,
    decision: dict[str, Any] | None,
    received: list[tuple[str, str]],
    outcomes: Outcomes,
) -> None:
    """One patient's AuditEvent (and, for a deny, its OperationOutcome)."""
    purpose = f"{request.purpose} for {request.study}" if request.study else request.purpose
    asked = f"$export from {source} ({purpose}, {', '.join(request.categories)})"
    if decision is None:
        text, permitted = f"{asked}: no decision received", False
    elif not decision["holds"]:
        text, permitted = f"{asked}: {source} holds no records of the patient", True
    else:
        decided = decision["decided"]
        where = f"recorded on {decided.get('chain')} seq {decided.get('seq')}"
        permitted = decision["decision"] == "permit"
        text = f"{asked}: {decision['decision']} ({where}), {len(received)} received"
        if not permitted:
            reason = "; ".join(map(str, decision["reasons"])) or "no reason given"
            outcomes.add("forbidden", f"{source} denied it ({where}): {reason}", patient)
    svc.audit.record(
        caller.record(
            "operation",
            outcome="0" if permitted else "4",
            description=text,
            patients={patient},
            query=request.url,
            received=received,
        )
    )


def _decisions(source: str, line: bytes, asked: set[str]) -> dict[str, dict[str, Any]]:
    """The first line of a source's answer: a decision for each request asked, by request
    id; PeerUnavailable naming what is wrong with it."""
    try:
        head = parse_json(line)
    except LedgerError as exc:
        raise PeerUnavailable(f"{source} answered without its decisions: {exc}") from None
    items = head.get("decisions") if isinstance(head, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise PeerUnavailable(f"{source} answered without a list of decisions")
    decisions = {str(item.get("request_id")): item for item in items}
    if set(decisions) != asked or len(items) != len(asked):
        raise PeerUnavailable(f"{source} did not answer each request asked exactly once")
    for item in decisions.values():
        if item.get("holds") is True:
            if item.get("decision") not in ("permit", "deny") or not isinstance(
                item.get("decided"), dict
            ):
                raise PeerUnavailable(f"{source} sent a decision without where it is recorded")
            released = item.get("released")
            if not isinstance(released, list) or (item["decision"] == "deny" and released):
                raise PeerUnavailable(f"{source} sent a decision with a wrong release list")
            if not isinstance(item.get("reasons"), list):
                raise PeerUnavailable(f"{source} sent a decision without its reasons")
        elif item.get("holds") is not False:
            raise PeerUnavailable(f"{source} did not say whether it holds a patient")
    return decisions


def _counted(lines: Iterator[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    """The lines, calling ``advance`` every thousand (the job's heartbeat)."""
    pending = 0
    for line in lines:
        yield line
        pending += 1
        if pending == 1000:
            advance(pending)
            pending = 0
    advance(pending)

"""DICOMweb under consent: who may read which study of this node's PACS, the reads themselves
streamed from the PACS, and the relay through which this node's users read another member's.

Three callers (docs/node.md, Images; docs/spec.md §15.7):

- **A local user** (a bearer token or a signed-in doctor) reads with what its role or scopes
  allow of ``ImagingStudy`` (:func:`read_local`). A request confined to one study must name a
  study this node holds (taken in from the PACS), so that its reading is recorded as an
  AuditEvent in the patient's compartment; a patient's token reads its own studies only, and
  may not search across studies.
- **A member** (a request signed with its node key) reads only studies it has a grant for
  (:func:`read_for_member`), and only by study: a search must name one ``StudyInstanceUID``.
  Its grant is either a permitted ``access.decided`` on this node's chain, made for it within
  ``dicomweb.grant_seconds``, that released this study's ImagingStudy and that the policy
  still permits over this node's copy of the ledger now (a revocation recorded since ends it)
  — or a consult this node asked it to read. Its first read of a study under a grant, and
  every refusal, are recorded on this node's chain as ``images.read`` (pseudonym, member,
  the ImagingStudy's hash, permit or deny with the reason, what the grant was): the patient
  sees them in the portal and the auditor checks each against its grant.
- **This node's users reading another member's study** go through :func:`relay`
  (``/dicomweb/members/<id>/…``): the request goes on to the member signed with this node's
  key, and the answer streams back.

Every answer streams: bytes go from the PACS to the client in chunks, so a study of any size
never sits in memory. The URLs a PACS writes into its JSON (``RetrieveURL``,
``BulkDataURI``) are rewritten to this node's, chunk by chunk, so that clients never learn the
PACS's address. Decisions are kept for ten seconds per process, and AuditEvents and refusal
entries are written at most once a minute per reader and study: a viewer's hundreds of frame
requests cost one decision and one record, not hundreds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import requests

from consent.policy import CONSENT_TYPES, AccessRequest, decide
from exchange.reading import CANCELLED, REQUESTED
from fhir_adapters.dicom import DICOM_UID_SYSTEM
from fhir_adapters.errors import FhirError, Forbidden, NotFound
from fhir_adapters.store import Stored
from fhir_adapters.store.search import EVERYONE, Access, parse_search
from ledger import keys
from ledger.errors import LedgerError
from ledger.model import format_time, parse_time
from node.consortium.signing import sign_request
from node.flows.dicomweb_paths import Target, parse_target
from node.flows.permissions import permit, refuse
from node.records.audit_trail import Caller
from node.records.pseudonym_index import pseudonym_of_patient
from node.services import Services

CHUNK_BYTES = 256 * 1024
CONNECT_SECONDS = 2.0
DECISION_SECONDS = 10.0  # a member's grant, or its refusal, is decided again after this long
RECORD_SECONDS = 60.0  # an AuditEvent (or a refusal entry) per reader and study at most this often
CONSULT_GRANT = timedelta(days=30)  # a reader reads a consult's study this long after the request
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Location", "Warning")
JSON_TYPES = ("application/dicom+json", "application/json")
OFFLOADED = ("retrieve", "frames", "rendered", "thumbnail", "bulkdata")  # no URL to rewrite
_local = threading.local()  # one keep-alive session per thread


class PacsUnavailable(FhirError):
    """503: the PACS (this node's, or a member's through its node) could not be reached."""

    status = 503
    code = "transient"


@dataclass
class Answer:
    """A streamed answer: status, headers to pass on, the body's chunks, and what to call once
    it is sent (or abandoned)."""

    status: int
    headers: dict[str, str]
    chunks: Iterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)


@dataclass(frozen=True)
class Grant:
    """Why a member may read a study: ``basis`` is ``{"access": request_id}`` (an
    ``access.decided`` permit) or ``{"consult": consult_id}``."""

    basis: dict[str, str]
    patient: str  # pseudonym
    study_hash: str  # of the ImagingStudy version granted


@dataclass(frozen=True)
class Study:
    """A study this node holds: its ImagingStudy and the local Patients it belongs to."""

    stored: Stored
    patients: frozenset[str]


_decisions: dict[tuple[int, str, str], tuple[float, int, Grant | str]] = {}
_recorded: dict[tuple[Any, ...], float] = {}
_studies: dict[tuple[int, str], tuple[float, Study]] = {}
_lock = threading.Lock()


# -- reading this node's PACS --------------------------------------------------------------


def read_local(
    svc: Services, caller: Caller, target: Target, accept: str | None, own_root: str
) -> Answer:
    """A local user's request, decided by its role or scopes and recorded as an AuditEvent
    (see the module docstring); the PACS's answer, streamed, its URLs rewritten to
    ``own_root`` (this node's ``/dicomweb``)."""
    access = permit(svc, caller, "ImagingStudy", "s" if target.kind == "search" else "r", "read")
    study = None
    if target.study is not None:
        study = held_study(svc, target.study)
        if study is None or not _within(access, study):
            reason = f"study {target.study} is not held here" + (
                "" if study is None else " for this caller"
            )
            refuse(svc, caller, "read", reason)
            raise NotFound(
                reason + " (a study is served once it is taken in from the PACS: "
                "hrx adapters dicomweb-sync)"
            )
    elif not access.unrestricted:
        refuse(svc, caller, "search-type", "a search across studies by a patient's token")
        raise Forbidden("a patient's token reads its own studies by UID; it may not search")
    who = caller.principal.username if caller.principal else "anonymous"
    _audit_once(svc, caller, who, target, study)
    return _from_pacs(svc, target, accept, own_root)


def read_for_member(
    svc: Services, caller: Caller, member: str, target: Target, accept: str | None
) -> Answer:
    """Member ``member``'s request (its signature verified), decided by its grant and
    recorded on this node's chain (see the module docstring); 403 saying why when it has
    none. Refusals name no more than the member could know: a study not held here is refused
    like one held without a grant."""
    if target.study is None:
        refuse(svc, caller, "search-type", f"{member} searched across studies")
        raise Forbidden(
            "a member reads by study: a search must name one StudyInstanceUID "
            "(members learn of studies through an access request or a consult)"
        )
    study = held_study(svc, target.study)
    decided = _member_decision(svc, member, target.study, study)
    if isinstance(decided, str):
        refuse(svc, caller, "read", f"{member}: DICOMweb {target.kind} refused: {decided}")
        if study is not None:
            _record_read(svc, member, target.study, study, None, decided)
        raise Forbidden(f"{svc.config.node_id} refuses: {decided}")
    assert study is not None
    _record_read(svc, member, target.study, study, decided, None)
    _audit_once(svc, caller, member, target, study, member=member)
    return _from_pacs(svc, target, accept, svc.config.url.rstrip("/") + "/dicomweb")


def held_study(svc: Services, uid: str) -> Study | None:
    """The ImagingStudy of Study Instance UID ``uid`` held here, with its patients (a study
    found is kept DECISION_SECONDS per process: a viewer asks for one study many times)."""
    now = time.monotonic()
    key = (id(svc), uid)
    with _lock:
        cached = _studies.get(key)
    if cached is not None and cached[0] > now:
        return cached[1]
    found = _find_study(svc, uid)
    if found is not None:
        with _lock:
            if len(_studies) > 10_000:
                _studies.clear()
            _studies[key] = (now + DECISION_SECONDS, found)
    return found


def _find_study(svc: Services, uid: str) -> Study | None:
    request = parse_search("ImagingStudy", [("identifier", f"{DICOM_UID_SYSTEM}|urn:oid:{uid}")])
    found = svc.store.count_matches(request, EVERYONE, 1)
    if not found:
        return None
    stored = replace(svc.store.by_pk(found[0]), res_pk=found[0])
    patients = svc.store.patients_by_item([stored]).get((stored.type, stored.id), frozenset())
    return Study(stored, patients)


def _within(access: Access, study: Study) -> bool:
    return access.patients is None or bool(study.patients & access.patients)


def _member_decision(svc: Services, member: str, uid: str, study: Study | None) -> Grant | str:
    """The member's grant to read study ``uid``, or why it has none. Kept DECISION_SECONDS;
    a refusal is decided again as soon as this node's chain grows (a grant may just have been
    recorded)."""
    key = (id(svc), member, uid)
    now = time.monotonic()
    head = svc.chain_store.head(svc.config.node_id)
    size = head.tree_size if head else 0
    with _lock:
        cached = _decisions.get(key)
    if (
        cached is not None
        and cached[0] > now
        and (isinstance(cached[2], Grant) or cached[1] == size)
    ):
        return cached[2]
    decided = _decide_member(svc, member, uid, study)
    with _lock:
        if len(_decisions) > 10_000:
            _decisions.clear()
        _decisions[key] = (now + DECISION_SECONDS, size, decided)
    return decided


def _decide_member(svc: Services, member: str, uid: str, study: Study | None) -> Grant | str:
    if member not in {m["id"] for m in svc.chain_store.roster().body["members"]}:
        return f"{member} is not a member"
    no_grant = f"{member} has no grant to read study {uid}"
    if study is None:
        return no_grant
    pseudonyms = {pseudonym_of_patient(svc.database.engine, p) for p in study.patients}
    pseudonyms.discard(None)
    if not pseudonyms:
        return no_grant
    hashes = _version_hashes(svc, study.stored)
    for patient in sorted(p for p in pseudonyms if p is not None):
        consult = consult_grant(svc, member, patient, hashes)
        if consult is not None:
            return Grant({"consult": consult[0]}, patient, consult[1])
    now = format_time()
    window = timedelta(seconds=svc.config.dicomweb_grant_seconds)
    reasons = []
    for patient in sorted(p for p in pseudonyms if p is not None):
        for entry in reversed(svc.chain_store.entries_about(patient, ("access.decided",))):
            body = entry["body"]
            if (
                entry["chain"] != svc.config.node_id
                or body.get("requester_org") != member
                or body.get("decision") != "permit"
                or not hashes & set(body.get("released", []))
            ):
                continue
            if parse_time(body["decided_at"]) + window < parse_time(now):
                reasons.append(
                    f"the access it was granted at {body['decided_at']} (request "
                    f"{body['request_id']}) is older than {window.total_seconds():.0f} s"
                )
                break
            still = _still_permitted(svc, patient, member, body, now)
            if still is not None:
                reasons.append(f"request {body['request_id']} is no longer permitted: {still}")
                break
            study_hash = next(h for h in body["released"] if h in hashes)
            return Grant({"access": body["request_id"]}, patient, study_hash)
    return "; ".join(reasons) or no_grant


def _still_permitted(
    svc: Services, patient: str, member: str, body: dict[str, Any], now: str
) -> str | None:
    """None when the policy, over this node's copy of the ledger now, still permits what the
    decision ``body`` permitted (imaging for its purpose); else the policy's reason."""
    request = AccessRequest(
        patient=patient,
        requester=member,
        purpose=str(body["purpose"]),
        categories=("imaging",),
        time=now,
        reason="stated" if body.get("reason_stated") else None,
    )
    decision = decide(svc.chain_store.entries_about(patient, CONSENT_TYPES), request)
    return None if decision.permitted else decision.reason


def _version_hashes(svc: Services, stored: Stored) -> set[str]:
    """The hashes of every version of a resource (a grant names the version it released)."""
    if stored.res_pk is None:
        return {stored.sha256()}
    pairs = [(stored.res_pk, version) for version in range(1, stored.version + 1)]
    return {item.sha256() for item in svc.store.versions_of(pairs) if not item.deleted}


def _record_read(
    svc: Services, member: str, uid: str, study: Study, grant: Grant | None, refused: str | None
) -> None:
    """``images.read`` on this node's chain: the first read of a study under each grant,
    and refusals at most once a minute per member and study."""
    basis = (
        f"deny:{refusal_code(refused or '')}"
        if grant is None
        else ",".join(f"{k}:{v}" for k, v in grant.basis.items())
    )
    if not _first_in(svc, ("images.read", member, uid, basis), RECORD_SECONDS if refused else None):
        return
    if grant is None:
        pseudonyms = sorted(
            found
            for found in (pseudonym_of_patient(svc.database.engine, p) for p in study.patients)
            if found is not None
        )
        if not pseudonyms:
            return  # no pseudonym: nothing to say on the ledger about whom
        patient, study_hash = pseudonyms[0], study.stored.sha256()
    else:
        patient, study_hash = grant.patient, grant.study_hash
        for entry in svc.chain_store.entries_about(patient, ("images.read",)):
            body = entry["body"]
            if (
                entry["chain"] == svc.config.node_id
                and body.get("requester_org") == member
                and body.get("basis") == grant.basis
                and body.get("study") == study_hash
            ):
                return  # recorded by another process, or before a restart
    try:
        svc.consents.chain_writer().append(
            "images.read",
            {
                "patient": patient,
                "requester_org": member,
                "study": study_hash,
                "decision": "deny" if grant is None else "permit",
                "reason": refusal_code(refused) if refused else "",
                "basis": None if grant is None else grant.basis,
            },
        )
    except LedgerError as exc:
        raise PacsUnavailable(f"the read could not be recorded on the ledger: {exc}") from None


def refusal_code(reason: str) -> str:
    """What a refusal's reason says, as the code ``images.read`` records (the reason's words
    name the study's UID, which stays off the ledger)."""
    if "is no longer permitted" in reason:
        return "no-longer-permitted"
    if " is older than " in reason:
        return "grant-expired"
    return "no-grant"


def _first_in(svc: Services, key: tuple[str, ...], seconds: float | None) -> bool:
    """Whether this is the first time ``key`` is seen in this process (within ``seconds``
    when given: then it is seen again once they have passed)."""
    now = time.monotonic()
    full = (id(svc), *key)
    with _lock:
        seen = _recorded.get(full)
        if seen is not None and (seconds is None or now - seen < seconds):
            return False
        if len(_recorded) > 100_000:
            _recorded.clear()
        _recorded[full] = now
    return True


def _audit_once(
    svc: Services,
    caller: Caller,
    who: str,
    target: Target,
    study: Study | None,
    *,
    member: str | None = None,
) -> None:
    """An AuditEvent of the read, at most once a minute per reader and study (every search
    across studies is recorded, with its query)."""
    if study is not None and not _first_in(svc, ("audit", who, study.stored.id), RECORD_SECONDS):
        return
    asker = f"{member} (member)" if member else who
    what = f"study {target.study}" if target.study else "studies"
    svc.audit.record(
        caller.record(
            "search-type" if study is None else "read",
            description=f"DICOMweb {target.kind} of {what} by {asker}"
            + ("" if study is None else "; further reads of it within a minute not recorded"),
            entities=[] if study is None else [study.stored],
            patients=set() if study is None else set(study.patients),
            query=None if study is not None else f"{target.upstream}?{urlencode(target.params)}",
        )
    )


def _session() -> requests.Session:
    """This thread's keep-alive session. It ignores the environment's proxies and .netrc: the
    PACS and the members are reached at the URLs configured (and reading those settings on
    every request cost a third of the proxy's time)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


def _from_pacs(svc: Services, target: Target, accept: str | None, own_root: str) -> Answer:
    """The PACS's answer to ``target``, streamed, its URLs rewritten to ``own_root``; or,
    for images when ``dicomweb.offload`` names the proxy's internal location, the proxy's
    instruction to send them itself (:func:`offloaded`)."""
    root = svc.config.dicomweb_url
    if not root:
        raise NotFound("this node serves no images: no PACS is configured (dicomweb.url)")
    if svc.config.dicomweb_offload and target.kind in OFFLOADED:
        return offloaded(svc.config.dicomweb_offload, target, accept)
    public = public_root(root)
    try:
        response = _session().get(
            _with_query(f"{root}/{target.upstream}", target.params),
            headers={"Accept": pacs_accept(target.kind, accept)},
            stream=True,
            timeout=(CONNECT_SECONDS, svc.config.dicomweb_timeout_ms / 1000),
        )
    except requests.RequestException as exc:
        raise PacsUnavailable(
            f"the PACS at {public} cannot be reached ({type(exc).__name__}); try again later"
        ) from None
    return _streamed(response, public, own_root, f"the PACS at {public}")


def offloaded(location: str, target: Target, accept: str | None) -> Answer:
    """An empty answer telling the proxy in front (nginx's X-Accel-Redirect) to send the
    PACS's answer to ``target`` from its internal ``location``, with the Accept header the
    PACS needs (``X-Hrx-Pacs-Accept``, which the location passes on). The proxy then moves
    the bytes; the node has decided and recorded the read as for any other."""
    return Answer(
        200,
        {
            "X-Accel-Redirect": _with_query(f"{location}/{target.upstream}", target.params),
            "X-Accel-Buffering": "no",
            "X-Hrx-Pacs-Accept": pacs_accept(target.kind, accept),
        },
        iter(()),
    )


def pacs_accept(kind: str, accept: str | None) -> str:
    """The Accept header to send the PACS. A client that takes frames or bulk data of any
    type (``multipart/related; type="*/*"``, dicomweb-client's default, or no Accept) is
    asked for them as stored (``transfer-syntax=*``, PS3.18 §8.7.3.5.2): Orthanc refuses the
    wildcard itself."""
    if kind in ("frames", "bulkdata"):
        wildcard = accept is None or accept.strip() in ("*/*", "multipart/related")
        if wildcard or re.search(r'type="?\*/\*"?', accept or ""):
            return 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    return accept or "*/*"


def _streamed(response: requests.Response, their_root: str, own_root: str, who: str) -> Answer:
    """A streamed answer from ``response``: 2xx passed on (JSON with ``their_root`` rewritten
    to ``own_root``), anything else a clear error naming ``who`` (not the body: a PACS's
    error may say more than a client should learn)."""
    if response.status_code >= 300:
        status = response.status_code
        response.close()
        if status == 404:
            raise NotFound(f"{who} holds no such resource")
        if status in (400, 406, 415):
            raise FhirError(f"{who} refused the request with {status}", status=status)
        if status in (401, 403):
            raise Forbidden(f"{who} refused the request with {status}")
        raise PacsUnavailable(f"{who} answered {status}; try again later")
    headers = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
    chunks: Iterator[bytes] = response.iter_content(CHUNK_BYTES)
    if headers.get("Content-Type", "").split(";")[0].strip() in JSON_TYPES:
        headers.pop("Content-Length", None)
        chunks = rewritten(chunks, their_root.encode(), own_root.encode())
    return Answer(response.status_code, headers, chunks, response.close)


def rewritten(chunks: Iterator[bytes], old: bytes, new: bytes) -> Iterator[bytes]:
    """``chunks`` with every ``old`` replaced by ``new``, also where ``old`` spans chunks."""
    held = b""
    for chunk in chunks:
        data = (held + chunk).replace(old, new)
        keep = next(
            (k for k in range(min(len(old) - 1, len(data)), 0, -1) if data.endswith(old[:k])), 0
        )
        held = data[len(data) - keep :] if keep else b""
        if len(data) > keep:
            yield data[: len(data) - keep]
    if held:
        yield held


def _with_query(url: str, params: tuple[tuple[str, str], ...]) -> str:
    """``url`` with ``params``, commas left as they are: DICOMweb lists values with commas
    (``viewport=128,128``, ``includefield=a,b``) and Orthanc does not decode ``%2C``."""
    query = urlencode(list(params), safe=",")
    return f"{url}?{query}" if query else url


def public_root(url: str) -> str:
    """A DICOMweb root without the credentials it may carry (as the PACS writes its URLs)."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}".rstrip("/")


# -- reading another member's ---------------------------------------------------------------


def relay(
    svc: Services,
    caller: Caller,
    member: str,
    target: Target,
    accept: str | None,
    own_root: str,
) -> Answer:
    """A local user's request for member ``member``'s study: sent on signed with this node's
    key, the answer streamed back with the member's URLs rewritten to ``own_root`` (this
    node's ``/dicomweb/members/<id>``). Recorded here as an AuditEvent (the patient is the
    member's to name: the member records the read on its chain)."""
    permit(svc, caller, "ImagingStudy", "s" if target.kind == "search" else "r", "read")
    if member == svc.config.node_id:
        raise NotFound(f"{member} is this node: its studies are at /dicomweb")
    try:
        base = svc.chain_store.roster().member(member)["url"].rstrip("/")
    except LedgerError:
        raise NotFound(f"{member} is not a member of this consortium") from None
    url = _with_query(f"{base}/dicomweb/{_client_path(target)}", target.params)
    headers = sign_request(
        svc.config.node_id,
        keys.load_private_key(svc.config.ed25519_key),
        "GET",
        url,
        b"",
        {"Accept": accept or "*/*"},
    )
    who = caller.principal.username if caller.principal else "anonymous"
    if _first_in(svc, ("relay", who, member, target.study or url), RECORD_SECONDS):
        what = f"study {target.study}" if target.study else "studies"
        svc.audit.record(
            caller.record(
                "read" if target.study else "search-type",
                description=f"DICOMweb {target.kind} of {what} at {member} by {who}; further "
                "reads of it within a minute not recorded",
            )
        )
    try:
        response = _session().get(
            url,
            headers=headers,
            stream=True,
            timeout=(CONNECT_SECONDS, svc.config.exchange_timeout_ms / 1000),
        )
    except requests.RequestException as exc:
        raise PacsUnavailable(
            f"{member} at {base} cannot be reached ({type(exc).__name__}); try again later"
        ) from None
    if response.status_code == 403:
        why = _reason_of(response)
        response.close()
        raise Forbidden(why or f"{member} refused the request")
    return _streamed(response, f"{base}/dicomweb", own_root, member)


def _client_path(target: Target) -> str:
    """The path a client asked for (a thumbnail is asked for as a thumbnail)."""
    if target.kind != "thumbnail":
        return target.upstream
    return target.upstream.removesuffix("/rendered") + "/thumbnail"


def _reason_of(response: requests.Response) -> str | None:
    try:
        reason = response.json().get("error")
    except ValueError:
        return None
    return reason if isinstance(reason, str) else None


def consult_grant(
    svc: Services, member: str, patient: str, hashes: set[str]
) -> tuple[str, str] | None:
    """(consult id, study hash) of an open consult this node asked ``member`` to read, of one
    of these ImagingStudy versions; None when there is none."""
    entries = svc.chain_store.entries_about(patient, (REQUESTED, CANCELLED))
    cancelled = {
        e["body"].get("consult_id")
        for e in entries
        if e["type"] == CANCELLED and e["chain"] == svc.config.node_id
    }
    for entry in reversed(entries):
        body = entry["body"]
        if (
            entry["type"] == REQUESTED
            and entry["chain"] == svc.config.node_id
            and body.get("reader_org") == member
            and body.get("study") in hashes
            and body.get("consult_id") not in cancelled
            and parse_time(entry["time"]) + CONSULT_GRANT > datetime.now(UTC)
        ):
            return str(body["consult_id"]), str(body["study"])
    return None


# -- a study's outline, for the viewer ------------------------------------------------------

MAX_OUTLINE_BYTES = 32 * 1024 * 1024
SERIES_UID, SERIES_NUMBER, MODALITY, DESCRIPTION = "0020000E", "00200011", "00080060", "0008103E"
INSTANCE_UID, INSTANCE_NUMBER, FRAME_COUNT = "00080018", "00200013", "00280008"


@dataclass(frozen=True)
class SeriesOutline:
    """One series of a study as a viewer scrolls it: its frames in order, each as (SOP
    Instance UID, frame number)."""

    uid: str
    number: int | None
    modality: str
    description: str
    frames: list[tuple[str, int]]


def outline(svc: Services, caller: Caller, member: str, study: str) -> list[SeriesOutline]:
    """The series of ``study`` held by ``member`` (this node or another member, read as
    :func:`read_local` or :func:`relay` read it), by series number, each with its frames by
    instance number."""
    found = []
    for series in _searched(svc, caller, member, f"studies/{study}/series", []):
        uid = _first(series, SERIES_UID)
        if not uid:
            continue
        instances = _searched(
            svc,
            caller,
            member,
            f"studies/{study}/series/{uid}/instances",
            [("includefield", f"{INSTANCE_NUMBER},{FRAME_COUNT}")],
        )
        ordered = sorted(
            instances, key=lambda i: (_number(i, INSTANCE_NUMBER) or 0, _first(i, INSTANCE_UID))
        )
        frames = [
            (str(_first(instance, INSTANCE_UID)), frame)
            for instance in ordered
            if _first(instance, INSTANCE_UID)
            for frame in range(1, (_number(instance, FRAME_COUNT) or 1) + 1)
        ]
        found.append(
            SeriesOutline(
                uid=str(uid),
                number=_number(series, SERIES_NUMBER),
                modality=str(_first(series, MODALITY) or ""),
                description=str(_first(series, DESCRIPTION) or ""),
                frames=frames,
            )
        )
    return sorted(found, key=lambda s: (s.number is None, s.number or 0, s.uid))


def _searched(
    svc: Services, caller: Caller, member: str, path: str, params: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The DICOM JSON of a QIDO-RS search, through this node's own PACS or a member's."""
    target = parse_target(path, params)
    root = svc.config.url.rstrip("/") + "/dicomweb"
    accept = "application/dicom+json"
    if member == svc.config.node_id:
        answer = read_local(svc, caller, target, accept, root)
    else:
        answer = relay(svc, caller, member, target, accept, f"{root}/members/{member}")
    try:
        body, size = [], 0
        for chunk in answer.chunks:
            size += len(chunk)
            if size > MAX_OUTLINE_BYTES:
                raise PacsUnavailable(f"{member}'s answer to {path} is over 32 MB")
            body.append(chunk)
    finally:
        answer.close()
    if answer.status == 204 or not body:
        return []
    try:
        found = json.loads(b"".join(body))
    except ValueError:
        raise PacsUnavailable(f"{member} answered {path} with what is not DICOM JSON") from None
    return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _number(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None

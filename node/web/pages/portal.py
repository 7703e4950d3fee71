"""The patient portal at ``/portal``: sign in, grant, narrow and revoke consent, see who
accessed my records, download receipts.

Server-rendered (Flask + Jinja), with no JavaScript: every action is a form. Chinese by
default, English by a link (a cookie remembers it). Pages are small and fit a phone screen.

Security: sessions are server-side (:mod:`node.identity.sessions`), in an ``HttpOnly``
``SameSite=Lax`` cookie scoped to ``/portal`` that is also ``Secure`` whenever the request came
over TLS (set
``server.trusted_proxies`` when TLS ends at a proxy in front). Every form carries a CSRF token:
the session's, or before sign-in a double-submit cookie. Sign-ins go through the throttles of
:mod:`node.identity.users` and are audited (:func:`node.web.auth_api.password_sign_in`); a
throttled one is answered 429 with how long to wait. A patient reaches only their own
consents, accesses and receipts: every page and receipt is looked up from the session's
patient, never from a parameter. Consents are written through the same store and observer as
the FHIR API (:mod:`node.records.consents`), so they go on the ledger the same way, and each
is audited.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from consent.model import (
    ALL_MEMBERS,
    CARE_PURPOSES,
    CATEGORIES,
    MEMBER_SYSTEM,
    PURPOSES,
    consent_resource,
    is_exchange_consent,
)
from consent.policy import CONSENT_TYPES, effective_consents
from fhir_adapters.errors import FhirError, PreconditionFailed
from fhir_adapters.store import Stored
from fhir_adapters.store.search import Access, parse_search
from ledger.canonical import canonical_bytes
from ledger.errors import LedgerError
from node.base.errors import UserError
from node.flows import patient_history
from node.flows.patient_history import ACCESS_TYPES
from node.flows.prior_results import rules
from node.identity.sessions import Session, redeem_enrollment
from node.identity.tokens import Principal
from node.identity.users import SignIn, User
from node.records.audit_trail import AuditRecord
from node.services import Services
from node.web.auth_api import password_sign_in
from node.web.pages.browser_sessions import BrowserSessions
from node.web.pages.reasons import in_zone
from node.web.pages.text import HTML_LANG, LANGUAGES, translate

bp = Blueprint(
    "portal",
    __name__,
    url_prefix="/portal",
    template_folder="templates",
)

WEB = BrowserSessions("portal", "/portal", ("patient",))
LANGUAGE_COOKIE = "hrx_lang"
STYLE = (Path(__file__).with_name("static") / "portal.css").read_bytes()  # read once
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def services() -> Services:
    found: Services = current_app.extensions["hrx"]
    return found


# -- language, cookies, headers --------------------------------------------------------------


def language() -> str:
    chosen = request.cookies.get(LANGUAGE_COOKIE)
    return chosen if chosen in LANGUAGES else "zh"


@bp.app_template_global("t")
def t(key: str) -> str:
    return translate(language(), key)


@bp.before_request
def switch_language() -> ResponseReturnValue | None:
    wanted = request.args.get("lang")
    if wanted is None or request.method != "GET":
        return None
    response = redirect(request.path, 303)
    if wanted in LANGUAGES:
        WEB.set_cookie(response, LANGUAGE_COOKIE, wanted, max_age=365 * 24 * 3600)
    return response


@bp.after_request
def security_headers(response: Response) -> Response:
    WEB.after_request(response)
    return response


@bp.errorhandler(HTTPException)
def portal_error(exc: HTTPException) -> ResponseReturnValue:
    message = t("not_found") if exc.code == 404 else (exc.description or exc.name)
    return render_template("portal/error.html", message=message), exc.code or 500


@bp.app_template_filter("local_time")
def local_time(moment: str) -> str:
    """A ledger time or FHIR instant as the consortium's local time, to the second
    (``2026-11-22 16:00:00``); anything else as it is."""
    return in_zone(rules(services()).zone, "%Y-%m-%d %H:%M:%S")(moment)


@bp.app_context_processor
def page_context() -> dict[str, Any]:
    if not request.path.startswith(bp.url_prefix or "/portal"):
        return {}
    return {
        "html_lang": HTML_LANG[language()],
        "other_language": "en" if language() == "zh" else "zh",
        "session": WEB.current(),
        "csrf_token": WEB.csrf_token(),
        "hospital": services().config.name,
    }


# -- sessions and CSRF ---------------------------------------------------------------------


def current_session() -> Session | None:
    return WEB.current()


def check_csrf() -> None:
    WEB.check_csrf(t("form_expired"))


def signed_in(view: Callable[..., ResponseReturnValue]) -> Callable[..., ResponseReturnValue]:
    def wrapped(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        session = current_session()
        if session is None:
            return redirect(url_for("portal.signin"), 303)
        if request.method == "POST":
            check_csrf()
        return view(session, *args, **kwargs)

    wrapped.__name__ = view.__name__
    wrapped.__doc__ = view.__doc__
    return wrapped


# -- signing in and out ----------------------------------------------------------------------


@bp.get("/")
def home() -> ResponseReturnValue:
    target = "portal.consents" if current_session() else "portal.signin"
    return redirect(url_for(target), 303)


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> ResponseReturnValue:
    if request.method == "GET":
        notice = {"out": t("signed_out"), "enrolled": t("enrolled")}.get(
            request.args.get("done", "")
        )
        return render_template("portal/signin.html", notice=notice)
    check_csrf()
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    response = redirect(url_for("portal.consents"), 303)

    def start(user: User) -> str:
        WEB.start(response, user)
        return "portal"

    result = SignIn(None, 0, "")
    if username and password:
        result = password_sign_in(username, password, ("patient",), "portal sign-in", start)
    if result.user is not None:
        return response
    if result.retry_after:
        minutes = -(-result.retry_after // 60)
        page = render_template(
            "portal/signin.html",
            error=t("sign_in_throttled").format(minutes=minutes),
            username=username,
        )
        return page, 429, {"Retry-After": str(result.retry_after)}
    return render_template("portal/signin.html", error=t("sign_in_failed"), username=username), 401


@bp.post("/signout")
def signout() -> ResponseReturnValue:
    response = redirect(url_for("portal.signin", done="out"), 303)
    if current_session() is not None:
        check_csrf()
        WEB.end(response)
    return response


@bp.route("/enroll", methods=["GET", "POST"])
def enroll() -> ResponseReturnValue:
    if request.method == "GET":
        return render_template("portal/enroll.html")
    check_csrf()
    form = request.form
    if form.get("password", "") != form.get("password_again", ""):
        return render_template("portal/enroll.html", error=t("passwords_differ"), form=form), 400
    try:
        redeem_enrollment(
            services().database.write_engine,
            form.get("code", ""),
            form.get("username", "").strip(),
            form.get("password", ""),
        )
    except UserError as exc:
        return render_template("portal/enroll.html", error=str(exc), form=form), 400
    return redirect(url_for("portal.signin", done="enrolled"), 303)


# -- consents --------------------------------------------------------------------------------


@dataclass
class ConsentView:
    """One consent as the consents page shows it."""

    id: str
    version: int
    status: str
    grantees: list[str]  # member ids, or ["*"]
    categories: list[str]
    purposes: list[str]
    start: str | None
    end: str | None
    entries: list[dict[str, Any]]  # its ledger entries (for receipts)


def member_names() -> dict[str, str]:
    try:
        members = services().chain_store.roster().body["members"]
    except LedgerError:
        return {}
    return {m["id"]: m.get("name") or m["id"] for m in members}


def my_pseudonym(session: Session) -> str | None:
    try:
        patient = services().store.read("Patient", session.patient_id).resource()
    except FhirError:
        return None
    return services().consents.pseudonym_of(patient)


def my_consents(session: Session) -> list[Stored]:
    search = parse_search(
        "Consent", [("patient", session.patient_id), ("_sort", "-_lastUpdated"), ("_count", "200")]
    )
    store = services().store
    matches = store.search(
        search, Access(frozenset({session.patient_id})), f"portal|{session.username}"
    )
    return [s for s in store.versions_of(matches.pairs) if s.body is not None]


def consent_view(stored: Stored, entries: list[dict[str, Any]]) -> ConsentView:
    resource = stored.resource()
    provision = resource.get("provision") or {}
    grantees = [
        a["reference"]["identifier"]["value"]
        for a in provision.get("actor", [])
        if a.get("reference", {}).get("identifier", {}).get("system") == MEMBER_SYSTEM
    ]
    period = provision.get("period") or {}
    return ConsentView(
        id=stored.id,
        version=stored.version,
        status=str(resource.get("status")),
        grantees=grantees or [ALL_MEMBERS],
        categories=[c["code"] for c in provision.get("class", [])] or list(CATEGORIES),
        purposes=[p["code"] for p in provision.get("purpose", [])] or list(CARE_PURPOSES),
        start=period.get("start"),
        end=period.get("end"),
        entries=[e for e in entries if e["body"].get("consent_id") == stored.id],
    )


@bp.get("/consents")
@signed_in
def consents(session: Session) -> ResponseReturnValue:
    return _consents_page(session)


def _consents_page(
    session: Session, *, error: str | None = None, form: Any = None, status: int = 200
) -> ResponseReturnValue:
    own = services().config.node_id
    pseudonym = my_pseudonym(session)
    entries = services().chain_store.entries_about(pseudonym, CONSENT_TYPES) if pseudonym else []
    here = [e for e in entries if e["chain"] == own]
    views = [
        consent_view(stored, here)
        for stored in my_consents(session)
        if is_exchange_consent(stored.resource())
    ]
    elsewhere = [c for c in effective_consents(entries, pseudonym or "") if c.chain != own]
    notice = {"saved": t("saved"), "revoked": t("revoked")}.get(request.args.get("done", ""))
    return (
        render_template(
            "portal/consents.html",
            consents=views,
            elsewhere=elsewhere,
            members=member_names(),
            categories=CATEGORIES,
            purposes=PURPOSES,
            notice=notice,
            error=error,
            form=form,
            can_consent=pseudonym is not None,
        ),
        status,
    )


def _terms_from_form() -> tuple[list[str], list[str], list[str], str | None, str | None]:
    form = request.form
    grantees = form.getlist("grantee")
    if ALL_MEMBERS in grantees:
        grantees = [ALL_MEMBERS]
    categories = [c for c in form.getlist("category") if c in CATEGORIES]
    purposes = [p for p in form.getlist("purpose") if p in PURPOSES]
    if not grantees or not categories or not purposes:
        raise ValueError(t("choose_one"))
    start, end = form.get("start", "").strip() or None, form.get("end", "").strip() or None
    for value in (start, end):
        if value is not None and not DATE.fullmatch(value):
            raise ValueError(t("bad_date"))
    return grantees, categories, purposes, start, end


def _audit(writer: Any, session: Session, interaction: str, stored: Stored) -> None:
    record = AuditRecord(
        interaction=interaction,
        username=session.username,
        role="patient",
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        token_id="portal",
    )
    record.entities = [stored]
    record.patients = {session.patient_id}
    services().audit.record_in(writer, record)


@bp.post("/consents")
@signed_in
def grant(session: Session) -> ResponseReturnValue:
    try:
        resource = consent_resource(session.patient_id, *_terms_from_form())
        with services().store.writing(_actor(session)) as writer:
            stored = writer.create(resource, "Consent")
            _audit(writer, session, "create", stored)
    except (ValueError, FhirError) as exc:
        return _consents_page(session, error=_message(exc), form=request.form, status=400)
    return redirect(url_for("portal.consents", done="saved"), 303)


def _message(exc: Exception) -> str:
    if isinstance(exc, FhirError):
        return "; ".join(issue.diagnostics for issue in exc.issues)
    return str(exc)


def _my_consent(session: Session, consent_id: str) -> Stored:
    for stored in my_consents(session):
        if stored.id == consent_id and is_exchange_consent(stored.resource()):
            return stored
    abort(404)


@bp.get("/consents/<consent_id>")
@signed_in
def edit(session: Session, consent_id: str) -> ResponseReturnValue:
    stored = _my_consent(session, consent_id)
    return render_template(
        "portal/edit.html",
        consent=consent_view(stored, []),
        members=member_names(),
        categories=CATEGORIES,
        purposes=PURPOSES,
    )


def _actor(session: Session) -> Principal:
    """The signed-in patient as the one who writes (the consent recorder checks they write
    only their own consents)."""
    return Principal(session.username, "patient", (), session.patient_id, "portal")


def _change(session: Session, consent_id: str, change: Callable[[dict[str, Any]], None]) -> Stored:
    stored = _my_consent(session, consent_id)
    resource = stored.resource()
    resource.pop("meta", None)
    change(resource)
    with services().store.writing(_actor(session)) as writer:
        updated, _ = writer.update(
            "Consent", consent_id, resource, f'W/"{request.form.get("version", "")}"'
        )
        _audit(writer, session, "update", updated)
    return updated


@bp.post("/consents/<consent_id>")
@signed_in
def narrow(session: Session, consent_id: str) -> ResponseReturnValue:
    try:
        terms = _terms_from_form()

        def apply(resource: dict[str, Any]) -> None:
            fresh = consent_resource(session.patient_id, *terms)
            resource["provision"] = fresh["provision"]
            resource["status"] = "active"

        _change(session, consent_id, apply)
    except PreconditionFailed:
        return _consents_page(session, error=t("changed_meanwhile"), status=409)
    except (ValueError, FhirError) as exc:
        stored = _my_consent(session, consent_id)
        return (
            render_template(
                "portal/edit.html",
                consent=consent_view(stored, []),
                members=member_names(),
                categories=CATEGORIES,
                purposes=PURPOSES,
                error=_message(exc),
            ),
            400,
        )
    return redirect(url_for("portal.consents", done="saved"), 303)


@bp.post("/consents/<consent_id>/revoke")
@signed_in
def revoke(session: Session, consent_id: str) -> ResponseReturnValue:
    try:
        _change(session, consent_id, lambda resource: resource.update(status="inactive"))
    except PreconditionFailed:
        return _consents_page(session, error=t("changed_meanwhile"), status=409)
    except FhirError as exc:
        return _consents_page(session, error=_message(exc), status=400)
    return redirect(url_for("portal.consents", done="revoked"), 303)


# -- who accessed my records ---------------------------------------------------------------


@dataclass
class LedgerAccess:
    """One cross-institution request for my records, and what each source decided."""

    request_id: str
    time: str
    requester: str
    purpose: str
    categories: list[str]
    decisions: list[dict[str, Any]]  # access.decided entries
    lookups: list[dict[str, Any]]  # locator.lookup entries (the registry's)
    image_reads: list[dict[str, Any]]  # images.read entries (the source's)
    emergency: bool
    entries: list[dict[str, Any]]  # every entry about it (for receipts)


def ledger_accesses(entries: list[dict[str, Any]]) -> list[LedgerAccess]:
    """The entries of a patient's history grouped by request, newest first."""
    by_request: dict[str, LedgerAccess] = {}
    for entry in entries:
        if entry["type"] not in ACCESS_TYPES:
            continue
        body = entry["body"]
        request_id = str(body.get("request_id"))
        if entry["type"] == "images.read":  # under the request that granted it, or alone
            basis = body.get("basis") or {}
            request_id = str(basis.get("access") or f"{entry['chain']}-{entry['seq']}")
        access = by_request.get(request_id)
        if access is None:
            access = by_request[request_id] = LedgerAccess(
                request_id, entry["time"], "", "", [], [], [], [], False, []
            )
        access.entries.append(entry)
        access.time = min(access.time, entry["time"])
        if entry["type"] == "access.requested":
            requester = body.get("requester") or {}
            access.requester = str(requester.get("org", entry["chain"]))
            access.purpose = str(body.get("purpose", ""))
            access.categories = list(body.get("categories") or [])
        elif entry["type"] == "access.decided":
            access.decisions.append(entry)
            access.requester = access.requester or str(body.get("requester_org", ""))
        elif entry["type"] == "locator.lookup":
            access.lookups.append(entry)
            access.requester = access.requester or str(body.get("requester_org", ""))
        elif entry["type"] == "images.read":
            access.image_reads.append(entry)
            access.requester = access.requester or str(body.get("requester_org", ""))
        else:
            access.emergency = True
            access.requester = access.requester or str(body.get("requester_org", ""))
    return sorted(by_request.values(), key=lambda a: a.time, reverse=True)


@dataclass
class LocalRead:
    time: str
    who: str
    role: str
    action: str
    what: list[str]
    refused: bool


def local_reads(session: Session) -> list[LocalRead]:
    services().audit.flush()
    search = parse_search(
        "AuditEvent",
        [("patient", session.patient_id), ("_sort", "-date"), ("_count", "100")],
    )
    store = services().store
    matches = store.search(
        search, Access(frozenset({session.patient_id})), f"portal|{session.username}"
    )
    reads = []
    for stored in store.versions_of(matches.pairs):
        event = stored.resource()
        agent = (event.get("agent") or [{}])[0]
        who = str(agent.get("who", {}).get("display", ""))
        if who == session.username:  # what the patient did themselves
            continue
        reads.append(
            LocalRead(
                time=str(event.get("recorded", "")),
                who=who,
                role=str((agent.get("role") or [{}])[0].get("text", "")),
                action=str(event.get("action", "E")),
                what=sorted(
                    {
                        e["what"]["reference"].split("/")[0]
                        for e in event.get("entity", [])
                        if e.get("what", {}).get("reference")
                        and not e["what"]["reference"].startswith("Patient/")
                    }
                ),
                refused=event.get("outcome") != "0",
            )
        )
    return reads


@bp.get("/access")
@signed_in
def access(session: Session) -> ResponseReturnValue:
    pseudonym = my_pseudonym(session)
    found = patient_history.history(services(), pseudonym) if pseudonym else None
    return render_template(
        "portal/access.html",
        accesses=ledger_accesses(found.entries) if found else [],
        witness=found.witness if found else None,
        missing=found.missing if found else None,
        reads=local_reads(session),
        members=member_names(),
        purposes=PURPOSES,
    )


# -- receipts ----------------------------------------------------------------------------------


@bp.get("/receipts/<chain>/<int:seq>")
@signed_in
def receipt(session: Session, chain: str, seq: int) -> ResponseReturnValue:
    """A receipt for an entry about me (any other entry: 404, as if it did not exist)."""
    pseudonym = my_pseudonym(session)
    if pseudonym is None:
        abort(404)
    try:
        document = patient_history.receipt(services(), pseudonym, chain, seq)
    except LookupError:
        abort(404)
    response = Response(canonical_bytes(document), mimetype="application/json")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="hrx-receipt-{chain}-{seq}.json"'
    )
    return response


@bp.get("/static/portal.css")
def style() -> ResponseReturnValue:
    return Response(STYLE, mimetype="text/css")

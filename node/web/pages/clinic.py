"""The doctors' pages at ``/clinic``: referred patients, their prior results from every member
with the mutual-recognition verdict (HR), accepting a recognised result instead of ordering the
exam or ordering it again with a reason, a study's images in a viewer, and the savings of the
consortium with a chart.

Server-rendered like the portal, for doctors and admins who sign in with their
node password (:mod:`node.web.pages.browser_sessions`: server-side sessions, CSRF on every
form, the sign-in throttles of :mod:`node.identity.users`). Everything goes through the same
flows as the FHIR operations (:mod:`node.flows.prior_results`, :mod:`node.flows.orders`), so
it is recorded and audited the same way. Only the viewer runs a script (``viewer.js``, served
from here: the page's policy admits scripts of this origin only): it scrolls the frames with the
wheel or the arrow keys and switches window presets without reloading; without it, the same
page works by links.
"""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Response,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from consent.model import MEMBER_SYSTEM
from exchange.reading import CONSULT_TYPES, PRIORITIES, turnaround
from exchange.recognition import REORDER_REASONS
from exchange.referral import OUTCOME_SYSTEM, REASON_URL, RECOGNITION_URL
from exchange.savings import RESULT_TYPES, savings, yuan
from fhir_adapters.dicom import DICOM_UID_SYSTEM
from fhir_adapters.errors import FhirError
from fhir_adapters.store.search import Access, parse_search
from ledger.model import parse_time
from node.flows import consults, dicomweb, orders
from node.flows.dicomweb_paths import parse_target
from node.flows.prior_results import CATEGORIES, fetch_prior_results, rules
from node.identity.sessions import Session
from node.identity.tokens import DEFAULT_SCOPES, Principal, parse_scopes
from node.identity.users import User
from node.web.auth_api import password_sign_in
from node.web.context import caller, services, signed_in_as
from node.web.dicomweb_api import streamed
from node.web.pages.browser_sessions import BrowserSessions
from node.web.pages.portal import language, t
from node.web.pages.reasons import explain, explain_recognition, in_zone, outcome

bp = Blueprint("clinic", __name__, url_prefix="/clinic", template_folder="templates")
WEB = BrowserSessions("clinic", "/clinic", ("doctor", "admin"))


VIEWER_SCRIPT = (Path(__file__).with_name("static") / "viewer.js").read_bytes()  # read once
# window presets (centre, width in HU), in the order the viewer offers them
PRESETS = {
    "default": None,
    "lung": (-600, 1500),
    "mediastinum": (40, 400),
    "bone": (400, 1800),
    "brain": (40, 80),
}


@bp.after_request
def headers(response: Any) -> Any:
    WEB.after_request(response)
    if g.get("clinic_script"):  # the viewer: scripts of this origin, none inline
        response.headers["Content-Security-Policy"] += "; script-src 'self'"
    return response


@bp.errorhandler(HTTPException)
def clinic_error(exc: HTTPException) -> ResponseReturnValue:
    page = render_template("clinic/error.html", message=exc.description or exc.name)
    return page, exc.code or 500


@bp.app_context_processor
def page_context() -> dict[str, Any]:
    if not request.path.startswith("/clinic"):
        return {}
    return {
        "html_lang": "zh-CN" if language() == "zh" else "en",
        "doctor": WEB.current(),
        "csrf_token": WEB.csrf_token(),
        "hospital": services().config.name,
    }


def _members() -> dict[str, str]:
    """Member id to hospital name, from the newest roster."""
    return {
        m["id"]: m.get("name") or m["id"] for m in services().chain_store.roster().body["members"]
    }


def _principal(session: Session) -> Principal:
    """The signed-in doctor as the FHIR layer's caller (a doctor's default rights)."""
    principal = Principal(
        session.username,
        session.role,
        tuple(parse_scopes(DEFAULT_SCOPES[session.role])),
        None,
        "clinic",
    )
    signed_in_as(principal)
    return principal


def signed_in(view: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        session = WEB.current()
        if session is None:
            return redirect(url_for("clinic.signin"), 303)
        if request.method == "POST":
            WEB.check_csrf(t("form_expired"))
        answer: ResponseReturnValue = view(_principal(session), *args, **kwargs)
        return answer

    wrapped.__name__ = view.__name__
    return wrapped


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> ResponseReturnValue:
    if request.method == "GET":
        return render_template("clinic/signin.html")
    WEB.check_csrf(t("form_expired"))
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    response = redirect(url_for("clinic.patients"), 303)

    def start(user: User) -> str:
        WEB.start(response, user)
        return "clinic"

    if username and password:
        result = password_sign_in(username, password, WEB.roles, "clinic sign-in", start)
        if result.user is not None:
            return response
        if result.retry_after:
            error = t("sign_in_throttled").format(minutes=-(-result.retry_after // 60))
            page = render_template("clinic/signin.html", error=error)
            return page, 429, {"Retry-After": str(result.retry_after)}
    return render_template("clinic/signin.html", error=t("clinic_sign_in_failed")), 401


@bp.post("/signout")
def signout() -> ResponseReturnValue:
    response = redirect(url_for("clinic.signin"), 303)
    if WEB.current() is not None:
        WEB.check_csrf(t("form_expired"))
        WEB.end(response)
    return response


@bp.get("/")
@signed_in
def patients(principal: Principal) -> ResponseReturnValue:
    """Referred patients (an active referral ServiceRequest), or those a search finds."""
    store = services().store
    query = request.args.get("q", "").strip()
    if query:
        search = parse_search("Patient", [("identifier", query), ("_count", "50")])
    else:
        search = parse_search(
            "ServiceRequest",
            [("category", orders.REFERRAL), ("status", "active"), ("_count", "100")],
        )
    matches = store.search(search, Access(), f"clinic|{principal.username}")
    found: dict[str, dict[str, Any]] = {}
    for stored in store.versions_of(matches.pairs):
        resource = stored.resource()
        if resource["resourceType"] == "ServiceRequest":
            patient_id = resource["subject"]["reference"].split("/", 1)[1]
            patient = store.read("Patient", patient_id).resource()
        else:
            patient_id, patient = stored.id, resource
        names = patient.get("name") or [{}]
        found[patient_id] = {
            "id": patient_id,
            "name": names[0].get("text")
            or "".join([names[0].get("family", ""), *names[0].get("given", [])]),
            "birth": patient.get("birthDate", ""),
        }
    return render_template("clinic/patients.html", patients=list(found.values()), query=query)


def _prior(
    principal: Principal, patient_id: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    bundle = fetch_prior_results(services(), caller(), patient_id, list(CATEGORIES))
    members = _members()
    item_names = {item.id: item.label(language()) for item in rules(services()).items}
    results = []
    for entry in bundle["entry"]:
        if entry["search"]["mode"] != "match":
            continue
        resource = entry["resource"]
        (verdict,) = [e for e in resource["extension"] if e["url"] == RECOGNITION_URL]
        parts = verdict["extension"]
        simple = {p["url"]: p for p in parts if p["url"] != "reason"}
        reasons = [
            {
                x["url"]: next(v for k, v in x.items() if k.startswith("value"))
                for x in p["extension"]
            }
            for p in parts
            if p["url"] == "reason"
        ]
        for reason in reasons:
            reason["shown"] = explain_recognition(
                reason["code"], reason["text"], language(), members, item_names
            )
        source = entry["fullUrl"]
        member = next((mid for mid, m in _member_urls().items() if source.startswith(m)), "?")
        quantity = resource.get("valueQuantity") or {}
        results.append(
            {
                "url": source,
                "member": members.get(member, member),
                "member_id": member,
                "study": _study_uid(resource),
                "type": resource["resourceType"],
                "what": (resource.get("code") or {}).get("text")
                or ", ".join(
                    str(c.get("display") or c.get("code"))
                    for c in (resource.get("code") or {}).get("coding", [])
                )
                or ", ".join(
                    str((s.get("modality") or {}).get("code")) for s in resource.get("series", [])
                ),
                "when": str(resource.get("effectiveDateTime") or resource.get("started") or "")[
                    :10
                ],
                "value": f"{quantity.get('value', '')} {quantity.get('unit', '')}".strip(),
                "recognised": simple["recognised"]["valueBoolean"],
                "item": simple.get("item", {}).get("valueCode"),
                "price": yuan(simple["priceFen"]["valueInteger"]) if "priceFen" in simple else "",
                "until": simple.get("validUntil", {}).get("valueDate", ""),
                "reasons": reasons,
            }
        )
    problems = [
        _problem(e["resource"]["issue"][0], members)
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
    ]
    return results, problems


def _study_uid(resource: dict[str, Any]) -> str | None:
    """An ImagingStudy's Study Instance UID (its ``urn:dicom:uid`` identifier), else None."""
    for identifier in (
        resource.get("identifier", []) if resource["resourceType"] == "ImagingStudy" else []
    ):
        value = str(identifier.get("value", ""))
        if identifier.get("system") == DICOM_UID_SYSTEM and value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


def _problem(issue: dict[str, Any], members: dict[str, str]) -> dict[str, Any]:
    """A member's answer that released nothing, for the page: the hospital's name, what
    happened and each reason in the page's language (notes of no member as they are)."""
    codings = (issue.get("details") or {}).get("coding", [])
    member = next((c["code"] for c in codings if c.get("system") == MEMBER_SYSTEM), None)
    kind = next((c["code"] for c in codings if c.get("system") == OUTCOME_SYSTEM), None)
    if member is None or kind is None:
        return {"member": "", "outcome": "", "reasons": [str(issue.get("diagnostics", ""))]}
    local = in_zone(rules(services()).zone)
    written = [e["valueString"] for e in issue.get("extension", []) if e["url"] == REASON_URL]
    return {
        "member": members.get(member, member),
        "outcome": outcome(kind, language()),
        "reasons": [explain(r, language(), members, local) for r in written],
    }


def _value(extension: dict[str, Any]) -> Any:
    return next(v for k, v in extension.items() if k.startswith("value"))


def _member_urls() -> dict[str, str]:
    return {
        m["id"]: str(m.get("url", "")).rstrip("/") + "/fhir/"
        for m in services().chain_store.roster().body["members"]
    }


@bp.route("/patients/<patient_id>", methods=["GET", "POST"])
@signed_in
def prior_results(principal: Principal, patient_id: str) -> ResponseReturnValue:
    """GET shows the patient's page with the form that asks the members; only that form's POST
    (with its CSRF token) asks them: asking is recorded on the ledger, which a link followed
    from another site must never do in a doctor's name."""
    results: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    if request.method == "POST":
        try:
            results, problems = _prior(principal, patient_id)
        except FhirError as exc:
            return render_template("clinic/error.html", message=str(exc)), exc.status
    return render_template(
        "clinic/prior.html",
        patient_id=patient_id,
        fetched=request.method == "POST",
        results=results,
        problems=problems,
        reasons=REORDER_REASONS,
        notice={"accepted": t("clinic_accepted"), "reordered": t("clinic_reordered")}.get(
            request.args.get("done", "")
        ),
    )


@bp.post("/patients/<patient_id>/accept")
@signed_in
def accept_result(principal: Principal, patient_id: str) -> ResponseReturnValue:
    try:
        order = orders.new_order(services(), caller(), request.form.get("item", ""), patient_id)
        orders.accept(services(), caller(), order, request.form.get("result", ""))
    except FhirError as exc:
        return render_template("clinic/error.html", message=str(exc)), exc.status
    return redirect(url_for("clinic.prior_results", patient_id=patient_id, done="accepted"), 303)


@bp.post("/patients/<patient_id>/reorder")
@signed_in
def reorder_result(principal: Principal, patient_id: str) -> ResponseReturnValue:
    try:
        order = orders.new_order(services(), caller(), request.form.get("item", ""), patient_id)
        orders.reorder_exam(
            services(),
            caller(),
            order,
            request.form.get("reason"),
            request.form.get("text", "").strip(),
            request.form.get("result") or None,
        )
    except FhirError as exc:
        return render_template("clinic/error.html", message=str(exc)), exc.status
    return redirect(url_for("clinic.prior_results", patient_id=patient_id, done="reordered"), 303)


@bp.get("/savings")
@signed_in
def savings_page(principal: Principal) -> ResponseReturnValue:
    def day(name: str) -> date | None:
        try:
            return datetime.strptime(request.args.get(name, ""), "%Y-%m-%d").date()
        except ValueError:
            return None

    start, end = day("from"), day("to")
    recognition = rules(services())
    entries = services().chain_store.entries_about(None, RESULT_TYPES)
    report = savings(entries, recognition.zone, start, end)
    by_month = report.by(2)
    peak = max((fen for _, _, fen in by_month), default=0) or 1
    members = _members()
    bars = [
        {"month": month, "count": count, "fen": fen, "yuan": yuan(fen), "height": 120 * fen // peak}
        for month, count, fen in by_month
    ]
    names = {item.id: item.label(language()) for item in recognition.items}
    return render_template(
        "clinic/savings.html",
        report=report,
        total=yuan(report.fen_saved),
        bars=bars,
        by_member=[(members.get(k, k), n, yuan(f)) for k, n, f in report.by(0)],
        by_item=[(names.get(k, k), n, yuan(f)) for k, n, f in report.by(1)],
        reordered=[
            ((members.get(member, member), reason), n)
            for (member, reason), n in sorted(report.reordered.items())
        ],
        start=start,
        end=end,
    )


# -- the viewer ------------------------------------------------------------------------------


@bp.get("/viewer/<member>/<study>")
@signed_in
def viewer(principal: Principal, member: str, study: str) -> ResponseReturnValue:
    """A study's series with thumbnails, and one series' frames in order under a window
    preset (``?series=UID&frame=N&preset=lung``); the images come from :func:`image`."""
    try:
        parse_target(f"studies/{study}", [])
        series_list = dicomweb.outline(services(), caller(), member, study)
    except FhirError as exc:
        return render_template("clinic/error.html", message=_viewer_refusal(exc)), exc.status
    if not series_list:
        return render_template("clinic/error.html", message=t("viewer_empty")), 404
    chosen = next((s for s in series_list if s.uid == request.args.get("series")), series_list[0])
    preset = request.args.get("preset", "default")
    preset = preset if preset in PRESETS else "default"
    try:
        frame = min(max(int(request.args.get("frame", "1")), 1), len(chosen.frames) or 1)
    except ValueError:
        frame = 1
    base = url_for("clinic.image", member=member, path=f"studies/{study}/series/{chosen.uid}")
    frames = [f"{base}/instances/{uid}/frames/{number}/rendered" for uid, number in chosen.frames]
    window = PRESETS[preset]
    g.clinic_script = True
    return render_template(
        "clinic/viewer.html",
        member=member,
        member_name=_members().get(member, member),
        study=study,
        series_list=series_list,
        chosen=chosen,
        frames=frames,
        frame=frame,
        preset=preset,
        presets=list(PRESETS),
        preset_windows={name: f"{w[0]},{w[1]},linear" if w else "" for name, w in PRESETS.items()},
        window=f"{window[0]},{window[1]},linear" if window else "",
        thumbnail=lambda s: url_for(
            "clinic.image", member=member, path=f"studies/{study}/series/{s.uid}/thumbnail"
        ),
    )


def _viewer_refusal(exc: FhirError) -> str:
    """Why the study cannot be shown, in the page's language, with the member's reason when
    the page knows it."""
    key = {403: "viewer_refused", 404: "viewer_not_found", 503: "viewer_unavailable"}.get(
        exc.status, "viewer_failed"
    )
    said = _explained(str(exc))
    return f"{t(key)}（{said}）" if said != str(exc) else t(key)


def _explained(reason: str) -> str:
    """A member's reason in the page's language (as written when the page does not know it)."""
    return explain(reason, language(), _members(), in_zone(rules(services()).zone))


@bp.get("/images/<member>/<path:path>")
@signed_in
def image(principal: Principal, member: str, path: str) -> ResponseReturnValue:
    """A rendered frame or a thumbnail for the viewer, from this node's PACS or a member's
    (the same flows as ``/dicomweb``, so read and recorded the same way)."""
    target = parse_target(path, list(request.args.items(multi=True)))
    if target.kind not in ("rendered", "thumbnail"):
        return Response(status=404)
    root = services().config.url.rstrip("/") + "/dicomweb"
    try:
        if member == services().config.node_id:
            answer = dicomweb.read_local(services(), caller(), target, "image/jpeg", root)
        else:
            answer = dicomweb.relay(
                services(), caller(), member, target, "image/jpeg", f"{root}/members/{member}"
            )
    except FhirError as exc:
        return Response(str(exc), status=exc.status, mimetype="text/plain")
    return streamed(answer)


@bp.get("/static/viewer.js")
def viewer_script() -> ResponseReturnValue:
    return Response(VIEWER_SCRIPT, mimetype="text/javascript")


# -- remote reading: consults ---------------------------------------------------------------


def _local(instant: str) -> str:
    """An instant as the consortium's local time, to the minute."""
    return in_zone(rules(services()).zone)(instant)[:16] if instant else ""


def _left(deadline: str) -> tuple[int, bool]:
    """Minutes until a deadline (negative: past it), and whether it is past."""
    try:
        minutes = int((parse_time(deadline) - datetime.now(UTC)).total_seconds() // 60)
    except ValueError:
        return 0, False
    return minutes, minutes < 0


def _shown(consult: consults.Consult, names: dict[str, str]) -> dict[str, Any]:
    left, late = _left(consult.deadline)
    return {
        "id": consult.consult_id,
        "status": consult.status,
        "priority": consult.priority,
        "deadline": _local(consult.deadline),
        "left": left,
        "late": late and consult.status in consults.OPEN_STATUSES,
        "requester": names.get(consult.requester, consult.requester),
        "requester_id": consult.requester,
        "reader": names.get(consult.reader, consult.reader),
        "owner": consult.owner,
        "study": consult.study,
        "modality": consult.modality,
        "body_site": consult.body_site,
        "question": consult.question,
        "delivery": consult.delivery,
        "reason": _explained(consult.reason.removeprefix(f"{consult.reader}: ")),
    }


@bp.route("/patients/<patient_id>/consult", methods=["GET", "POST"])
@signed_in
def consult_request(principal: Principal, patient_id: str) -> ResponseReturnValue:
    """Ask a reading member to read one of the patient's studies held here."""
    svc = services()
    if request.method == "POST":
        try:
            consults.request_consult(
                svc,
                caller(),
                patient_id,
                request.form.get("study", ""),
                request.form.get("reader", ""),
                request.form.get("priority", ""),
                request.form.get("question", ""),
            )
        except FhirError as exc:
            return render_template("clinic/error.html", message=str(exc)), exc.status
        return redirect(url_for("clinic.consult_list", done="requested"), 303)
    search = parse_search("ImagingStudy", [("patient", patient_id), ("_count", "50")])
    matches = svc.store.search(search, Access(), f"clinic|{principal.username}")
    studies = []
    for stored in svc.store.versions_of(matches.pairs):
        study = stored.resource()
        uid = _study_uid(study)
        if uid:
            studies.append(
                {
                    "uid": uid,
                    "when": _local(str(study.get("started", ""))),
                    "what": study.get("description")
                    or ", ".join(
                        str((s.get("modality") or {}).get("code")) for s in study.get("series", [])
                    ),
                }
            )
    readers = [(mid, name) for mid, name in _members().items() if mid != svc.config.node_id]
    return render_template(
        "clinic/consult_new.html",
        patient_id=patient_id,
        studies=studies,
        readers=readers,
        priorities=PRIORITIES,
        minutes=dict(svc.config.consult_minutes),
    )


@bp.get("/consults")
@signed_in
def consult_list(principal: Principal) -> ResponseReturnValue:
    """The consults this member asked of others, and what became of them."""
    names = _members()
    asked = [_shown(c, names) for c in consults.requested(services(), caller())]
    notice = {"requested": t("consult_requested"), "cancelled": t("consult_cancelled")}.get(
        request.args.get("done", "")
    )
    return render_template("clinic/consults.html", consults=asked, notice=notice)


@bp.get("/consults/<consult_id>")
@signed_in
def consult_page(principal: Principal, consult_id: str) -> ResponseReturnValue:
    """One consult: its state, and once reported, the report and whether its signature is the
    reading member's."""
    svc = services()
    task = consults.find_task(svc, consult_id)
    if task is None:
        return render_template("clinic/error.html", message=t("consult_unknown")), 404
    consult = consults.Consult.of(task)
    names = _members()
    shown = _shown(consult, names)
    found = consults.report_and_signature(svc, consult)
    report = None
    if found is not None:
        stored, provenance = found
        resource = stored.resource()
        try:
            signer = consults.verify_signature(svc, resource, provenance.resource())
            signature = t("signature_valid").replace("{member}", names.get(signer, signer))
            valid = True
        except FhirError as exc:
            signature, valid = f"{t('signature_invalid')} ({exc})", False
        text = ""
        for form in resource.get("presentedForm", []):
            text = base64.b64decode(form.get("data", "")).decode("utf-8", "replace")
        report = {
            "conclusion": resource.get("conclusion", ""),
            "text": text,
            "status": resource.get("status"),
            "issued": _local(str(resource.get("issued", ""))),
            "by": ", ".join(str(r.get("display")) for r in resource.get("resultsInterpreter", [])),
            "version": stored.version,
            "signature": signature,
            "valid": valid,
        }
    here = consult.requester == svc.config.node_id
    return render_template(
        "clinic/consult.html",
        consult=shown,
        report=report,
        here=here,
        viewer_member=svc.config.node_id if here else consult.requester,
    )


@bp.post("/consults/<consult_id>/cancel")
@signed_in
def consult_cancel(principal: Principal, consult_id: str) -> ResponseReturnValue:
    try:
        consults.cancel(services(), caller(), consult_id, request.form.get("reason", ""))
    except FhirError as exc:
        return render_template("clinic/error.html", message=str(exc)), exc.status
    return redirect(url_for("clinic.consult_list", done="cancelled"), 303)


@bp.get("/reading")
@signed_in
def reading(principal: Principal) -> ResponseReturnValue:
    """The reading worklist: consults asked of this member, the most pressing first, each
    with the time left to its deadline (the page refreshes itself every 30 s)."""
    svc = services()
    names = _members()
    shown = [_shown(c, names) for c in consults.worklist(svc, caller())]
    done = [_shown(c, names) for c in consults.worklist(svc, caller(), done=True)][:50]
    return render_template("clinic/reading.html", consults=shown, done=done, me=principal.username)


@bp.route("/reading/<consult_id>", methods=["GET", "POST"])
@signed_in
def reading_consult(principal: Principal, consult_id: str) -> ResponseReturnValue:
    """One consult at the reader: claim, release, view the images, write or amend the report."""
    svc = services()
    action = request.form.get("action") if request.method == "POST" else None
    notice = None
    try:
        if action == "claim":
            consults.claim(svc, caller(), consult_id)
        elif action == "release":
            consults.release(svc, caller(), consult_id)
            return redirect(url_for("clinic.reading"), 303)
        elif action == "report":
            _, state = consults.report(
                svc,
                caller(),
                consult_id,
                request.form.get("findings", ""),
                request.form.get("impression", ""),
            )
            notice = t("report_" + ("sent" if state == consults.DELIVERED else "kept"))
            if state not in (consults.DELIVERED, consults.UNDELIVERED):
                notice = f"{t('report_kept')} ({state})"
        task = consults.reader_task(svc, consult_id)
    except FhirError as exc:
        return render_template("clinic/error.html", message=str(exc)), exc.status
    consult = consults.Consult.of(task)
    found = consults.report_and_signature(svc, consult)
    previous = found[0].resource() if found else None
    findings = ""
    if previous:
        for form in previous.get("presentedForm", []):
            text = base64.b64decode(form.get("data", "")).decode("utf-8", "replace")
            findings = text.split("\n\n")[0].split("\n", 1)[-1]
    return render_template(
        "clinic/reading_consult.html",
        consult=_shown(consult, _members()),
        me=principal.username,
        previous=previous,
        findings=findings,
        notice=notice,
    )


@bp.get("/consults/turnaround")
@signed_in
def consult_turnaround(principal: Principal) -> ResponseReturnValue:
    """Turnaround per reading member and priority, from the ledger, with a chart."""
    zone = rules(services()).zone
    try:
        since = datetime.strptime(request.args.get("from", ""), "%Y-%m-%d").replace(tzinfo=zone)
    except ValueError:
        since = None
    rows = turnaround(services().chain_store.entries_about(None, CONSULT_TYPES), since)
    names = _members()
    peak = max((r.p90_minutes or 0 for r in rows), default=0) or 1
    shown = [
        {
            "reader": names.get(r.reader, r.reader),
            "priority": r.priority,
            "reported": r.reported,
            "median": f"{r.median_minutes:.0f}" if r.median_minutes is not None else "–",
            "p90": f"{r.p90_minutes:.0f}" if r.p90_minutes is not None else "–",
            "within": f"{r.share_within * 100:.0f}%" if r.share_within is not None else "–",
            "open": r.open,
            "cancelled": r.cancelled,
            "median_width": int(300 * (r.median_minutes or 0) / peak),
            "p90_width": int(300 * (r.p90_minutes or 0) / peak),
        }
        for r in rows
    ]
    return render_template(
        "clinic/turnaround.html", rows=shown, since=since.date() if since else None
    )

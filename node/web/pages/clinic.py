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

from datetime import date, datetime
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Response,
    g,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from consent.model import MEMBER_SYSTEM
from exchange.recognition import REORDER_REASONS
from exchange.referral import OUTCOME_SYSTEM, REASON_URL, RECOGNITION_URL
from exchange.savings import RESULT_TYPES, savings, yuan
from fhir_adapters.dicom import DICOM_UID_SYSTEM
from fhir_adapters.errors import FhirError
from fhir_adapters.store.search import Access, parse_search
from node.flows import dicomweb, orders
from node.flows.dicomweb_paths import parse_target
from node.flows.prior_results import CATEGORIES, fetch_prior_results, rules
from node.identity.sessions import Session
from node.identity.tokens import DEFAULT_SCOPES, Principal, parse_scopes
from node.identity.users import User
from node.web.auth_api import password_sign_in
from node.web.context import caller, services, signed_in_as
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
    members = {
        m["id"]: m.get("name") or m["id"] for m in services().chain_store.roster().body["members"]
    }
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
        by_member=[(k, n, yuan(f)) for k, n, f in report.by(0)],
        by_item=[(names.get(k, k), n, yuan(f)) for k, n, f in report.by(1)],
        reordered=sorted(report.reordered.items()),
        start=start,
        end=end,
    )


# -- the viewer ------------------------------------------------------------------------------


def _members() -> dict[str, str]:
    return {
        m["id"]: m.get("name") or m["id"] for m in services().chain_store.roster().body["members"]
    }


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
    """Why the study cannot be shown, in the page's language (the member's own words after)."""
    key = {403: "viewer_refused", 404: "viewer_not_found", 503: "viewer_unavailable"}.get(
        exc.status, "viewer_failed"
    )
    return f"{t(key)} ({exc})"


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

    def chunks() -> Any:
        try:
            yield from answer.chunks
        finally:
            answer.close()

    return Response(stream_with_context(chunks()), answer.status, headers=answer.headers)


@bp.get("/static/viewer.js")
def viewer_script() -> ResponseReturnValue:
    return Response(VIEWER_SCRIPT, mimetype="text/javascript")

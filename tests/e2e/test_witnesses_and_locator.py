"""A live consortium with roles: three witnesses (one of them the registry) and four ordinary
members, each a real web server and replication worker. Ordinary members hold only the chains
they needed; a referral asks the record locator and then only the holders, and the lookup is
on the registry's chain; with the registry cut off the requester asks every member and says
so; a witness cut off for 60 s catches up and checkpoints resume."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from consent.model import consent_resource
from ledger import keys
from ledger.errors import PeerUnavailable
from ledger.receipt import entry_proof, verify_receipt
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.cli import main
from node.consortium.peers import SignedPeers
from node.consortium.worker import synced_age
from node.db.engines import open_database
from node.db.schema import locator_table
from node.demo.harness import Consortium
from tests.helpers.nodes import member_node, post
from tests.helpers.portal import enroll
from tests.node.flows.test_member_export import export, exporter, group_of
from tests.node.flows.test_referral import lab, register, store_all
from tests.node.web.test_bulk_data import exported

pytestmark = pytest.mark.slow

WITNESSES = ["hosp-a", "hosp-b", "hosp-c"]
REGISTRY = "hosp-a"
LAB_ONLY = {"category": "laboratory"}


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("roles"),
        7,
        epoch_seconds=2,
        replicate_interval=0.5,
        witnesses=WITNESSES,
        registries=[REGISTRY],
        environment={
            "HRX_EXCHANGE_TIMEOUT_MS": "4000",
            "HRX_CONSENT_SYNC_TIMEOUT_MS": "1000",
            "HRX_REPLICATION_HEARTBEAT_SECONDS": "2",
            "HRX_REPLICATION_CERTIFICATE_SECONDS": "1",
        },
    )
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def chains_held(group: Consortium, name: str) -> set[str]:
    store = ChainStore(group.database_url(name))
    try:
        return set(store.heads())
    finally:
        store.close()


def located(group: Consortium, patient: str) -> set[str]:
    database = open_database(group.database_url(REGISTRY))
    try:
        with database.engine.connect() as conn:
            rows = conn.execute(
                sa.select(locator_table.c.member).where(locator_table.c.patient == patient)
            )
            return {row[0] for row in rows}
    finally:
        database.close()


def asked_for_access(group: Consortium, name: str) -> int:
    """How many ``POST /peer/access`` requests member ``name`` has answered (its access log)."""
    log = (group.members[name].directory / "processes.log").read_text(errors="replace")
    return log.count('"route": "/peer/access"') + log.count('"route":"/peer/access"')


def outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"]["issue"][0] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]


@pytest.fixture(scope="module")
def patient(group: Consortium) -> dict[str, Any]:
    """Known at D, E, F and G; results at D and E; consent recorded at D for F."""
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    d, e, f, g = (member_node(group, n) for n in ("hosp-d", "hosp-e", "hosp-f", "hosp-g"))
    at = {name: register(n, resident_id) for name, n in zip("defg", (d, e, f, g), strict=True)}
    store_all(d, [lab(at["d"], "718-7", 2), lab(at["d"], "2823-3", 1)])
    store_all(e, [lab(at["e"], "718-7", 1)])
    token = d.token(f"pt-{at['d'][:8]}", "patient", patient=at["d"])
    granted = post(
        d.session(token),
        f"{d.fhir}/Consent",
        consent_resource(at["d"], ["hosp-f"], ["laboratory"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201, granted.text
    pseudonym = ChainStore(group.database_url("hosp-d")).entries_about(None, ["consent.granted"])[
        -1
    ]["body"]["patient"]
    deadline = time.monotonic() + 30
    while located(group, pseudonym) != {"hosp-d", "hosp-e"}:
        assert time.monotonic() < deadline, located(group, pseudonym)
        time.sleep(0.2)
    return {"e": at["e"], "f": at["f"], "pseudonym": pseudonym}


def test_a_referral_asks_the_locator_then_only_the_holders(
    group: Consortium, patient: dict[str, Any]
) -> None:
    f = member_node(group, "hosp-f")
    before = {name: asked_for_access(group, name) for name in group.members}
    doctor = f.session(f.token("dr-sun", "doctor"))
    bundle = doctor.get(f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY).json()
    assert bundle["total"] == 3, outcomes(bundle)
    (note,) = outcomes(bundle)
    assert note["severity"] == "information"
    assert "named 2 member(s) holding records; only they were asked" in note["diagnostics"]
    deadline = time.monotonic() + 10  # the access lines are written as the answers go out
    while True:
        asked = {n for n in group.members if asked_for_access(group, n) > before[n]}
        if asked >= {"hosp-d", "hosp-e"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert asked == {"hosp-d", "hosp-e"}
    # the lookup is on the registry's chain: who asked, for what, how many — never which
    registry = ChainStore(group.database_url(REGISTRY))
    (lookup,) = registry.entries_about(patient["pseudonym"], ["locator.lookup"])
    assert lookup["chain"] == REGISTRY
    assert lookup["body"]["requester_org"] == "hosp-f" and lookup["body"]["holders"] == 2
    assert "hosp-d" not in json.dumps(lookup["body"]) and "hosp-e" not in json.dumps(lookup)
    # E, an ordinary member, decided over D's chain, which it fetched for the decision
    decided = ChainStore(group.database_url("hosp-e")).entries_about(
        patient["pseudonym"], ["access.decided"]
    )
    (own,) = [d for d in decided if d["chain"] == "hosp-e"]
    assert own["body"]["decision"] == "permit" and "hosp-d" in own["body"]["view"]


def test_the_auditor_verifies_everything_from_one_witness(
    group: Consortium, patient: dict[str, Any], tmp_path: Path
) -> None:
    """One witness's export holds every chain: the auditor checks it against the authority's
    key, certificates against the witnesses' keys, replays every decision and checks every
    locator lookup against its question."""
    f = member_node(group, "hosp-f")
    doctor = f.session(f.token("dr-sun", "doctor"))
    assert (
        doctor.get(f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY).status_code
        == 200
    )
    deadline = time.monotonic() + 20
    while chains_held(group, "hosp-b") != chains_held(group, "hosp-c") or not (
        {"hosp-a", "hosp-d", "hosp-e", "hosp-f"} <= chains_held(group, "hosp-b")
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    deadline = time.monotonic() + 20  # the last decisions' blocks reach the witness

    def head(holder: str, chain: str) -> Any:
        store = ChainStore(group.database_url(holder))
        try:
            return store.heads().get(chain)
        finally:
            store.close()

    while any(head("hosp-b", m) != head(m, m) for m in ("hosp-a", "hosp-d", "hosp-e", "hosp-f")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    export = tmp_path / "hosp-b.jsonl"
    runner = CliRunner()
    made = runner.invoke(
        main,
        ["ledger", "export", "--dir", str(group.members["hosp-b"].directory), "--out", str(export)],
    )
    assert made.exit_code == 0, made.output
    authority = keys.public_key_text(keys.load_private_key(group.authority_key))
    verdict = runner.invoke(main, ["audit", "verify", str(export), "--authority", authority])
    assert verdict.exit_code == 0, verdict.output
    assert "VALID" in verdict.output
    assert "record locator lookup(s) checked against the questions asked" in verdict.output
    lookups = int(verdict.output.split(" record locator lookup(s)")[0].split()[-1])
    assert lookups >= 2  # one per referral of this module (the registry was cut off once)


def test_ordinary_members_hold_only_the_chains_they_needed(
    group: Consortium, patient: dict[str, Any]
) -> None:
    f = member_node(group, "hosp-f")
    doctor = f.session(f.token("dr-sun", "doctor"))
    assert (
        doctor.get(f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY).status_code
        == 200
    )
    everything = {n for n in group.members if n in chains_held(group, n)}  # chains begun
    assert {"hosp-a", "hosp-d", "hosp-e", "hosp-f"} <= everything
    deadline = time.monotonic() + 20
    while any(chains_held(group, w) != everything for w in WITNESSES):
        assert time.monotonic() < deadline, {w: chains_held(group, w) for w in WITNESSES}
        time.sleep(0.2)
    assert chains_held(group, "hosp-d") == {"hosp-d"}
    assert chains_held(group, "hosp-e") == {"hosp-e", "hosp-d"}  # D's holds the consent
    assert chains_held(group, "hosp-f") == {"hosp-f"}
    assert chains_held(group, "hosp-g") == set()  # no entry of its own yet
    # a member with nothing to announce still takes the newest certificate (at its next
    # heartbeat, every 2 s here: waited for, as a loaded machine may be later)
    store = ChainStore(group.database_url("hosp-g"))
    deadline = time.monotonic() + 20
    while store.certificate_epoch() is None:
        assert time.monotonic() < deadline, "hosp-g took no certificate"
        time.sleep(0.2)
    store.close()
    # a quiet author's heartbeats keep its chain confirmed at the witnesses (the staleness
    # bound and hrx node status count from there), though nothing new is pulled
    time.sleep(8)  # D appended nothing since the fixture; it sends a heartbeat every 2 s
    for witness in WITNESSES:  # confirmed within the last 6 s (a loaded machine: retried)
        deadline = time.monotonic() + 20
        while True:
            store = ChainStore(group.database_url(witness))
            age = synced_age(store, "hosp-d")
            store.close()
            if age is not None and age < 6:
                break
            assert time.monotonic() < deadline, (witness, age)
            time.sleep(0.5)


def test_the_portal_of_an_ordinary_member_shows_what_other_chains_recorded(
    group: Consortium, patient: dict[str, Any]
) -> None:
    """E holds results, so its patient sees who asked for them. F's question (on F's chain),
    the registry's lookup and D's decision are on chains E does not hold: its portal records
    the patient's question on E's chain, asks a witness, and shows them, each with a receipt
    that verifies; with every witness cut off it shows what E holds and says the rest is
    missing."""
    f, e = member_node(group, "hosp-f"), member_node(group, "hosp-e")
    doctor = f.session(f.token("dr-sun", "doctor"))
    assert (
        doctor.get(f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY).status_code
        == 200
    )
    pseudonym = patient["pseudonym"]
    (question,) = [  # the newest of F's questions
        q
        for q in ChainStore(group.database_url("hosp-f")).entries_about(
            pseudonym, ["access.requested"]
        )
    ][-1:]
    request_id = question["body"]["request_id"]

    def at_witnesses() -> bool:
        types = {
            (x["chain"], x["type"])
            for x in ChainStore(group.database_url("hosp-b")).entries_about(pseudonym, None)
            if x["body"].get("request_id") == request_id
        }
        return {("hosp-f", "access.requested"), ("hosp-a", "locator.lookup")} <= types and {
            ("hosp-d", "access.decided"),
            ("hosp-e", "access.decided"),
        } <= types

    deadline = time.monotonic() + 20
    while not at_witnesses():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "hosp-f" not in chains_held(group, "hosp-e")
    browser = enroll(e, patient["e"])
    page = browser.get(f"{e.base}/portal/access")
    assert page.status_code == 200
    section = page.text.split(f'id="access-{request_id}"')[1].split("</section>")[0]
    names = {m: f"医院 {m}" for m in ("hosp-a", "hosp-d", "hosp-e", "hosp-f")}  # the roster's
    assert names["hosp-f"] in section  # who asked: F's question, on F's chain
    assert names["hosp-a"] in section and "找到 2 家" in section  # the registry's lookup
    assert names["hosp-d"] in section and names["hosp-e"] in section  # both decisions
    assert "history-from" in page.text and "history-missing" not in page.text
    # the patient's question is on E's own chain, before the witness was asked
    own = ChainStore(group.database_url("hosp-e")).entries_about(pseudonym, ["history.requested"])
    assert own and own[-1]["chain"] == "hosp-e"
    assert own[-1]["body"]["requester_org"] == "hosp-e"
    # a receipt of F's question, which E does not hold, verifies against the authority's key
    link = f"/portal/receipts/hosp-f/{question['seq']}"
    assert f'href="{link}"' in section
    download = browser.get(f"{e.base}{link}")
    assert download.status_code == 200, download.text[:300]
    authority = keys.load_private_key(group.authority_key).public_key()
    summary = verify_receipt(download.json(), authority)
    assert (summary.chain, summary.seq, summary.entry_type) == (
        "hosp-f",
        question["seq"],
        "access.requested",
    )
    assert browser.get(f"{e.base}/portal/receipts/hosp-f/99999").status_code == 404
    # every witness cut off: E's own entries, and the page says the others are missing
    for witness in WITNESSES:
        group.cut(witness)
    try:
        page = browser.get(f"{e.base}/portal/access")
    finally:
        for witness in WITNESSES:
            group.heal(witness)
    assert page.status_code == 200
    assert "history-missing" in page.text and "history-from" not in page.text
    section = page.text.split(f'id="access-{request_id}"')[1].split("</section>")[0]
    assert names["hosp-e"] in section and names["hosp-a"] not in section


def test_a_witness_answers_a_patients_history_only_to_a_recorded_question(
    group: Consortium, patient: dict[str, Any]
) -> None:
    config = load_config(group.members["hosp-e"].directory)
    store = ChainStore(config.database_url)
    peers = SignedPeers(store, "hosp-e", keys.load_private_key(config.ed25519_key))
    body = {"request_id": str(uuid.uuid4()), "patient": patient["pseudonym"]}
    try:
        with pytest.raises(PeerUnavailable, match="400"):
            peers.post("hosp-b", "/peer/patient-history", body)
        with pytest.raises(PeerUnavailable, match=r"403.*not proven"):
            peers.post("hosp-b", "/peer/patient-history", {**body, "asked": {}})
        # a doctor's question is not a patient's
        (question,) = store.entries_about(patient["pseudonym"], ["access.decided"])[-1:]
        with pytest.raises(PeerUnavailable, match="403"):
            peers.post(
                "hosp-b",
                "/peer/patient-history",
                {**body, "asked": entry_proof(store, question["chain"], question["seq"])},
            )
        with pytest.raises(PeerUnavailable, match=r"409.*no witness"):
            peers.post("hosp-d", "/peer/patient-history", {**body, "asked": {}})
    finally:
        store.close()


def test_with_the_registry_cut_off_every_member_is_asked(
    group: Consortium, patient: dict[str, Any]
) -> None:
    f = member_node(group, "hosp-f")
    doctor = f.session(f.token("dr-sun", "doctor"))
    before = asked_for_access(group, "hosp-g")
    group.cut(REGISTRY)
    try:
        bundle = doctor.get(
            f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY
        ).json()
    finally:
        group.heal(REGISTRY)
    assert bundle["total"] == 3, outcomes(bundle)
    notes = [o for o in outcomes(bundle) if o["severity"] == "information"]
    assert len(notes) == 1
    assert "the record locator could not be reached" in notes[0]["diagnostics"]
    assert notes[0]["diagnostics"].endswith("every member was asked")
    # hosp-a, a witness, is cut off too: its outcome says so; G was asked and holds nothing
    assert [o["diagnostics"][:6] for o in outcomes(bundle) if o["severity"] != "information"] == [
        "hosp-a"
    ]
    time.sleep(0.5)
    assert asked_for_access(group, "hosp-g") > before


def test_with_every_witness_cut_off_an_ordinary_source_denies(
    group: Consortium, patient: dict[str, Any]
) -> None:
    """The ordinary sources cannot learn which chains hold the patient's consents (only
    witnesses can say; another member's chain might hold a revocation), so each denies, saying
    why — D too, though the consent is on its own chain."""
    f = member_node(group, "hosp-f")
    doctor = f.session(f.token("dr-sun", "doctor"))
    for witness in WITNESSES:
        group.cut(witness)
    try:
        bundle = doctor.get(
            f"{f.fhir}/Patient/{patient['f']}/$prior-results", params=LAB_ONLY
        ).json()
    finally:
        for witness in WITNESSES:
            group.heal(witness)
    assert bundle["total"] == 0
    problems = [o for o in outcomes(bundle) if o["severity"] != "information"]
    by_member = {o["diagnostics"][:6]: o for o in problems}
    # the witnesses unreachable; D, E and G (which knows the patient, without results) deny
    assert set(by_member) == {"hosp-a", "hosp-b", "hosp-c", "hosp-d", "hosp-e", "hosp-g"}
    for source in ("hosp-d", "hosp-e", "hosp-g"):
        assert by_member[source]["code"] == "forbidden"
        words = "no witness said which chains hold the patient's consents"
        assert words in by_member[source]["diagnostics"]
        decided = ChainStore(group.database_url(source)).entries_about(
            patient["pseudonym"], ["access.decided"]
        )
        newest = max((d for d in decided if d["chain"] == source), key=lambda d: d["seq"])
        assert newest["body"]["decision"] == "deny" and newest["body"]["stale"] == ["*"]


def test_a_witness_cut_off_for_a_minute_catches_up_and_checkpoints_resume(
    group: Consortium, patient: dict[str, Any]
) -> None:
    config = load_config(group.members["hosp-d"].directory)
    group.cut("hosp-c")
    try:
        store = ChainStore(config.database_url)
        with ChainWriter(store, "hosp-d", keys.load_private_key(config.ed25519_key)) as writer:
            for n in range(3):  # D's chain grows while hosp-c hears nothing
                writer.append("access.requested", {"request_id": f"cut-{n}", "patient": "cd" * 32})
                time.sleep(1)
        store.close()
        time.sleep(57)
        cut_at = ChainStore(group.database_url("hosp-c")).heads()["hosp-d"].hash
    finally:
        group.heal("hosp-c")
    head_d = ChainStore(group.database_url("hosp-d")).heads()["hosp-d"].hash
    assert cut_at != head_d
    deadline = time.monotonic() + 30
    while ChainStore(group.database_url("hosp-c")).heads()["hosp-d"].hash != head_d:
        assert time.monotonic() < deadline, "hosp-c did not catch up"
        time.sleep(0.2)
    # a certificate of D's new head, co-signed with hosp-c back among the signers
    deadline = time.monotonic() + 30
    while True:
        certificate = ChainStore(group.database_url("hosp-c")).certificate()
        if certificate is not None and (
            certificate["checkpoint"]["heads"]["hosp-d"]["hash"] == head_d
            and "hosp-c" in certificate["signers"]
        ):
            break
        assert time.monotonic() < deadline, certificate
        time.sleep(0.2)
    # the ordinary members fetched it at a heartbeat (certificates are pushed to witnesses only)
    deadline = time.monotonic() + 10
    while (ChainStore(group.database_url("hosp-g")).certificate() or {}).get("checkpoint", {}).get(
        "epoch", -1
    ) < certificate["checkpoint"]["epoch"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_an_ordinary_source_asks_a_witness_once_for_a_cohorts_consent_chains(
    group: Consortium, patient: dict[str, Any]
) -> None:
    """E holds results and no consent; the consent is on D's chain. Exporting a cohort from
    E, E learns that from a witness in one request for the whole batch, syncs D's chain and
    releases as the consent says."""

    def asked(route: str) -> int:
        logs = [
            (group.members[w].directory / "processes.log").read_text(errors="replace")
            for w in WITNESSES
        ]
        return sum(
            log.count(f'"route": "{route}"') + log.count(f'"route":"{route}"') for log in logs
        )

    f = member_node(group, "hosp-f")
    cohort = group_of(f, [patient["f"], register(f, "3301" + str(uuid.uuid4().int)[:14])])
    session = exporter(f)
    before = asked("/peer/consent-chains/cohort"), asked("/peer/consent-chains")
    manifest = export(session, f, cohort, source="hosp-e", category="laboratory")
    assert [r["code"]["coding"][0]["code"] for r in exported(session, manifest)] == ["718-7"]
    assert manifest["error"] == []  # the other patient is not held at E: nothing to say
    assert asked("/peer/consent-chains/cohort") == before[0] + 1
    assert asked("/peer/consent-chains") == before[1]

"""The auditor's replay of access decisions (docs/spec.md §14.4): every ``access.decided`` on any
chain, decided again by the consent policy over the consent entries of the view it records,
must come out as recorded. A decision that does not — a forged permit, a permit after a
revocation the source had seen, a deny the consents did not call for — is a finding. So is a
record locator lookup (``locator.lookup``, on a registry's chain) that answers no question its
requester recorded (:meth:`DecisionReplay.lookup_findings`), and a member's read of a study's
images (``images.read``) permitted on no grant: the source's permitted ``access.decided`` for
that member and patient that released the study, or a consult the source asked that member to
read of that study, not cancelled before (:meth:`DecisionReplay.image_read_findings`).

Fed while the ledger is verified (:class:`DecisionReplay` is the verifier's entry observer), it
keeps every consent entry (they are few: one per grant or revocation), every decision's,
question's and lookup's body until the end, then replays. Memory grows with the number of
requests (a few hundred bytes each); a ledger of tens of millions of them would want them
spilled to disk.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consent.policy import CONSENT_TYPES
from exchange.decisions import replay
from exchange.reading import CANCELLED, REQUESTED

DECIDED = "access.decided"
QUESTION = "access.requested"
LOOKUP = "locator.lookup"
IMAGES = "images.read"
WATCHED = frozenset((*CONSENT_TYPES, DECIDED, QUESTION, LOOKUP, IMAGES, REQUESTED, CANCELLED))
DECIDED_FIELDS = ("patient", "requester_org", "purpose", "categories", "decided_at", "view")


@dataclass(frozen=True)
class Finding:
    chain: str
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.chain} seq {self.seq}: {self.message}"


@dataclass
class DecisionReplay:
    consents: dict[str, list[Mapping[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    decisions: list[Mapping[str, Any]] = field(default_factory=list)
    questions: dict[tuple[str, Any], Mapping[str, Any]] = field(default_factory=dict)
    lookups: list[Mapping[str, Any]] = field(default_factory=list)
    image_reads: list[Mapping[str, Any]] = field(default_factory=list)
    consults: dict[tuple[str, Any], list[Mapping[str, Any]]] = field(default_factory=dict)

    def observe(self, entry: Mapping[str, Any]) -> None:
        """Take one verified entry of a watched type (:data:`WATCHED`)."""
        if entry["type"] == DECIDED:
            self.decisions.append(entry)
        elif entry["type"] == QUESTION:
            self.questions[(entry["chain"], entry["body"].get("request_id"))] = entry["body"]
        elif entry["type"] == LOOKUP:
            self.lookups.append(entry)
        elif entry["type"] == IMAGES:
            self.image_reads.append(entry)
        elif entry["type"] in (REQUESTED, CANCELLED):
            key = (entry["chain"], entry["body"].get("consult_id"))
            self.consults.setdefault(key, []).append(entry)
        elif isinstance(entry["body"].get("patient"), str):
            self.consents[entry["body"]["patient"]].append(entry)

    def lookup_findings(self) -> list[Finding]:
        """Every record locator lookup that answers no question its requester recorded (the
        same request id, patient and purpose on the requester's chain), or that does not say
        how many members it named: a registry may look a patient up only when asked."""
        found = []
        for entry in self.lookups:
            body = entry["body"]
            requester = body.get("requester_org")
            question = self.questions.get((str(requester), body.get("request_id")))
            holders = body.get("holders")
            if type(holders) is not int or holders < 0:
                message = "its holders is not a count of members"
            elif question is None:
                message = (
                    f"looks up a patient for {requester}, whose chain in this copy records no "
                    f"question {body.get('request_id')}"
                )
            elif (question.get("patient"), question.get("purpose")) != (
                body.get("patient"),
                body.get("purpose"),
            ):
                message = (
                    f"looks up another patient or purpose than {requester}'s question "
                    f"{body.get('request_id')} names"
                )
            else:
                continue
            found.append(Finding(entry["chain"], entry["seq"], message))
        return found

    def image_read_findings(self) -> list[Finding]:
        """Every permitted read of a study's images that rests on no grant: its basis must
        name an ``access.decided`` earlier on the same chain that permitted the same member
        for the same patient and released the study (its ImagingStudy's hash). A refused read
        needs no grant; a read that is neither permitted nor refused is a finding."""
        decided = {
            (entry["chain"], entry["body"].get("request_id")): entry for entry in self.decisions
        }
        found = []
        for entry in self.image_reads:
            body = entry["body"]
            basis = body.get("basis")
            message: str | None
            if body.get("decision") == "deny":
                continue
            if body.get("decision") != "permit":
                message = "an images.read is neither a permit nor a deny"
            elif isinstance(basis, dict) and list(basis) == ["consult"]:
                message = _not_consulted(
                    entry, self.consults.get((entry["chain"], basis["consult"]), [])
                )
                if message is None:
                    continue
            elif not isinstance(basis, dict) or list(basis) != ["access"]:
                message = f"a read of images rests on no access decision (basis {basis})"
            else:
                grant = decided.get((entry["chain"], basis["access"]))
                message = _not_granted(entry, grant)
                if message is None:
                    continue
            found.append(Finding(entry["chain"], entry["seq"], message))
        return found

    def findings(self, held: Mapping[str, int] | None = None) -> list[Finding]:
        """Every decision the policy would not have made; ``held``: the entries the verified
        copy holds of each chain, when known — a decision whose view reads more of a chain
        than the copy holds cannot be replayed from it, and is a finding too."""
        found = self.lookup_findings() + self.image_read_findings()
        for entry in self.decisions:
            body = entry["body"]
            missing = [name for name in DECIDED_FIELDS if name not in body]
            if missing or not isinstance(body.get("view"), dict):
                found.append(
                    Finding(
                        entry["chain"],
                        entry["seq"],
                        f"access.decided lacks {', '.join(missing) or 'a view'}: it cannot be "
                        "replayed",
                    )
                )
                continue
            if not _is_view(body["view"]):
                found.append(
                    Finding(
                        entry["chain"],
                        entry["seq"],
                        "its view is not a map of chain ids to entry counts: it cannot be replayed",
                    )
                )
                continue
            chain, seq = entry["chain"], entry["seq"]
            consents = self.consents.get(str(body["patient"]), [])
            view = body["view"]
            short = sorted(
                (c, size, held.get(c, 0))
                for c, size in view.items()
                if held is not None and c != chain and size > held.get(c, 0)
            )
            if short:
                found.append(
                    Finding(
                        chain,
                        seq,
                        "cannot be replayed from this copy: its view reads "
                        + ", ".join(
                            f"{n} entries of {c} (this copy holds {h})" for c, n, h in short
                        ),
                    )
                )
                continue
            if view.get(chain, 0) > seq:
                found.append(
                    Finding(
                        chain,
                        seq,
                        f"its view claims {view[chain]} entries of {chain}, "
                        "which did not yet exist",
                    )
                )
                continue
            try:
                again = replay(body, consents)
                # its own chain's entries before it were there to be read: a view that leaves
                # them out (an old head) must not change the outcome
                whole = replay({**body, "view": {**view, chain: seq}}, consents)
            except (TypeError, ValueError, KeyError) as exc:
                found.append(Finding(chain, seq, f"cannot be replayed: {exc}"))
                continue
            if again.decision == body.get("decision") != whole.decision:
                found.append(
                    Finding(
                        chain,
                        seq,
                        f"recorded {body.get('decision')} over a view that leaves out {chain}'s "
                        f"own earlier entries; with them the policy calls for {whole.decision}: "
                        f"{whole.reason}",
                    )
                )
                continue
            if again.decision != body.get("decision"):
                found.append(
                    Finding(
                        chain,
                        seq,
                        f"recorded {body.get('decision')} for {body['requester_org']}, but the "
                        f"consents in its view call for {again.decision}: {again.reason}",
                    )
                )
            elif again.permitted and again.consent != body.get("consent"):
                found.append(
                    Finding(
                        chain,
                        seq,
                        f"permit rests on consent {body.get('consent')}, but the policy finds "
                        f"{again.consent}",
                    )
                )
        return found


def _not_granted(read: Mapping[str, Any], grant: Mapping[str, Any] | None) -> str | None:
    """Why the access decision ``grant`` (None: not found) does not grant the read of images
    ``read``; None when it does."""
    body = read["body"]
    request_id = body["basis"]["access"]
    if grant is None or grant["seq"] > read["seq"]:
        return (
            f"a read of images rests on access request {request_id}, which {read['chain']} "
            "did not decide before it"
        )
    decision = grant["body"]
    if decision.get("decision") != "permit":
        return f"a read of images rests on access request {request_id}, which was denied"
    if (decision.get("requester_org"), decision.get("patient")) != (
        body.get("requester_org"),
        body.get("patient"),
    ):
        return (
            f"a read of images by {body.get('requester_org')} rests on access request "
            f"{request_id}, made for another member or patient"
        )
    if body.get("study") not in decision.get("released", []):
        return f"a read of images rests on access request {request_id}, which did not release it"
    return None


def _not_consulted(read: Mapping[str, Any], consult: list[Mapping[str, Any]]) -> str | None:
    """Why the consult entries ``consult`` (its request and cancellation on the read's chain)
    do not grant the read of images ``read``; None when they do."""
    body = read["body"]
    consult_id = body["basis"]["consult"]
    asked = [e for e in consult if e["type"] == REQUESTED and e["seq"] < read["seq"]]
    if not asked:
        return (
            f"a read of images rests on consult {consult_id}, which {read['chain']} did not "
            "request before it"
        )
    request = asked[0]["body"]
    if (request.get("reader_org"), request.get("patient"), request.get("study")) != (
        body.get("requester_org"),
        body.get("patient"),
        body.get("study"),
    ):
        return (
            f"a read of images by {body.get('requester_org')} rests on consult {consult_id}, "
            "asked of another member, for another patient or study"
        )
    if any(e["type"] == CANCELLED and e["seq"] < read["seq"] for e in consult):
        return f"a read of images rests on consult {consult_id}, cancelled before it"
    return None


def _is_view(view: Mapping[str, Any]) -> bool:
    """A view (docs/spec.md §14.4) maps chain ids to entry counts: integers, not negative."""
    return all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in view.values()
    )

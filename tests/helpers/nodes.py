"""Helpers of the tests beyond :mod:`node.demo.nodes` (one real node) and
:mod:`node.demo.harness` (a consortium): ``hrx`` commands run in this process, appends to a
node's own chain, access requests asked as a referral asks them, and a patient a consortium
knows by a pseudonym."""

from __future__ import annotations

import atexit
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from consent.pseudonym import RESIDENT_ID_SYSTEM, pseudonym
from ledger import keys
from ledger.store import ChainStore
from node.base.config import load_config
from node.cli import main
from node.consortium.membership import read_secret
from node.demo.nodes import (  # noqa: F401  # what the tests use, in one place
    FHIR_JSON,
    Node,
    free_port,
    init_node,
    join_alone,
    post,
    running_node,
    serving,
    wait_healthy,
)
from tests.helpers.databases import postgres_database


def hrx(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def invoke(*args: str, stdin: str | None = None) -> Any:
    """``hrx ARGS`` in this process, its Result whatever the exit status (cf. :func:`hrx`)."""
    return CliRunner().invoke(main, list(args), input=stdin)


def append_requests(directory: Path, *request_ids: str) -> None:
    """Append ``access.requested`` entries to a node's own chain (``hrx ledger append``)."""
    bodies = "".join(f'{{"request_id": "{r}", "patient": "{"ab" * 32}"}}\n' for r in request_ids)
    answer = invoke(
        "ledger", "append", "--dir", str(directory), "--type", "access.requested", stdin=bodies
    )
    assert answer.exit_code == 0, answer.output


_askers: dict[Path, Any] = {}


def asked(asker: Path, body: dict[str, Any], *, username: str = "dr-test") -> dict[str, Any]:
    """An access request ``body`` with its proof (``asked``), after recording the question on
    the chain of the member whose directory is ``asker``, as a referral does (the body's
    ``request_id``, ``patient``, ``purpose`` and ``categories``)."""
    from node.flows.prior_results import record_question
    from node.services import open_services

    services = _askers.get(asker)
    if services is None:
        services = _askers[asker] = open_services(load_config(asker))
        atexit.register(services.close)
    proof = record_question(
        services,
        body["request_id"],
        body["patient"],
        username,
        body["purpose"],
        list(body["categories"]),
    )
    return {**body, "asked": proof}


def ask_access(asker: Path, source: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /peer/access`` to member ``source``, signed by the member whose directory is
    ``asker``, with the question recorded on its chain first (:func:`asked`)."""
    from node.consortium.peers import SignedPeers

    config = load_config(asker)
    peers = SignedPeers(
        _askers[asker].chain_store if asker in _askers else ChainStore(config.database_url),
        config.node_id,
        keys.load_private_key(config.ed25519_key),
    )
    answer: dict[str, Any] = peers.post(source, "/peer/access", asked(asker, body))
    return answer


def member_node(group: Any, name: str) -> Node:
    """Member ``name`` of a running consortium (:class:`node.demo.harness.Consortium`)."""
    member = group.members[name]
    return Node(member.directory, member.web_port)


def a_patient(source: Node) -> tuple[str, str]:
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    created = post(
        source.session(),
        f"{source.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
        },
    )
    assert created.status_code == 201, created.text
    secret = read_secret(load_config(source.directory).consortium_key)
    return created.json()["id"], pseudonym(secret, RESIDENT_ID_SYSTEM, resident_id)


@contextmanager
def joined_node_dir(directory: Path, node_id: str, engine: str) -> Iterator[Path]:
    """A node's directory, initialised on ``engine`` ("sqlite", or "postgres": a database of
    its own, dropped afterwards) and the one member of a consortium of its own; not served."""
    if engine == "sqlite":
        init_node(directory, node_id, None, 8080)
        join_alone(directory)
        yield directory
        return
    with postgres_database() as url:
        init_node(directory, node_id, url, 8080)
        join_alone(directory)
        yield directory

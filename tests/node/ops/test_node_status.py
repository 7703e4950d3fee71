"""``hrx node status``: the state of a node on one screen, each problem with what to do; its
exit status says whether anything is a problem."""

from __future__ import annotations

from pathlib import Path

from ledger.store import ChainStore
from node.base.config import load_config
from tests.helpers.nodes import init_node, invoke, join_alone


def status(directory: Path) -> tuple[int, str]:
    answer = invoke("node", "status", "--dir", str(directory))
    return answer.exit_code, " ".join(answer.output.split())  # unwrapped


def test_status_says_what_is_wrong_and_what_to_do(tmp_path: Path) -> None:
    directory = tmp_path / "hosp-a"
    init_node(directory, "hosp-a", None, 8123)
    code, text = status(directory)
    assert code == 1 and "joined no consortium" in text and "hrx node join" in text

    join_alone(directory)  # a roster written without --members-info: no member has a level
    code, text = status(directory)
    assert code == 0, text
    assert "schema ok" in text and "roster ok version 1, 1 members; role: witness" in text
    assert "keys ok the signing key is the one the roster lists" in text
    assert "recognition warning" in text and "no result from them is ever recognised" in text
    assert "--members-info" in text and "signing ok" in text

    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"MSH|^~\\&|LIS|H|HRX|H|20261201||ORU^R01|X1|P|2.5.1\rPID|||\r")
    assert invoke("adapters", "hl7-import", "--dir", str(directory), str(bad)).exit_code == 1
    code, text = status(directory)
    assert code == 0 and "adapters warning" in text and "hl7 1" in text
    assert "hrx adapters quarantine list" in text

    store = ChainStore(load_config(directory).database_url)
    try:
        store.hold_signing("hosp-b holds this node's own chain beyond its head")
    finally:
        store.close()
    code, text = status(directory)
    assert code == 1 and "signing problem held: hosp-b holds" in text
    assert "hrx node recover" in text

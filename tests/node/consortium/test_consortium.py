"""Joining a consortium (``hrx consortium roster|secret``, ``hrx node join``) and the
ledger's HTTP read API on a real node process."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import keys, merkle
from ledger.store import ChainStore, ChainWriter
from ledger.verify import Verifier
from node.base.config import load_config
from node.cli import main
from tests.helpers.nodes import init_node, serving


def hrx(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def authority_text(path: Path) -> str:
    return keys.public_key_text(keys.load_private_key(path))


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three initialised nodes, a signed roster of them, the secret; nobody joined yet."""
    root = tmp_path_factory.mktemp("consortium")
    for number, name in enumerate(("hosp-a", "hosp-b", "hosp-c")):
        init_node(root / name, name, None, 19100 + number)
    (root / "info.json").write_text(
        json.dumps(
            {
                "hosp-a": {
                    "level": "三级甲等",
                    "accreditation": [
                        {"category": "laboratory", "scope": "省HR", "until": "2027-12-31"}
                    ],
                },
            }
        )
    )
    assert hrx("consortium", "secret", "--out", str(root / "consortium.key")).exit_code == 0
    made = hrx(
        "consortium",
        "roster",
        "--authority-key",
        str(root / "authority.pem"),
        "--quorum",
        "2",
        "--consortium",
        "杭州市医联体",
        "--out",
        str(root / "roster.json"),
        "--members-info",
        str(root / "info.json"),
        *(str(root / n / "enrollment.json") for n in ("hosp-a", "hosp-b", "hosp-c")),
    )
    assert made.exit_code == 0, made.output
    return root


def test_roster_and_secret_files(consortium: Path) -> None:
    signed = json.loads((consortium / "roster.json").read_text())
    roster = signed["roster"]
    assert roster["version"] == 1 and roster["quorum"] == 2
    assert [m["id"] for m in roster["members"]] == ["hosp-a", "hosp-b", "hosp-c"]
    assert roster["members"][0]["level"] == "三级甲等"
    assert stat.S_IMODE((consortium / "consortium.key").stat().st_mode) == 0o600
    again = hrx("consortium", "secret", "--out", str(consortium / "consortium.key"))
    assert again.exit_code == 1 and "already exists" in again.output
    low = hrx(
        "consortium",
        "roster",
        "--authority-key",
        str(consortium / "authority.pem"),
        "--quorum",
        "1",
        "--consortium",
        "x",
        "--out",
        str(consortium / "low.json"),
        *(str(consortium / n / "enrollment.json") for n in ("hosp-a", "hosp-b", "hosp-c")),
    )
    assert low.exit_code == 0 and "warning: quorum 1 of 3 witnesses is below 2" in low.output


def test_roster_roles_from_witnesses_and_registry(consortium: Path) -> None:
    def roster(*flags: str) -> Any:
        return hrx(
            "consortium",
            "roster",
            "--authority-key",
            str(consortium / "authority.pem"),
            "--previous",
            str(consortium / "roster.json"),
            "--out",
            str(consortium / "roles.json"),
            *flags,
        )

    made = roster("--witnesses", "hosp-a,hosp-b", "--registry", "hosp-c")
    assert made.exit_code == 0, made.output
    members = json.loads((consortium / "roles.json").read_text())["roster"]["members"]
    assert [m["roles"] for m in members] == [["witness"], ["witness"], ["registry"]]
    # a quorum of 2 with one witness: refused, naming the problem; no roster written over
    (consortium / "roles.json").unlink()
    few = roster("--witnesses", "hosp-a")
    assert few.exit_code == 1 and "--quorum 2 is more than the 1 witnesses" in few.output
    assert not (consortium / "roles.json").exists()
    unknown = roster("--registry", "hosp-z")
    assert unknown.exit_code == 1 and "hosp-z" in unknown.output


def test_join_checks_everything(consortium: Path, tmp_path: Path) -> None:
    node_a = str(consortium / "hosp-a")
    roster = str(consortium / "roster.json")
    secret = str(consortium / "consortium.key")
    authority = authority_text(consortium / "authority.pem")
    no_anchor = hrx("node", "join", "--dir", node_a, "--roster", roster, "--secret", secret)
    assert no_anchor.exit_code == 1 and "--authority" in no_anchor.output
    other = keys.public_key_text(keys.load_or_create_private_key(tmp_path / "other.pem"))
    forged = hrx(
        "node",
        "join",
        "--dir",
        node_a,
        "--roster",
        roster,
        "--secret",
        secret,
        "--authority",
        other,
    )
    assert forged.exit_code == 1 and "signature" in forged.output
    # a stranger not in the roster
    init_node(tmp_path / "hosp-x", "hosp-x", None, 19199)
    stranger = hrx(
        "node",
        "join",
        "--dir",
        str(tmp_path / "hosp-x"),
        "--roster",
        roster,
        "--secret",
        secret,
        "--authority",
        authority,
    )
    assert stranger.exit_code == 1 and "does not list this node" in stranger.output
    joined = hrx(
        "node",
        "join",
        "--dir",
        node_a,
        "--roster",
        roster,
        "--secret",
        secret,
        "--authority",
        authority,
    )
    assert joined.exit_code == 0 and "roster version 1, 3 members" in joined.output
    same = hrx("node", "join", "--dir", node_a, "--roster", roster)
    assert same.exit_code == 1 and "not newer" in same.output
    # version 2 (hosp-c leaves) installs without repeating the anchor or the secret
    assert (
        hrx(
            "consortium",
            "roster",
            "--authority-key",
            str(consortium / "authority.pem"),
            "--quorum",
            "2",
            "--previous",
            roster,
            "--out",
            str(tmp_path / "v2.json"),
            "--remove",
            "hosp-c",
        ).exit_code
        == 0
    )
    second = hrx("node", "join", "--dir", node_a, "--roster", str(tmp_path / "v2.json"))
    assert second.exit_code == 0 and "roster version 2, 2 members" in second.output
    assert (consortium / "hosp-a/keys/consortium.key").read_text() == (
        consortium / "consortium.key"
    ).read_text()


def test_ledger_read_api(consortium: Path, tmp_path: Path) -> None:
    node_b = consortium / "hosp-b"
    joined = hrx(
        "node",
        "join",
        "--dir",
        str(node_b),
        "--roster",
        str(consortium / "roster.json"),
        "--secret",
        str(consortium / "consortium.key"),
        "--authority",
        authority_text(consortium / "authority.pem"),
    )
    assert joined.exit_code == 0, joined.output
    config = load_config(node_b)
    store = ChainStore(config.database_url)
    with ChainWriter(store, "hosp-b", keys.load_private_key(config.ed25519_key)) as writer:
        for number in range(25):
            writer.append("consent.granted", {"consent_id": f"c-{number}", "patient": "ab" * 32})
    store.close()
    with serving(node_b) as node:
        auditor = {"Authorization": f"Bearer {node.token('auditor', 'auditor')}"}

        def get(path: str, **kw: Any) -> Any:
            return requests.get(f"{node.base}/ledger{path}", headers=auditor, **kw)

        signed = get("/roster").json()
        assert signed == json.loads((consortium / "roster.json").read_text())
        heads = get("/heads").json()
        assert list(heads) == ["hosp-b"] and heads["hosp-b"]["header"]["tree_size"] == 25
        blocks = get("/chains/hosp-b/blocks", params={"from": 0, "limit": 1000}).json()
        verifier = Verifier(keys.parse_public_key(authority_text(consortium / "authority.pem")))
        verifier.add_roster(signed["roster"], signed["signature"])
        leaves = []
        for block in blocks:
            leaves += verifier.add_block(block["header"], block["signature"], block["entries"])
        summary = verifier.finish()
        assert summary.entries == 25
        entry = get("/chains/hosp-b/entries/7").json()
        assert entry["seq"] == 7 and entry["body"]["consent_id"] == "c-7"
        proof = get("/chains/hosp-b/proof/inclusion", params={"seq": 7}).json()
        root = bytes.fromhex(heads["hosp-b"]["header"]["tree_root"])
        merkle.verify_inclusion(
            merkle.leaf_hash(leaves[7]),
            7,
            proof["tree_size"],
            [bytes.fromhex(h) for h in proof["audit_path"]],
            root,
        )
        sizes = [b["header"]["tree_size"] for b in blocks]
        if len(sizes) > 1:
            consistency = get(
                "/chains/hosp-b/proof/consistency", params={"first": sizes[0], "second": sizes[-1]}
            ).json()
            assert "path" in consistency
        assert get("/chains/hosp-z/blocks").status_code == 404
        assert get("/chains/hosp-b/proof/inclusion", params={"seq": 99}).status_code in (400, 404)
        assert get("/evidence").json() == []
        # who may read
        assert requests.get(f"{node.base}/ledger/heads").status_code == 401
        doctor = {"Authorization": f"Bearer {node.token()}"}
        assert requests.get(f"{node.base}/ledger/heads", headers=doctor).status_code == 403


def _signed(
    member: str,
    key: Any,
    method: str,
    url: str,
    body: bytes = b"",
    created: Any = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign like a member node does, with a chosen ``created`` and nonce."""
    import secrets
    from datetime import UTC, datetime

    from http_message_signatures import HTTPMessageSigner, algorithms

    from node.consortium import signing as peer_auth

    message = peer_auth.Message(method, url, {})
    HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=peer_auth._OwnKey(member, key)
    ).sign(
        message,
        key_id=member,
        created=created or datetime.now(UTC),
        nonce=nonce or secrets.token_urlsafe(24),
        label="hrx",
        tag="hrx",
        covered_component_ids=peer_auth.COVERED,
        body=body,
    )
    return message.headers


def test_signed_member_requests(consortium: Path, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from node.consortium.signing import sign_request

    node_c = consortium / "hosp-c"
    joined = hrx(
        "node",
        "join",
        "--dir",
        str(node_c),
        "--roster",
        str(consortium / "roster.json"),
        "--secret",
        str(consortium / "consortium.key"),
        "--authority",
        authority_text(consortium / "authority.pem"),
    )
    assert joined.exit_code == 0, joined.output
    key_a = keys.load_private_key(consortium / "hosp-a" / "keys" / "node.pem")
    with serving(node_c) as node:
        config = load_config(node_c)
        url = f"{config.url}/ledger/heads"  # what the member signs: the node's public URL
        local = f"{node.base}/ledger/heads"

        def send(headers: dict[str, str], body: bytes = b"", method: str = "GET") -> Any:
            return requests.request(method, local, headers=headers, data=body)

        headers = sign_request("hosp-a", key_a, "GET", url)
        assert send(headers).status_code == 200
        replay = send(headers)
        assert replay.status_code == 401 and "replayed" in replay.json()["error"]
        stale = _signed(
            "hosp-a", key_a, "GET", url, created=datetime.now(UTC) - timedelta(seconds=301)
        )
        assert "age exceeds" in send(stale).json()["error"]
        future = _signed(
            "hosp-a", key_a, "GET", url, created=datetime.now(UTC) + timedelta(seconds=60)
        )
        assert "future" in send(future).json()["error"]
        stranger = Ed25519PrivateKey.generate()
        outsider = send(sign_request("hosp-x", stranger, "GET", url))
        assert outsider.status_code == 401 and "not a member" in outsider.json()["error"]
        forged = send(sign_request("hosp-a", stranger, "GET", url))
        assert forged.status_code == 401 and "signature" in forged.json()["error"].lower()
        other_target = send(sign_request("hosp-a", key_a, "GET", f"{config.url}/ledger/roster"))
        assert other_target.status_code == 401
        tampered = sign_request("hosp-a", key_a, "GET", url, b"{}")
        assert send(tampered, b"{ }").status_code == 401
        no_nonce = _signed("hosp-a", key_a, "GET", url, nonce="short")
        assert "nonce" in send(no_nonce).json()["error"]

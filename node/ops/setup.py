"""Setting a node up: making it (:func:`init_node`), bringing its database's schema up to this
version of hrx (:func:`upgrade_node`), and joining a consortium or installing a newer roster
(:func:`join_node`). ``hrx node init|upgrade|join`` and the test and demo harness call them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fhir_adapters.store.repository import rebuild_index
from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.model import check_chain_id
from ledger.roster import Roster, make_member
from ledger.store import ChainStore
from node.base.config import CONFIG_FILE, NodeConfig, load_config, write_config
from node.base.errors import ConfigError
from node.consortium.membership import (
    ENROLLMENT_FILE,
    NEXT_ENROLLMENT_FILE,
    install_roster,
    listed_next_keys,
    put_next_keys_in_place,
    read_roster_file,
    read_secret,
)
from node.db.engines import Database, open_database, upgrade
from node.records.consents import ConsentRecorder
from node.records.pseudonym_index import rebuild


def init_node(
    directory: Path,
    node_id: str,
    name: str,
    *,
    database_url: str | None = None,
    port: int = 8080,
    url: str | None = None,
) -> NodeConfig:
    """Make a node: configuration, keys, database and enrollment file. The directory is made
    (or tightened to) 0700 and everything in it is its user's alone. When any step fails, what
    this made is removed again, so that it can simply be run again."""
    check_chain_id(node_id)
    if (directory / CONFIG_FILE).exists():
        raise ConfigError(f"{directory} already holds a node ({CONFIG_FILE}); choose another")
    made = _Made(directory)
    umask = os.umask(0o077)  # every file made here (the database too) this user's alone
    try:
        return _init_node(directory, node_id, name, database_url, port, url)
    except BaseException:
        made.undo()
        raise
    finally:
        os.umask(umask)


class _Made:
    """What :func:`init_node` creates in a directory, so that a failed init can take it back:
    the directory itself when it was absent, else every entry that was not there before."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.existed = directory.exists()
        self.before = set(directory.iterdir()) if self.existed else set()

    def undo(self) -> None:
        if not self.existed:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for path in set(self.directory.iterdir()) - self.before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _init_node(
    directory: Path, node_id: str, name: str, db: str | None, port: int, url: str | None
) -> NodeConfig:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    (directory / "keys").mkdir(mode=0o700, exist_ok=True)
    url = (url or f"http://127.0.0.1:{port}").rstrip("/")
    write_config(
        directory,
        {
            "node": {"id": node_id, "name": name, "url": url},
            "server": {"host": "127.0.0.1", "port": port},
            "database": {"url": db or "sqlite:///hrx.db"},
            "keys": {
                "ed25519": "keys/node.pem",
                "bls": "keys/node.bls",
                "token": "keys/token.pem",
            },
        },
    )
    config = load_config(directory, environ={})
    signing_key = keys.load_or_create_private_key(config.ed25519_key)
    keys.load_or_create_private_key(config.token_key)
    from ledger import bls  # py_ecc takes ~0.4 s to import: only when a key is made

    bls_secret = bls.load_or_create_secret_key(config.bls_key)
    database = open_database(config.database_url)
    try:
        upgrade(database)
        store = ChainStore(database.write_engine)
        store.set_setting("chain", node_id)
        store.set_setting("key", str(config.ed25519_key))
    finally:
        database.close()
    enrollment = make_member(node_id, name, url, signing_key, bls_secret)
    (directory / ENROLLMENT_FILE).write_bytes(canonical_bytes(enrollment) + b"\n")
    return config


# Revisions whose hrx changed what the FHIR search index holds: an upgrade across one builds
# the index of every stored resource again (the rows it then holds are the ones this hrx
# writes, so searches find old and new resources alike).
REINDEXING = ("0011", "0012")


def upgrade_node(
    config: NodeConfig, progress: Callable[[int, int], None] | None = None
) -> tuple[str | None, str]:
    """Apply every migration this hrx needs (the patients indexed again after a change, and
    the search index rebuilt after a revision of :data:`REINDEXING`, with ``progress(done,
    total)``); the revisions before and after."""
    database = open_database(config.database_url)
    try:
        before, after = upgrade(database)
        if before != after and config.consortium_key.exists():
            index_patients(config, database)
        if before is not None and any(before < r <= after for r in REINDEXING):
            rebuild_index(database.write_engine, config.fhir_base, progress)
    finally:
        database.close()
    return before, after


def index_patients(config: NodeConfig, database: Database) -> int:
    """Index every Patient by its pseudonym (once the node holds the consortium's key)."""
    recorder = ConsentRecorder(config, ChainStore(database.engine))
    return rebuild(database.write_engine, recorder.pseudonym_of)


@dataclass(frozen=True)
class Joined:
    roster: Roster
    indexed: int  # patients indexed by pseudonym
    rotated: str | None  # a note, when the roster put this node's next keys in place


def join_node(
    config: NodeConfig,
    roster_path: Path,
    secret_path: Path | None = None,
    authority: str | None = None,
) -> Joined:
    """Join a consortium, or install a newer roster version of it (see
    :func:`node.consortium.membership.install_roster`). The pseudonym secret is needed on the
    first join, and the authority's public key too; a roster listing this node's next keys
    (``hrx node rotate-keys``) puts them in place. One ``enrollment.json`` is left, with the
    keys the roster lists now: never a stale one to send."""
    directory = config.directory
    roster, signature = read_roster_file(roster_path)
    upcoming = listed_next_keys(config, roster)
    secret_file = config.consortium_key
    if secret_path is not None:
        read_secret(secret_path)
    elif not secret_file.exists():
        raise ConfigError("first join: give the consortium's pseudonym secret")
    database = open_database(config.database_url)
    try:
        store = ChainStore(database.write_engine)
        if upcoming is not None:
            signing_key, bls_public = upcoming
        else:
            from ledger import bls  # py_ecc takes ~0.4 s to import: only when a key is read

            signing_key = keys.load_private_key(config.ed25519_key)
            bls_public = bls.public_key(bls.read_secret_key(config.bls_key))
        checked = install_roster(
            store, config.node_id, signing_key, bls_public, roster, signature, authority
        )
    finally:
        database.close()
    rotated = None
    if upcoming is not None:  # only once the roster listing them is installed
        rotated = put_next_keys_in_place(config, checked.version)
        (directory / NEXT_ENROLLMENT_FILE).unlink(missing_ok=True)
    listed = checked.member(config.node_id)
    enrollment = {k: listed[k] for k in ("id", "name", "url", "ed25519", "bls", "bls_pop")}
    (directory / ENROLLMENT_FILE).write_bytes(canonical_bytes(enrollment) + b"\n")
    if secret_path is not None and secret_path.resolve() != secret_file.resolve():
        if secret_file.exists() and read_secret(secret_file) != read_secret(secret_path):
            raise ConfigError(f"{secret_file} holds another consortium secret; never replaced")
        descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:  # never readable by others, not once
            handle.write(secret_path.read_bytes())
    database = open_database(config.database_url)
    try:
        indexed = index_patients(config, database)
    finally:
        database.close()
    return Joined(checked, indexed, rotated)

"""A node's configuration: ``node.toml`` in the node's directory, with environment overrides.

Every setting can be overridden by ``HRX_<SECTION>_<KEY>`` (``HRX_DATABASE_URL``,
``HRX_SERVER_PORT``...), which is how containers and gunicorn deployments set them. Unknown
sections or keys, and values of the wrong type, are refused with the setting named. Relative
paths are relative to the node's directory.

Secrets are not kept in ``node.toml``: the database password is read from
``database.password_file`` and the scrape token from ``metrics.token_file`` (files only the
node's user may read, like its keys), or given in the environment. A ``node.toml`` that every
user of the machine can read and that holds a password or a token is refused.
:func:`write_config` writes ``node.toml`` (mode 0640) with a password given in the database
URL moved to ``keys/database.password`` (mode 0600).
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from consent.pseudonym import RESIDENT_ID_SYSTEM
from node.base.errors import ConfigError

CONFIG_FILE = "node.toml"
CONFIG_MODE = 0o640  # the node's user writes it, its group may read it, nobody else
DATABASE_PASSWORD_FILE = "keys/database.password"  # where write_config puts a URL's password

# section -> key -> (type, default); None: required
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "node": {"id": (str, None), "name": (str, None), "url": (str, None)},
    # trusted_proxies: how many proxies in front (TLS ends there) set X-Forwarded-* headers
    "server": {"host": (str, "127.0.0.1"), "port": (int, 8080), "trusted_proxies": (int, 0)},
    # password_file: the password of database.url's user, in a file only the node's user reads
    "database": {"url": (str, None), "password_file": (str, "")},
    "keys": {
        "ed25519": (str, "keys/node.pem"),
        "bls": (str, "keys/node.bls"),
        "token": (str, "keys/token.pem"),
        "consortium": (str, "keys/consortium.key"),
    },
    "tokens": {"ttl": (int, 3600), "max_ttl": (int, 86400)},
    "audit": {"flush_ms": (int, 20)},
    # every member must match patients by the same identifier system (docs/spec.md §13.1)
    # staleness_seconds: how old a copy of a patient's consent chain a source may decide on
    # when the chain's author cannot be reached; sync_timeout_ms: how long it tries to reach it
    "consent": {
        "identifier_system": (str, RESIDENT_ID_SYSTEM),
        "staleness_seconds": (int, 60),
        "sync_timeout_ms": (int, 1000),
    },
    # rules: a mutual-recognition rules file ("" = the shipped default, exchange/rules)
    "exchange": {"timeout_ms": (int, 5000), "rules": (str, "")},
    # heartbeat_seconds: how often an idle ordinary member sends its head to the witnesses;
    # certificate_seconds: how often, at most, it takes a newer certificate from them
    "replication": {"heartbeat_seconds": (int, 30), "certificate_seconds": (int, 600)},
    "checkpoints": {
        "epoch_seconds": (int, 30),
        "epoch_blocks": (int, 1000),
        "slot_seconds": (int, 1),
    },
    # the PACS's DICOMweb root ("" = none) that hrx adapters dicomweb-sync pulls studies from;
    # interval_seconds: how often --watch syncs (0 = no schedule); overlap_days: how many days
    # before the last round each round's StudyDate range starts (docs/adapters-dicom.md);
    # grant_seconds: how long after a permitted access request the member may read the
    # released studies' images through /dicomweb; cors_origins: the web origins (comma
    # separated, e.g. a viewer's https://ohif.example) whose pages may call /dicomweb;
    # offload: the internal location of the proxy in front (nginx, X-Accel-Redirect) that
    # sends the PACS's images once the node has decided ("" = the node streams them itself)
    # (docs/node.md, Images)
    "dicomweb": {
        "url": (str, ""),
        "interval_seconds": (int, 0),
        "timeout_ms": (int, 10000),
        "overlap_days": (int, 1),
        "page_size": (int, 100),
        "grant_seconds": (int, 14400),
        "cors_origins": (str, ""),
        "offload": (str, ""),
    },
    # remote reading (docs/referral.md, Remote reading): how long a reader has for a consult of
    # each priority, and which modalities this member reads (comma separated DICOM modality
    # codes, e.g. "CT,MR,DX"; "" = it reads none and refuses consults)
    "consults": {
        "routine_minutes": (int, 1440),
        "urgent_minutes": (int, 60),
        "stat_minutes": (int, 30),
        "modalities": (str, ""),
    },
    # GET /metrics for Prometheus (docs/operations.md); token: when set, scrapers must send
    # "Authorization: Bearer <token>"; when "", only direct loopback clients are answered;
    # token_file: a file holding the token (instead of token)
    "metrics": {"enabled": (bool, True), "token": (str, ""), "token_file": (str, "")},
    # format: "json" (one object per line on stderr) or "text"; level: DEBUG ... CRITICAL
    "logging": {"format": (str, "json"), "level": (str, "INFO")},
}


# settings for which 0 means "none" or "off" (every other whole number must be at least 1)
_MAY_BE_ZERO = {"audit_flush_ms", "dicomweb_interval_seconds", "dicomweb_overlap_days"}
# text settings that may be given as "" (meaning none)
_MAY_BE_EMPTY = {
    "metrics_token",
    "metrics_token_file",
    "database_password_file",
    "dicomweb_cors_origins",
    "dicomweb_offload",
    "consults_modalities",
}
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
METRICS_TOKEN_MIN_LENGTH = 16


@dataclass(frozen=True)
class NodeConfig:
    directory: Path
    node_id: str
    name: str
    url: str  # the node's public base URL (its FHIR base is url + "/fhir")
    host: str
    port: int
    trusted_proxies: int
    database_url: str  # with the password of database.password_file in it, when one is set
    ed25519_key: Path
    bls_key: Path
    token_key: Path
    consortium_key: Path  # the pseudonym secret, written by hrx node join
    token_ttl: int
    token_max_ttl: int
    audit_flush_ms: int
    identifier_system: str  # the patient identifier pseudonyms are made of
    staleness_seconds: int
    sync_timeout_ms: int
    exchange_timeout_ms: int  # how long a referral waits for each member
    recognition_rules: Path | None  # None: the shipped default
    heartbeat_seconds: int  # an idle ordinary member's head goes to the witnesses this often
    certificate_seconds: int  # an ordinary member takes a newer certificate at most this often
    epoch_seconds: int  # certify at least this often while chains grow
    epoch_blocks: int  # or as soon as this many new blocks wait
    slot_seconds: int  # proposers take turns, a slot each
    dicomweb_url: str  # the PACS's DICOMweb root; "" when none is configured
    dicomweb_interval_seconds: int  # how often hrx adapters dicomweb-sync --watch syncs; 0: never
    dicomweb_timeout_ms: int  # per request to the PACS
    dicomweb_overlap_days: int  # each round re-reads this many days before the last one
    dicomweb_page_size: int  # QIDO-RS results asked for per request
    dicomweb_grant_seconds: int  # a member reads released studies' images this long after
    dicomweb_cors_origins: tuple[str, ...]  # web origins whose pages may call /dicomweb
    dicomweb_offload: str  # the proxy's internal location serving the PACS's images; "": none
    consult_minutes: tuple[tuple[str, int], ...]  # (priority, minutes a reader has to report)
    consult_modalities: tuple[str, ...]  # the DICOM modalities this member reads
    metrics_enabled: bool  # serve GET /metrics
    metrics_token: str  # the bearer token scrapers must send; "": loopback clients only
    log_format: str  # "json" or "text"
    log_level: str  # DEBUG, INFO, WARNING, ERROR or CRITICAL

    @property
    def fhir_base(self) -> str:
        return self.url.rstrip("/") + "/fhir"

    @property
    def database_url_redacted(self) -> str:
        """The database URL to show or log: its password, if any, as ``***``."""
        return _redacted(self.database_url)


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, not {value!r}")
    return value


def load_config(directory: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``DIR/node.toml`` and apply ``HRX_*`` overrides from ``environ``."""
    environ = os.environ if environ is None else environ
    directory = directory.expanduser().resolve()
    path = directory / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist; create a node with: hrx node init --dir {directory} ..."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _refuse_secrets_readable_by_all(path, raw)
    values: dict[str, Any] = {}
    for section, content in raw.items():
        if section not in SCHEMA or not isinstance(content, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key in content:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{path}: unknown setting {section}.{key}")
    for section, keys in SCHEMA.items():
        for key, (kind, default) in keys.items():
            name = f"{section}.{key}"
            env_name = f"HRX_{section}_{key}".upper()
            given = environ[env_name] if env_name in environ else raw.get(section, {}).get(key)
            if given == "" and f"{section}_{key}" in _MAY_BE_EMPTY:
                values[f"{section}_{key}"] = ""
                continue
            if env_name in environ:
                value = _coerce(f"{env_name} (environment)", kind, environ[env_name])
            elif key in raw.get(section, {}):
                value = _coerce(f"{path}: {name}", kind, raw[section][key])
            elif default is not None:
                value = default
            else:
                raise ConfigError(f"{path}: {name} is required")
            values[f"{section}_{key}"] = value
    if not 0 < values["server_port"] < 65536:
        raise ConfigError(f"server.port {values['server_port']} is not a TCP port")
    if values["server_trusted_proxies"] < 0:
        raise ConfigError("server.trusted_proxies cannot be negative")
    for name in (
        "tokens_ttl",
        "tokens_max_ttl",
        "audit_flush_ms",
        "replication_heartbeat_seconds",
        "replication_certificate_seconds",
        "checkpoints_epoch_seconds",
        "checkpoints_epoch_blocks",
        "checkpoints_slot_seconds",
        "exchange_timeout_ms",
        "consent_staleness_seconds",
        "consent_sync_timeout_ms",
        "dicomweb_interval_seconds",
        "dicomweb_timeout_ms",
        "dicomweb_overlap_days",
        "dicomweb_page_size",
        "dicomweb_grant_seconds",
        "consults_routine_minutes",
        "consults_urgent_minutes",
        "consults_stat_minutes",
    ):
        least = 0 if name in _MAY_BE_ZERO else 1
        if values[name] < least:
            raise ConfigError(f"{name.replace('_', '.', 1)} must be at least {least}")

    offload = values["dicomweb_offload"]
    if offload and not re.fullmatch(r"/[A-Za-z0-9_\-/]+", offload):
        raise ConfigError(f"dicomweb.offload {offload!r} is not a location path (e.g. /_hrx_pacs)")
    if values["dicomweb_url"] and not values["dicomweb_url"].startswith(("http://", "https://")):
        raise ConfigError(
            f"dicomweb.url {values['dicomweb_url']!r} is not an http:// or https:// URL "
            "(the PACS's DICOMweb root, e.g. http://pacs.example:8042/dicom-web)"
        )

    if values["logging_format"] not in LOG_FORMATS:
        raise ConfigError(
            f"logging.format is one of {', '.join(LOG_FORMATS)}, not {values['logging_format']!r}"
        )
    if values["logging_level"].upper() not in LOG_LEVELS:
        raise ConfigError(
            f"logging.level is one of {', '.join(LOG_LEVELS)}, not {values['logging_level']!r}"
        )

    def resolve(value: str) -> Path:
        return (directory / value).resolve()

    database_url = values["database_url"]
    if values["database_password_file"]:
        if _password_of(database_url) is not None:
            raise ConfigError(
                "database.url holds a password and database.password_file is set: give the "
                "password one way (the file)"
            )
        password = read_secret_file(
            resolve(values["database_password_file"]), "database.password_file"
        )
        database_url = _with_password(database_url, password)
    if values["metrics_token_file"]:
        if values["metrics_token"]:
            raise ConfigError(
                "metrics.token and metrics.token_file are both set: give the token one way"
            )
        values["metrics_token"] = read_secret_file(
            resolve(values["metrics_token_file"]), "metrics.token_file"
        )
    token = values["metrics_token"]
    if token and (len(token) < METRICS_TOKEN_MIN_LENGTH or not re.fullmatch(r"[!-~]+", token)):
        raise ConfigError(
            f"metrics.token must be at least {METRICS_TOKEN_MIN_LENGTH} printable ASCII "
            "characters without spaces (make one with: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'), or empty for none"
        )

    return NodeConfig(
        directory=directory,
        node_id=values["node_id"],
        name=values["node_name"],
        url=values["node_url"].rstrip("/"),
        host=values["server_host"],
        port=values["server_port"],
        trusted_proxies=values["server_trusted_proxies"],
        database_url=_database_url(database_url, directory),
        ed25519_key=resolve(values["keys_ed25519"]),
        bls_key=resolve(values["keys_bls"]),
        token_key=resolve(values["keys_token"]),
        consortium_key=resolve(values["keys_consortium"]),
        token_ttl=values["tokens_ttl"],
        token_max_ttl=values["tokens_max_ttl"],
        audit_flush_ms=values["audit_flush_ms"],
        identifier_system=values["consent_identifier_system"],
        staleness_seconds=values["consent_staleness_seconds"],
        sync_timeout_ms=values["consent_sync_timeout_ms"],
        exchange_timeout_ms=values["exchange_timeout_ms"],
        recognition_rules=resolve(values["exchange_rules"]) if values["exchange_rules"] else None,
        heartbeat_seconds=values["replication_heartbeat_seconds"],
        certificate_seconds=values["replication_certificate_seconds"],
        epoch_seconds=values["checkpoints_epoch_seconds"],
        epoch_blocks=values["checkpoints_epoch_blocks"],
        slot_seconds=values["checkpoints_slot_seconds"],
        dicomweb_url=values["dicomweb_url"].rstrip("/"),
        dicomweb_interval_seconds=values["dicomweb_interval_seconds"],
        dicomweb_timeout_ms=values["dicomweb_timeout_ms"],
        dicomweb_overlap_days=values["dicomweb_overlap_days"],
        dicomweb_page_size=values["dicomweb_page_size"],
        dicomweb_grant_seconds=values["dicomweb_grant_seconds"],
        dicomweb_cors_origins=_origins(values["dicomweb_cors_origins"]),
        dicomweb_offload=values["dicomweb_offload"].rstrip("/"),
        consult_minutes=tuple(
            (p, values[f"consults_{p}_minutes"]) for p in ("stat", "urgent", "routine")
        ),
        consult_modalities=_modalities(values["consults_modalities"]),
        metrics_enabled=values["metrics_enabled"],
        metrics_token=values["metrics_token"],
        log_format=values["logging_format"],
        log_level=values["logging_level"].upper(),
    )


def _database_url(value: str, directory: Path) -> str:
    """``sqlite:///relative.db`` is relative to the node directory; URLs pass through."""
    prefix = "sqlite:///"
    if value.startswith(prefix) and not value[len(prefix) :].startswith("/"):
        return prefix + str((directory / value[len(prefix) :]).resolve())
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    return value


def read_secret_file(path: Path, setting: str) -> str:
    """The secret in ``path`` (one line; the line break after it is not part of it), refused
    when the file is missing, empty or readable by anyone but its owner."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{setting}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{setting}: {path} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    secret = text.rstrip("\r\n")
    if not secret or "\n" in secret:
        raise ConfigError(f"{setting}: {path} must hold the secret on one line")
    return secret


def _refuse_secrets_readable_by_all(path: Path, raw: dict[str, Any]) -> None:
    """Refuse a ``node.toml`` that every user may read when it holds a password or a token."""
    if not path.stat().st_mode & stat.S_IROTH:
        return
    found = []
    for section, key in (("database", "url"), ("dicomweb", "url")):
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and _password_of(value) is not None:
            found.append(f"a password in {section}.{key}")
    if raw.get("metrics", {}).get("token"):
        found.append("metrics.token")
    if found:
        raise ConfigError(
            f"{path} is readable by every user and holds {' and '.join(found)}: put the "
            "database password in database.password_file and the token in metrics.token_file "
            "(files of mode 0600), or give them in the environment, or at least run: "
            f"chmod 640 {path}"
        )


def _password_of(url: str) -> str | None:
    if "://" not in url:
        return None
    try:
        return sa.engine.make_url(url).password or None
    except sa.exc.ArgumentError:
        return None


def _with_password(url: str, password: str) -> str:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(f"database.url {url!r} is not a database URL") from None
    if parsed.get_backend_name() == "sqlite":
        raise ConfigError("database.password_file is set, but a SQLite database has no password")
    return parsed.set(password=password).render_as_string(hide_password=False)


def _redacted(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def _origins(text: str) -> tuple[str, ...]:
    """Web origins from a comma-separated list, each ``scheme://host[:port]`` (no path)."""
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?", origin):
            raise ConfigError(
                f"dicomweb.cors_origins: {origin!r} is not a web origin "
                "(scheme://host or scheme://host:port, e.g. https://viewer.example)"
            )
    return origins


def _modalities(text: str) -> tuple[str, ...]:
    """DICOM modality codes from a comma-separated list (two to sixteen capitals or digits)."""
    codes = tuple(c.strip().upper() for c in text.split(",") if c.strip())
    for code in codes:
        if not re.fullmatch(r"[A-Z0-9]{2,16}", code):
            raise ConfigError(
                f"consults.modalities: {code!r} is not a DICOM modality code (CT, MR, DX...)"
            )
    return codes


def write_config(directory: Path, settings: dict[str, dict[str, Any]]) -> Path:
    """Write ``node.toml`` (mode 0640, whatever the umask; replaced whole, never half written).

    A password in ``settings["database"]["url"]`` is not written there: it goes to
    ``keys/database.password`` (mode 0600), which ``database.password_file`` then names.
    (TOML basic strings are JSON strings, so json.dumps quotes the values.)"""
    settings = {section: dict(content) for section, content in settings.items()}
    database = settings.get("database", {})
    password = _password_of(str(database.get("url", "")))
    if password is not None:
        database["url"] = _without_password(str(database["url"]))
        database["password_file"] = DATABASE_PASSWORD_FILE
        _write_private(directory / DATABASE_PASSWORD_FILE, password + "\n", 0o600)
    lines = ["# hrx node configuration; every setting can be overridden by HRX_<SECTION>_<KEY>."]
    for section, content in settings.items():
        lines.append(f"\n[{section}]")
        for key, value in content.items():
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    path = directory / CONFIG_FILE
    _write_private(path, "\n".join(lines) + "\n", CONFIG_MODE)
    return path


def _without_password(url: str) -> str:
    parsed = sa.engine.make_url(url)
    without = sa.engine.URL.create(  # URL.set(password=None) would keep the password
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    )
    return without.render_as_string(hide_password=False)


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write ``path`` through a temporary file renamed over it, with exactly ``mode``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

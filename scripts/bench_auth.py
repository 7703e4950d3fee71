"""What checking a bearer token costs, now that every request reads its standing.

A fresh node (SQLite, or PostgreSQL with --db) with one doctor; in this process, on the node's
own engines:

- authenticate: ``TokenAuthority.authenticate`` as each request runs it: the signature check
  (cached after the first time) and the token's standing, one query of two primary-key reads
  (is the user active, removed, of which token generation; is this token revoked by id);
- ceiling: the same with the standing answered from memory, as a cache would (what the call
  costs without reading the database);
- round trip: ``SELECT 1`` on a SQLAlchemy connection from the same pool (what the least read
  made the usual way costs).

Prints each figure in microseconds per call and calls per second, beside the ceiling.

    python3 scripts/bench_auth.py [--db URL] [--seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from node.base.config import load_config
from node.demo.nodes import free_port, init_node
from node.identity.tokens import TokenAuthority
from node.identity.users import add_user, token_standing
from node.services import open_services

ROOT = Path(__file__).resolve().parent.parent


def rate(function: Callable[[], object], seconds: float) -> float:
    """Calls per second of a function of no arguments."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            function()
        count += 100
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: SQLite)")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="hrx-bench-auth-")) / "hosp-a"
    init_node(directory, "hosp-a", args.db, free_port())
    services = open_services(load_config(directory))
    try:
        user = add_user(services.database.write_engine, "dr-bench", "doctor")
        header = f"Bearer {services.tokens.issue(user, None, 3600)}"
        checked = services.tokens
        standing = token_standing(services.database.engine, "dr-bench", "x")
        from_memory = TokenAuthority(checked.key, checked.issuer, lambda _user, _jti: standing)
        assert checked.authenticate(header).username == "dr-bench"
        for authority in (checked, from_memory):  # warm up: signatures cached, pools filled
            rate(lambda a=authority: a.authenticate(header), 0.5)
        real = rate(lambda: checked.authenticate(header), args.seconds)
        ceiling = rate(lambda: from_memory.authenticate(header), args.seconds)

        def round_trip() -> None:
            with services.database.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").all()

        trip = rate(round_trip, args.seconds)
    finally:
        services.close()
    engine = "PostgreSQL" if args.db else "SQLite"
    print(f"{'token check, ' + engine:32} {'µs/call':>10} {'per s':>10}")
    print(f"{'authenticate (reads standing)':32} {1e6 / real:10.1f} {real:10,.0f}")
    print(f"{'ceiling (standing from memory)':32} {1e6 / ceiling:10.1f} {ceiling:10,.0f}")
    print(f"{'round trip (SELECT 1 from pool)':32} {1e6 / trip:10.1f} {trip:10,.0f}")
    print(f"{'the standing read costs':32} {1e6 / real - 1e6 / ceiling:10.1f}")


if __name__ == "__main__":
    main()

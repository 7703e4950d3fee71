"""A separate appending process for the concurrency and crash tests.

``python -m tests.ledger.append_worker DB_URL KEY_PATH WORKER COUNT ACK_FILE [THREADS]``
appends COUNT entries ``{"worker": WORKER, "n": n}`` to chain hosp-a with THREADS threads, and
after each append returns (its block is durable) writes ``n seq`` to ACK_FILE and flushes it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from ledger import keys
from ledger.store import ChainStore, ChainWriter


def main() -> None:
    url, key_path, worker, count, ack_path = sys.argv[1:6]
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    writer = ChainWriter(ChainStore(url), "hosp-a", keys.load_private_key(Path(key_path)))
    lock = threading.Lock()
    with open(ack_path, "a", buffering=1) as acks:

        def work(first: int) -> None:
            for n in range(first, int(count), threads):
                seq = writer.append("access.requested", {"worker": int(worker), "n": n})
                with lock:
                    acks.write(f"{n} {seq}\n")
                    acks.flush()
                    os.fsync(acks.fileno())

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    writer.close()


if __name__ == "__main__":
    main()

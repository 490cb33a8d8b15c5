"""A storm client as a process of its own, for faults that kill clients: it allocates, then keeps
its allocation alive until it is killed (or --hold-s passes, then it releases and exits).

    python -m tests.faults.storm_client --addresses H:P,H:P --name p0 --gpus 1 --ttl 5 --out ops.jsonl

Every completed operation is appended to --out as one JSON line (tests.faults.history.Op) and
flushed at once, so the history survives the SIGKILL the test sends.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from tests.faults.history import History, Op
from tests.faults.storm import StormClient, StormResult


class _AppendingHistory(History):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def _append(self, op: Op) -> None:
        super()._append(op)
        self._file.write(json.dumps(op.to_json()) + "\n")
        self._file.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--addresses", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--hold-s", type=float, default=120.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    history = _AppendingHistory(Path(args.out))
    worker = StormClient(args.name, args.addresses.split(","), history, StormResult(), threading.Lock(),
                         gpus=(args.gpus,), ttl=args.ttl, timeout=args.timeout, retry_deadline=args.timeout,
                         hold_s=(0.0, 0.0), seed=0)  # fmt: skip
    request_id = f"{args.name}-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + args.hold_s
    op, info = worker.allocate(request_id, args.gpus)
    while info is None and op.outcome != "fail" and time.monotonic() < deadline:
        time.sleep(0.2)
        op, info = worker.allocate(request_id, args.gpus)
    if info is None:
        print(f"no allocation: {op.error}", file=sys.stderr)
        return 1
    # Renew well within the TTL until killed.
    while time.monotonic() < deadline:
        worker.keepalive(op.allocation_id, request_id)
        time.sleep(max(0.2, args.ttl / 5))
    worker.release(op.allocation_id, request_id)
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The node daemon's end of the control pipe to its stage's leader executor (answered by _control_loop in
node/executor.py): ("configure", epoch, next_address, data_key) -> ("configured", epoch), ("stats",) ->
("stats", [LinkTraffic fields as dicts]); a request the executor does not know -> ("unknown", op).

Two daemon threads share the pipe: LoadStage (configure) and the heartbeats (stats, every interval). A lock
keeps a request and its answer together, and every wait is bounded, so a busy executor delays a heartbeat
by at most its timeout. The executor answers every request, in order; an answer that came too late for
its request is therefore still in the pipe, ahead of the next request's, and is read and dropped then.
"""

from __future__ import annotations

import threading
import time


class ControlPipe:
    def __init__(self, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
        self.conn = conn
        self._lock = threading.Lock()
        self._unanswered = 0  # requests sent whose answers have not been read

    def ask(self, request: tuple, *, timeout_s: float) -> tuple | None:
        """Send ``request`` and return its answer; None when the pipe is busy or broken, or the answer does
        not come within ``timeout_s`` (all of it counted: waiting for the lock, then for the answer)."""
        deadline = time.monotonic() + timeout_s
        if not self._lock.acquire(timeout=timeout_s):
            return None  # another request is waiting on the executor
        try:
            self.conn.send(request)
            self._unanswered += 1
            while self.conn.poll(max(deadline - time.monotonic(), 0.0)):
                answer = self.conn.recv()
                self._unanswered -= 1
                if self._unanswered == 0:
                    return answer  # the last one sent: ours
            return None
        except (OSError, EOFError):  # the executor is gone: the daemon's watcher reports it
            return None
        finally:
            self._lock.release()

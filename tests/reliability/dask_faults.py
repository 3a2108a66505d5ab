"""A Dask worker plugin that kills its own worker process with SIGKILL in the middle of a task, once per test.

Imported by the worker processes (the plugin travels by reference), so it lives in a module of its own. The
first task to start executing on any worker arms a timer; when it fires and that task is still executing, the
worker records ``<pid> <task key>`` in ``flag`` (created exclusively, so a restarted worker never kills again)
and SIGKILLs itself. Every task start and end is appended to ``log`` as ``start|end <pid> <key>``.
"""

from __future__ import annotations

import os
import signal
import threading

from distributed.diagnostics.plugin import WorkerPlugin


class KillWorkerOnce(WorkerPlugin):
    idempotent = True

    def __init__(self, *, flag: str, log: str, delay_s: float) -> None:
        self.flag, self.log, self.delay_s = flag, log, delay_s

    def setup(self, worker) -> None:
        self.worker = worker
        self.armed = not os.path.exists(self.flag)

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" or start == "executing":
            with open(self.log, "a") as f:
                f.write(f"{'start' if finish == 'executing' else 'end'} {os.getpid()} {key}\n")
        if finish == "executing" and self.armed:
            self.armed = False
            threading.Timer(self.delay_s, self._fire, (key,)).start()

    def _fire(self, key) -> None:
        task = self.worker.state.tasks.get(key)
        if task is None or task.state != "executing":
            self.armed = True  # that task finished first: try again with the next one
            return
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {key}".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

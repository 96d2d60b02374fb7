"""Long-lived worker processes that run cases and survive crashing kernels.

Each worker gets its own pipe, so the parent always knows which cases a worker holds. A
worker sends one result per case as soon as it is done; when its process dies (segfault,
abort) the first case it had not answered is the one that crashed it. The parent reports that
case, starts a fresh worker and hands it the rest. A case running longer than `timeout`
seconds is reported as a hang and its worker is killed.

Workers come from the 'forkserver' context (or 'spawn' where there is none): OpenMP's thread
pool does not survive a fork of a process that has used it, while the fork server only
imports the modules (no kernel runs there), so a new worker starts in milliseconds, which
keeps crash-heavy shrinking fast.
"""
from __future__ import annotations

import collections
import faulthandler
import multiprocessing as mp
import os
import signal
import tempfile
import time
from multiprocessing.connection import wait

# Cases sent to a worker at a time, and the backlog at which it gets more: enough to hide
# the pipe round trip, few enough that the work spreads evenly.
BATCH = 4
LOW_WATER = 2


def _worker_main(conn, crash_log):
    # Ctrl-C is the parent's to handle: it stops handing out cases and reports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Python's own stack of a fatal signal goes to a file the parent reads after a crash.
    log = open(crash_log, "w")
    faulthandler.enable(file=log)
    from . import check, impls       # after faulthandler: imports may crash too
    conn.send("ready")
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for key, case, impl_name in batch:
            log.seek(0)
            log.truncate()
            conn.send((key, check.run_case(case, impls.get(impl_name))))


class _Worker:
    def __init__(self, ctx, log_dir, slot):
        self.log = os.path.join(log_dir, f"worker-{slot}.log")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.log), daemon=True,
                                name=f"fuzz-worker-{slot}")
        self.proc.start()
        child.close()
        self.pending = collections.deque()      # (key, case, impl) sent, not yet answered
        self.since = time.monotonic()           # when its oldest pending case started

    def wait_ready(self, timeout=120.0):
        """Block until the worker has imported everything (so timings exclude start-up)."""
        if not (self.conn.poll(timeout) and self.conn.recv() == "ready"):
            raise RuntimeError(f"fuzz worker did not start: {self.crash_message()}")

    def crash_message(self) -> str:
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
        else:
            what = f"exited with code {code}"
        try:
            with open(self.log) as f:
                # The Python stack; the list of loaded extension modules after it is noise.
                stack = f.read().split("\nExtension modules:")[0].strip()
        except OSError:
            stack = ""
        return f"worker process {what}" + (f"\n{stack}" if stack else "")

    def stop(self, kill=False):
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class WorkerPool:
    """`jobs` worker processes; `run(tasks)` yields (key, case, result) as cases finish."""

    def __init__(self, jobs: int = 1, timeout: float = 300.0):
        self.jobs = max(1, int(jobs))
        self.timeout = timeout
        # Workers share the cores with each other: OpenMP threads that spin while waiting
        # for work would steal them (tiny cases then take milliseconds per call). Set
        # before the fork server starts, which reads it once for all workers.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if "forkserver" in mp.get_all_start_methods():
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(["fuzz.check", "fuzz.impls", "fuzz.mutants"])
        else:
            self._ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="dilconv-fuzz-")
        self._workers = [_Worker(self._ctx, self._dir.name, i) for i in range(self.jobs)]
        for worker in self._workers:
            worker.wait_ready()
        self.restarts = 0

    def _start(self, slot):
        worker = _Worker(self._ctx, self._dir.name, slot)
        worker.wait_ready()
        return worker

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for worker in self._workers:
            worker.stop()
        self._workers = []
        self._dir.cleanup()

    def run(self, tasks):
        """Run an iterable of (key, case, impl_name); yield (key, case, result) as they
        finish, in any order. Stopping the iteration early drops the unstarted tasks and
        waits for (and discards) the cases already handed out."""
        tasks = iter(tasks)
        requeue = collections.deque()
        exhausted = False
        try:
            while True:
                for slot, worker in enumerate(self._workers):
                    if len(worker.pending) > LOW_WATER - 1:
                        continue
                    batch = []
                    while len(worker.pending) + len(batch) < BATCH and (
                            requeue or not exhausted):
                        if requeue:
                            batch.append(requeue.popleft())
                            continue
                        try:
                            batch.append(next(tasks))
                        except StopIteration:
                            exhausted = True
                    if batch:
                        if not worker.pending:
                            worker.since = time.monotonic()
                        worker.pending.extend(batch)
                        worker.conn.send(batch)
                busy = [w for w in self._workers if w.pending]
                if not busy:
                    return
                yield from self._collect(busy, requeue)
        finally:
            self._drain()

    def _collect(self, busy, requeue):
        """Wait for results (or deaths, or hangs) of busy workers."""
        now = time.monotonic()
        deadline = min(w.since for w in busy) + self.timeout
        ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                     timeout=max(0.0, deadline - now))
        for slot, worker in enumerate(self._workers):
            if not worker.pending:
                continue
            died = worker.proc.sentinel in ready
            while worker.pending and worker.conn.poll():
                try:
                    key, result = worker.conn.recv()
                except (EOFError, OSError):
                    died = True
                    break
                task = worker.pending.popleft()
                worker.since = time.monotonic()
                yield task[0], task[1], result
            hung = worker.pending and time.monotonic() - worker.since > self.timeout
            if worker.pending and (died or hung or not worker.proc.is_alive()):
                worker.proc.join(timeout=1 if died else 0)
                key, case, _ = worker.pending.popleft()
                if hung and worker.proc.is_alive():
                    worker.stop(kill=True)
                    message = f"case did not finish within {self.timeout:g} s (killed)"
                    kind = "timeout"
                else:
                    message = worker.crash_message()
                    kind = "crash"
                    worker.stop(kill=True)
                requeue.extend(worker.pending)
                self._workers[slot] = self._start(slot)
                self.restarts += 1
                yield key, case, crash_result(case, kind, message)

    def _drain(self):
        """Wait for every handed-out case and drop its result, so the next run starts
        clean (a crash here only restarts the worker)."""
        for _ in self._collect_all():
            pass

    def _collect_all(self):
        while True:
            busy = [w for w in self._workers if w.pending]
            if not busy:
                return
            yield from self._collect(busy, collections.deque())


def crash_result(case, kind, message) -> dict:
    return {"id": case["id"], "status": "fail", "checked": [], "ratios": {}, "cpu_s": 0.0,
            "skip_reason": None,
            "failures": [{"op": "process", "kind": kind, "message": message}]}

"""A benchmark worker: one peer in one process, driven over a socket by the
runner (bench/runner.py).  One peer per process because two OpenMP runtimes in
one process (torch ships its own libgomp) spin against each other and ruin both
timings; the runner sets each worker's thread variables before it starts.

    python -m bench.worker PEER THREADS FD

Requests (pickled dicts, ``op`` says which) and their answers:
    hello                       -> peer info (versions, threads in effect)
    setup case min_time check   -> per direction: calls per sample ("inner"), or a
                                   skip reason / error; convgen also names its kernels
    time direction              -> seconds per call, over one sample of inner calls
    quiet                       -> returns once the process's threads stop spinning
    peak threads repeats        -> measured FMA peak (convgen worker only)
    quit
"""

import gc
import math
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection

CHECK_SAMPLES = 1 << 15   # elements of each output sent back for the agreement check


def _sample(a):
    import numpy as np
    a = np.asarray(a).reshape(-1)
    step = max(1, a.size // CHECK_SAMPLES)
    return a[::step].astype(np.float64)


def calibrate(run, min_time):
    """Warm up, then the number of calls that makes one sample last min_time
    (the first timed call is the second call: warm, and not wasted on slow cases).
    The call time is the fastest of at least two timed batches: one slow call (a
    page fault, another job) must not shrink every sample to a few calls, whose
    first call after another peer's then weighs on the median (a 0.4 ms backward
    once calibrated at 3 calls per sample and measured 1.0 ms)."""
    run()
    n, batches, per_call = 1, 0, math.inf
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        elapsed = time.perf_counter() - t0
        per_call, batches = min(per_call, elapsed / n), batches + 1
        if (elapsed >= min_time / 4 and batches >= 2) or n >= 4096:
            break
        n *= 4
    return max(1, min(100_000, math.ceil(min_time / max(per_call, 1e-9)))), per_call


class Worker:
    def __init__(self, peer_name, threads):
        from .peers import PEERS
        self.peer = PEERS[peer_name](threads)
        self.threads = threads
        self.runs = {}
        self.inner = {}

    def hello(self, msg):
        return {"peer": self.peer.name, "pid": os.getpid(), "info": self.peer.info()}

    def setup(self, msg):
        from .peers import Skip
        self.runs.clear()
        self.inner.clear()
        gc.collect()
        case = msg["case"]
        answer = {"inner": {}, "first": {}, "skip": {}, "error": {}, "outputs": {}, "kernel": {}}
        for d in msg.get("directions") or case["directions"]:
            try:
                if hasattr(self.peer, "kernel"):
                    answer["kernel"][d] = self.peer.kernel(case, d)
                run, outputs = self.peer.make(case, d)
                inner, per_call = calibrate(run, msg["min_time"])
                if msg.get("check"):
                    answer["outputs"][d] = [_sample(o) for o in outputs()]
            except Skip as e:
                answer["skip"][d] = str(e)
                continue
            except Exception:  # reported, and the other directions still run
                answer["error"][d] = traceback.format_exc(limit=6)
                continue
            self.runs[d], self.inner[d] = run, inner
            answer["inner"][d], answer["first"][d] = inner, per_call
        return answer

    def time(self, msg):
        d = msg["direction"]
        run, inner = self.runs[d], self.inner[d]
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(inner):
                run()
            elapsed = time.perf_counter() - t0
        finally:
            if gc_was_enabled:
                gc.enable()
        return {"seconds": elapsed / inner}

    def quiet(self, msg):
        """Return once this process stops burning CPU after its last call.

        Thread pools keep spinning after a call returns (libgomp ~4 ms, onnxruntime
        ~30 ms here), which would steal the cores of the next peer timed; the
        runner waits for that here.  The process CPU clock counts every thread."""
        # Other threads' CPU time is only accounted at scheduler ticks (every few ms),
        # so judge a trailing window of several ticks, not one short step.
        step, window = msg.get("step", 0.002), msg.get("window", 0.01)
        start = time.perf_counter()
        deadline = start + msg.get("timeout", 0.25)
        steps = []
        while True:
            c0, t0 = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID), time.perf_counter()
            time.sleep(step)
            now = time.perf_counter()
            steps.append((time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID) - c0, now - t0))
            used = wall = 0.0
            for u, w in reversed(steps):
                used, wall = used + u, wall + w
                if wall >= window:
                    break
            quiet = wall >= window and used < 0.1 * wall
            if quiet or now > deadline:
                return {"waited": now - start, "quiet": quiet}

    def peak(self, msg):
        from convgen._generated import _peak
        result = {}
        for threads in sorted({1, msg["threads"]}):
            for dtype in ("f32", "f64"):
                fn = getattr(_peak, f"peak_{dtype}")
                gflops, seconds = fn(threads, 100_000)
                iters = max(100_000, int(100_000 * msg.get("seconds", 0.1) / max(seconds, 1e-6)))
                trials = [fn(threads, iters)[0] for _ in range(msg.get("repeats", 5))]
                result[f"{dtype}_t{threads}"] = {"gflops": max(trials), "trials": trials}
        return result


def serve(conn, worker):
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        op = msg.get("op")
        if op == "quit":
            conn.send({"ok": True})
            return
        try:
            answer = getattr(worker, op)(msg)
        except Exception:
            answer = {"fatal": traceback.format_exc(limit=8)}
        conn.send(answer)


def main(argv=None):
    peer, threads, fd = (argv or sys.argv[1:])[:3]
    sock = socket.socket(fileno=int(fd))
    conn = Connection(sock.detach())
    try:
        worker = Worker(peer, int(threads))
    except Exception:
        conn.send({"fatal": traceback.format_exc(limit=8)})
        return 1
    conn.send({"ready": True})
    serve(conn, worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())

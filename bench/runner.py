"""Drives the peers' worker processes in alternating rounds.

For each case every worker first builds its inputs, warms up and calibrates how
many calls make one sample (``setup``).  Then, round after round, every peer
times one sample of every direction, the peers' order rotating each round, so
slow drifts of a shared machine (other jobs, clock changes) hit all peers alike.
After its turn a peer is asked to wait until its thread pool has stopped
spinning (``quiet``), so it does not steal the cores of the peer timed next.
The figure of merit is the median over rounds of seconds per call.
"""

import math
import os
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from .progress import Progress
from .suite import PEER_THREADS, ROOT

# Relative error (max |a - b| / max |ref|) above which two peers "disagree".
CHECK_TOL = {"float32": 1e-3, "float64": 1e-9}


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class WorkerDied(RuntimeError):
    pass


def worker_env(peer, threads):
    """Every peer gets the same number of threads; only the numpy peer's BLAS is threaded."""
    env = dict(os.environ)
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n if peer == "numpy" else "1",
               # OpenBLAS threads busy-wait 2**28 cycles (~0.1 s) after a call by default;
               # 2**20 keeps an idle numpy worker from stealing the next peer's cores.
               OPENBLAS_THREAD_TIMEOUT="20", PYTHONPATH=os.pathsep.join(
                   [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


class WorkerProcess:
    """One peer's worker process and the socket to it."""

    def __init__(self, peer, threads, python=sys.executable):
        self.peer, self.threads, self.python = peer, threads, python
        self.proc = self.conn = None
        self.start()

    def start(self):
        mine, theirs = socket.socketpair()
        self.proc = subprocess.Popen([self.python, "-m", "bench.worker", self.peer, str(self.threads),
                                      str(theirs.fileno())], pass_fds=(theirs.fileno(),), cwd=ROOT,
                                     env=worker_env(self.peer, self.threads), stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        first = self._recv()
        if "fatal" in first:
            self.close()
            raise WorkerDied(f"{self.peer} worker failed to start:\n{first['fatal']}")
        self.info = self.request(op="hello")

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError) as e:
            code = self.proc.poll() if self.proc else None
            raise WorkerDied(f"{self.peer} worker died (exit code {code}): {e!r}") from None

    def request(self, **msg):
        try:
            self.conn.send(msg)
        except OSError as e:
            raise WorkerDied(f"{self.peer} worker is gone: {e!r}") from None
        answer = self._recv()
        if isinstance(answer, dict) and "fatal" in answer:
            raise RuntimeError(f"{self.peer} worker, op {msg.get('op')}: {answer['fatal']}")
        return answer

    def restart(self):
        self.close()
        self.start()

    def close(self):
        if self.conn is not None:
            try:
                self.conn.send({"op": "quit"})
                self.conn.recv()
            except (OSError, EOFError):
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def rel_error(a, ref):
    import numpy as np
    a, ref = np.asarray(a), np.asarray(ref)
    if a.shape != ref.shape:
        return math.inf
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return float(np.max(np.abs(a - ref))) / max(scale, 1e-30) if a.size else 0.0


def check_outputs(case, outputs):
    """Each peer's outputs against torch's (or numpy's): max relative error per direction."""
    ref_peer = next((p for p in ("torch", "numpy") if p in outputs), None)
    result = {}
    if ref_peer is None:
        return result
    for peer, dirs in outputs.items():
        if peer == ref_peer:
            continue
        for d, arrays in dirs.items():
            ref = outputs[ref_peer].get(d)
            if ref is None:
                continue
            err = max((rel_error(a, r) for a, r in zip(arrays, ref)), default=0.0)
            result.setdefault(peer, {})[d] = {"vs": ref_peer, "rel_error": err,
                                              "ok": err <= CHECK_TOL[case["dtype"]]}
    return result


class Runner:
    """Worker processes for a set of peers, kept alive for the whole run."""

    def __init__(self, peers, threads, repeats, min_time, settle=True, check=True, progress=None):
        self.peers, self.threads, self.repeats, self.min_time = list(peers), threads, repeats, min_time
        self.settle, self.check = settle, check
        self.progress = progress or Progress(0, enabled=False)
        self.workers = {}
        self.failed = {}
        for peer in self.peers:
            try:
                self.workers[peer] = WorkerProcess(peer, PEER_THREADS.get(peer, threads))
            except (WorkerDied, RuntimeError) as e:
                self.failed[peer] = str(e)
                self.progress.note(f"peer {peer} is unavailable: {str(e).strip().splitlines()[-1]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.workers.values():
            w.close()
        self.workers.clear()

    def info(self):
        info = {p: w.info.get("info", {}) for p, w in self.workers.items()}
        for p, why in self.failed.items():
            info[p] = {"unavailable": why}
        return info

    def peak(self, repeats=5, seconds=0.1):
        if "convgen" not in self.workers:
            return None
        for worker in self.workers.values():
            worker.request(op="quiet")
        return self.workers["convgen"].request(op="peak", threads=self.threads, repeats=repeats, seconds=seconds)

    def _request(self, peer, record, **msg):
        """A request that survives a crashed worker (restarted; the error is recorded)."""
        worker = self.workers.get(peer)
        if worker is None:
            return None
        try:
            return worker.request(**msg)
        except (WorkerDied, RuntimeError) as e:
            record.setdefault("error", {}).setdefault(peer, {})[msg.get("direction", msg["op"])] = str(e)
            self.progress.note(f"{peer}: {str(e).strip().splitlines()[-1]} (restarting the worker)")
            try:
                worker.restart()
            except (WorkerDied, RuntimeError) as e2:
                self.failed[peer] = str(e2)
                del self.workers[peer]
            return None

    def run_case(self, case, peers=None):
        """Times one case on every peer (or those named); returns its record (the case plus results)."""
        t_case = time.perf_counter()
        record = dict(case, results={}, skip={}, ran={}, load=_load())
        active = {}   # peer -> directions it runs
        outputs = {}
        record["setup_s"] = {}
        for peer in [p for p in self.workers if peers is None or p in peers]:
            t0 = time.perf_counter()
            ans = self._request(peer, record, op="setup", case=case, min_time=self.min_time, check=self.check)
            record["setup_s"][peer] = time.perf_counter() - t0
            if ans is None:
                continue
            if ans["skip"]:
                record["skip"][peer] = ans["skip"]
            if ans["error"]:
                record.setdefault("error", {}).setdefault(peer, {}).update(ans["error"])
                for d, tb in ans["error"].items():
                    self.progress.note(f"{case['name']} {d} on {peer}: {tb.strip().splitlines()[-1]}")
            if ans["kernel"]:
                record["ran"] = ans["kernel"]
            if ans["outputs"]:
                outputs[peer] = ans["outputs"]
            if self.settle:
                self._request(peer, record, op="quiet")
            dirs = [d for d in case["directions"] if d in ans["inner"]]
            if dirs:
                active[peer] = dirs
                record["results"][peer] = {d: {"inner": ans["inner"][d], "samples": []} for d in dirs}
        self.progress.step(f"{case['name']} (setup)")
        if self.check and len(outputs) > 1:
            record["check"] = check_outputs(case, outputs)
        order = list(active)
        for r in range(self.repeats):
            shift = r % max(1, len(order))
            for peer in order[shift:] + order[:shift]:
                for d in list(active[peer]):
                    ans = self._request(peer, record, op="time", direction=d)
                    if ans is None:   # the worker died (and was restarted without this case)
                        active[peer] = []
                        break
                    record["results"][peer][d]["samples"].append(ans["seconds"])
                if self.settle and active[peer]:
                    # let this peer's thread pool stop spinning before the next peer runs
                    ans = self._request(peer, record, op="quiet")
                    if ans is not None:
                        record["settle_s"] = record.get("settle_s", 0.0) + ans["waited"]
            self.progress.step(f"{case['name']} round {r + 1}/{self.repeats}")
        for peer, dirs in record["results"].items():
            for d, res in dirs.items():
                s = res["samples"]
                res["median"] = statistics.median(s) if s else None
                res["min"] = min(s) if s else None
                # spread: interquartile range over the median (noise of a shared machine)
                res["spread"] = ((lambda q: (q[2] - q[0]) / res["median"])(statistics.quantiles(s, n=4))
                                 if len(s) >= 4 and res["median"] else None)
        record["wall_s"] = time.perf_counter() - t_case
        if case["part"] == "micro" and "spec" in case:
            ran = record["ran"].get(case["directions"][0])
            record["dispatch_ok"] = ran == [case["spec"]] if ran is not None else None
        return record

    def run(self, cases, peers=None):
        return [self.run_case(c, peers) for c in cases]

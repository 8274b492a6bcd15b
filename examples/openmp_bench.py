"""Do torch's and convgen's OpenMP thread pools slow each other down?

Each measurement runs in a fresh process (so the OpenMP runtimes start cold and
import order is controlled); each prints the median over many calls, and the
driver reports the median over --procs processes.

    python examples/openmp_bench.py            # the full table (10-20 minutes on 2 cores)
    python examples/openmp_bench.py --quick    # 3 processes x 100 calls each

Workloads
  conv   a 16->16 3x3 conv, batch 4, 32x32 (float32): torch's F.conv2d ("T") and
         convgen's NumPy conv ("C"), timed per call, alone or alternating T, C, T, C
  small  the same, 1->16 channels on a batch of 64 8x8 digits-sized images
  cnn    a training step (forward, backward, SGD) of the small CNN of
         examples/digits_train.py, batch 64, with torch.nn.Conv2d or the drop-in

Setups (how the process loads its OpenMP runtime(s))
  torch    torch only (convgen never imported)
  convgen  convgen only (torch never imported)
  shared   torch, then convgen: as installed, one libgomp serves both
  cgfirst  convgen, then torch
  split    two runtimes: convgen binds the system libgomp, torch a second copy
           (scikit-learn's vendored libgomp-<hash>.so, loaded RTLD_GLOBAL before
           torch), as happens with a torch wheel that vendors a renamed libgomp
  split1   split, with convgen.set_num_threads(1)
  splitfix the renamed copy loaded RTLD_GLOBAL before convgen, then torch: what
           convgen/__init__.py does when torch vendors a renamed libgomp (and what
           importing torch first does anyway): one runtime for both
  ENV=V:s  setup s with extra environment (e.g. OMP_WAIT_POLICY=passive:split)

Before each process the driver waits (up to a minute) for the CPUs to be mostly
idle: on a shared machine other processes' spinning threads distort the timings
just as a second runtime in the same process does.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- worker
def _load(setup):
    """Import torch and/or convgen in the order `setup` asks for; returns (torch, convgen)."""
    sys.path.insert(0, ROOT)
    torch = convgen = None
    if setup == "torch":
        import torch
    elif setup == "convgen":
        import convgen
    elif setup == "shared":
        import torch
        import convgen
    elif setup == "cgfirst":
        import convgen
        import torch
    elif setup == "split":
        import convgen
        _second_runtime()
        import torch
    elif setup == "split1":  # two runtimes, convgen on one thread (its pool never spins)
        import convgen
        _second_runtime()
        import torch
        convgen.set_num_threads(1)
    elif setup == "splitfix":
        _second_runtime()   # what the fix does: convgen binds the runtime torch will use
        import convgen
        import torch
    else:
        raise SystemExit(f"unknown setup {setup!r}")
    return torch, convgen


def _second_runtime():
    """Load scikit-learn's vendored libgomp-<hash>.so (another copy of libgomp, with
    its own soname) into the global symbol scope, without importing scikit-learn.
    Libraries loaded after it bind their OpenMP calls to it, as torch's do to the
    renamed libgomp that some torch wheels vendor."""
    import ctypes
    import importlib.util
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("sklearn").origin))
    ctypes.CDLL(glob.glob(os.path.join(site, "scikit_learn.libs", "libgomp*"))[0], mode=ctypes.RTLD_GLOBAL)


def _runtimes():
    """The OpenMP runtimes mapped into this process."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                       if "gomp" in line or "libomp" in line or "iomp" in line})


def _conv_ops(torch, convgen, shape):
    import numpy as np
    n, c, oc, hw = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((oc, c, 3, 3)).astype(np.float32)
    ops = {}
    if torch is not None:
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        ops["T"] = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)
    if convgen is not None:
        ops["C"] = lambda: convgen.functional.conv2d(x, w, padding=1)
    return ops


def _cnn_op(torch, which):
    sys.path.insert(0, HERE)
    from digits_train import make_net
    conv_cls = torch.nn.Conv2d
    if which == "dropin":
        from convgen.torch import Conv2d as conv_cls
    net = make_net(conv_cls, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def worker(setup, workload, pattern, calls):
    torch, convgen = _load(setup)
    if workload == "cnn":
        ops = {"S": _cnn_op(torch, pattern)}
        pattern = "S"
    else:
        shape = {"conv": (4, 16, 16, 32), "small": (64, 1, 16, 8)}[workload]
        ops = _conv_ops(torch, convgen, shape)
    times = {k: [] for k in pattern}
    for i in range(calls + calls // 5):
        for k in pattern:
            t0 = time.perf_counter()
            ops[k]()
            dt = time.perf_counter() - t0
            if i >= calls // 5:  # warm-up excluded
                times[k].append(dt)
    print(json.dumps({"runtimes": _runtimes(), "threads": len(os.listdir("/proc/self/task")),
                      **{k: statistics.median(v) * 1e6 for k, v in times.items()}}))


# ----------------------------------------------------------------------------- driver
def parse_setup(spec):
    """'OMP_WAIT_POLICY=passive:split' -> ('split', {'OMP_WAIT_POLICY': 'passive'})."""
    env = {}
    while ":" in spec and "=" in spec.split(":", 1)[0]:
        kv, spec = spec.split(":", 1)
        key, value = kv.split("=", 1)
        env[key] = value
    return spec, env


def _idle_fraction(seconds=0.5):
    """Share of the machine's CPU time that was idle over the next `seconds`."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit=60.0, idle=0.8):
    """Wait (up to `limit` seconds) until other processes leave the CPUs mostly idle:
    the machine may be shared, and spinning threads elsewhere distort these timings."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and _idle_fraction() < idle:
        pass


def run_once(spec, workload, pattern, calls, quiet=True):
    if quiet:
        wait_quiet()
    setup, env = parse_setup(spec)
    out = subprocess.run([sys.executable, __file__, "--worker", setup, workload, pattern, str(calls)],
                         capture_output=True, text=True, env=dict(os.environ, **env), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(jobs, calls, procs, quiet=True):
    """Runs every job `procs` times, round-robin (so that load from elsewhere on the
    machine spreads over all of them); returns job -> {op: median us, runtimes}."""
    runs = {job: [] for job in jobs}
    for _ in range(procs):
        for job in jobs:
            runs[job].append(run_once(*job, calls, quiet))
    result = {}
    for job, rs in runs.items():
        keys = [k for k in rs[0] if k not in ("runtimes", "threads")]
        result[job] = {k: statistics.median(r[k] for r in rs) for k in keys}
        result[job]["runtimes"] = f"{' + '.join(rs[0]['runtimes'])} ({max(r['threads'] for r in rs)} threads)"
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer processes and calls")
    ap.add_argument("--procs", type=int, default=5, help="fresh processes per measurement")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per process")
    ap.add_argument("--workloads", default="conv,small,cnn")
    ap.add_argument("--setups", default="shared,cgfirst,split,splitfix",
                    help="mixed setups to compare (comma-separated; ENV=VALUE:setup adds environment)")
    ap.add_argument("--alone", default="torch,convgen",
                    help="single-library setups (ENV=VALUE:torch / ENV=VALUE:convgen)")
    ap.add_argument("--no-wait", action="store_true",
                    help="do not wait for idle CPUs before each process")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        setup, workload, pattern, calls = args.worker
        return worker(setup, workload, pattern, int(calls))
    procs, calls = (3, 100) if args.quick else (args.procs, args.calls)
    workloads = args.workloads.split(",")
    setups = args.setups.split(",")
    alone = args.alone.split(",")

    jobs = []
    for w in workloads:
        if w == "cnn":
            jobs += [(s, w, "torch") for s in alone if parse_setup(s)[0] == "torch"]
            jobs += [(s, w, "dropin") for s in setups]
        else:
            jobs += [(s, w, "T" if parse_setup(s)[0] == "torch" else "C") for s in alone]
            jobs += [(s, w, "TC") for s in setups]
    res = measure(jobs, calls, procs, not args.no_wait)
    print(f"median over {procs} fresh processes of the median of {calls} calls; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'workload':8s} {'setup':36s} {'torch us':>9s} {'convgen us':>10s}   runtimes")
    for (s, w, pattern), r in res.items():
        if w == "cnn":
            label = ("torch.nn.Conv2d, " if pattern == "torch" else "drop-in, ") + s
            print(f"{w:8s} {label:36s} {r['S']:9.1f} {'':10s}   {r['runtimes']}")
        else:
            t = f"{r['T']:9.1f}" if "T" in r else " " * 9
            c = f"{r['C']:10.1f}" if "C" in r else " " * 10
            label = s + (" (alternating)" if pattern == "TC" else " (alone)")
            print(f"{w:8s} {label:36s} {t} {c}   {r['runtimes']}")


if __name__ == "__main__":
    main()

"""python -m bench: time convgen against PyTorch, NumPy im2col and onnxruntime.

    python -m bench                  the full run: every generated kernel, the layer suite
    python -m bench --quick          3 rounds, short samples, float32 kernels vs PyTorch only
                                     (well under 2 minutes on 2 idle cores)
    python -m bench --only resnet50  only cases whose name contains (or glob-matches) a pattern
    python -m bench --part layers --peers convgen_1t
                                     the layer suite's scaling from 1 thread to --threads
    python -m bench --list           the cases, without timing anything

Results: bench/results/ (results.json, README.md, layers.png, micro.png);
a --quick run writes to bench/results/quick/ unless --out says otherwise.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from . import report
from .progress import Progress
from .runner import Runner
from .suite import DEFAULT_LAYERS, PEER_NAMES as NAMES, ROOT, describe, load_layers, micro_cases, select

RESULTS = os.path.join(ROOT, "bench", "results")

# rounds, seconds per timing sample, FMA-peak trials and seconds per trial
# and which micro-benchmarks (a glob on the kernel name) against which peers: --quick times
# the float32 kernels only, against PyTorch only (the layer suite still meets every peer).
# (convgen_1t, convgen on one thread, and convgen_frozen, its frozen module, time the layer
# suite only: the ratios there are the scaling from 1 thread to --threads, and what
# freezing gains.)
MODES = {"full": dict(rounds=15, min_time=0.02, peak_trials=7, peak_seconds=0.1, micro="*",
                      micro_peers=tuple(p for p in NAMES if p not in ("convgen_1t", "convgen_frozen"))),
         "quick": dict(rounds=3, min_time=0.003, peak_trials=3, peak_seconds=0.05, micro="*_f32_*",
                       micro_peers=("convgen", "torch"))}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter samples")
    ap.add_argument("--only", action="append", metavar="NAME", default=[],
                    help="only cases whose name contains NAME or matches it as a glob (repeatable)")
    ap.add_argument("--part", choices=("all", "micro", "layers"), default="all", help="which part to run")
    ap.add_argument("--layers", metavar="PATH", default=DEFAULT_LAYERS, help="the layer suite (JSON)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every peer")
    ap.add_argument("--peers", default=",".join(NAMES),
                    help=f"comma-separated peers (convgen is always included; convgen_1t is convgen "
                         f"on one thread, whose ratios are the scaling; convgen_frozen its module frozen, "
                         f"forwards only); default {','.join(NAMES)}")
    ap.add_argument("--repeats", type=int, help="alternating rounds per case (default: 15, --quick 3)")
    ap.add_argument("--min-time", type=float, help="seconds per timing sample (default 0.02, --quick 0.003)")
    ap.add_argument("--out", metavar="DIR", help="results folder (default bench/results, --quick bench/results/quick)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-check", action="store_true", help="skip checking that the peers' outputs agree")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--update", action="store_true",
                    help="merge into the results already in --out: re-timed cases replace their old "
                         "records, the others are kept (e.g. to re-time cases a busy machine spoiled)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in NAMES]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {list(NAMES)}")
    args.peers = ["convgen"] + [p for p in NAMES if p in peers and p != "convgen"
                                and not (p == "convgen_1t" and args.threads == 1)]   # (itself, then)
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    args.mode = mode
    args.repeats = args.repeats or settings["rounds"]
    args.min_time = args.min_time or settings["min_time"]
    args.peak_trials, args.peak_seconds = settings["peak_trials"], settings["peak_seconds"]
    args.out = args.out or (os.path.join(RESULTS, "quick") if args.quick else RESULTS)
    return args


def collect_cases(args, say):
    micro, layers = [], []
    if args.part in ("all", "micro"):
        micro = select(micro_cases(), args.only)
        if not args.only:
            micro = select(micro, [MODES[args.mode]["micro"]])
    if args.part in ("all", "layers"):
        try:
            layers = select(load_layers(args.layers), args.only)
        except FileNotFoundError:
            say(f"bench: the layer suite {args.layers} is missing; pass --layers PATH. "
                "Running the micro-benchmarks only.")
        except ValueError as e:
            say(f"bench: cannot read the layer suite: {e}. Running the micro-benchmarks only.")
    return micro, layers


def machine_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "machine": platform.machine()}


def source_info():
    """The git commit of the checkout the benchmarks run from, and whether its tracked
    files have changes not committed (results under bench/results/, which a run writes, do
    not count); None outside a git checkout (or without git)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "changed": bool(changes.stdout.strip())}


def load():
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def measure_peak(runner, args):
    try:
        return runner.peak(repeats=args.peak_trials, seconds=args.peak_seconds)
    except Exception as e:  # the peak is context; the timings still stand without it
        print(f"bench: measuring the FMA peak failed: {e}", file=sys.stderr)
        return None


def combine_peaks(start, end, threads):
    """Best of the start and end measurements (noise only ever lowers a peak).  The
    peak that "% of peak" divides by is never below the one-thread peak: on a busy
    machine the many-thread probe can lose its cores, one thread rarely does."""
    runs = [p for p in (start, end) if p]
    if not runs:
        return None

    def best(key):
        vals = [p[key]["gflops"] for p in runs if key in p]
        return max(vals) if vals else None
    single = {t: best(f"{t}_t1") for t in ("f32", "f64")}
    many = {t: best(f"{t}_t{threads}") for t in ("f32", "f64")}
    chosen = {t: max(v for v in (many[t], single[t]) if v is not None) if many[t] or single[t] else None
              for t in ("f32", "f64")}
    return {"threads": threads, "best": chosen, "many": many, "single": single, "start": start, "end": end}


def merge(path, new, say):
    """Earlier results with `new`'s records replacing theirs (same case name); the
    earlier run's settings stay, and each merge is listed in meta["updates"]."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        say(f"bench: --update: no earlier results to merge ({e}); writing this run alone")
        return new
    if (old["meta"]["threads"], old["meta"]["mode"]) != (new["meta"]["threads"], new["meta"]["mode"]):
        say("bench: --update: the earlier results used other settings (threads / mode); writing this run alone")
        return new
    for part in ("layers", "micro"):
        fresh = {r["name"]: r for r in new[part]}
        kept = [fresh.pop(r["name"], r) for r in old.get(part, [])]
        old[part] = kept + list(fresh.values())
    m = new["meta"]
    old["meta"].setdefault("updates", []).append(
        {k: m[k] for k in ("command", "date", "duration_s", "load_before", "load_after", "repeats", "min_time")}
        | {"cases": [r["name"] for r in new["layers"] + new["micro"]]})
    if new.get("peak") and old.get("peak"):
        for key in ("best", "many", "single"):
            for t, v in new["peak"][key].items():
                if v and (old["peak"][key].get(t) or 0) < v:
                    old["peak"][key][t] = v
    return old


def main(argv=None):
    args = parse_args(argv)

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    micro, layers = collect_cases(args, say)
    if args.list:
        for c in micro + layers:
            print(f"{c['part']:6s} {c['name']:46s} {','.join(c['directions']):14s} {c['cls']:10s} {describe(c)}")
        print(f"{len(micro)} micro-benchmarks, {len(layers)} layers")
        return 0
    if not micro and not layers:
        say("bench: nothing to run (check --only / --part)")
        return 2

    t_start = time.perf_counter()
    load_before = load()
    progress = Progress((len(micro) + len(layers)) * (1 + args.repeats) + 2, enabled=not args.no_progress)
    say(f"bench: {args.mode} run, {len(micro)} micro-benchmarks + {len(layers)} layers, peers "
        f"{', '.join(args.peers)}, {args.threads} threads, {args.repeats} rounds -> {args.out}")
    with Runner(args.peers, args.threads, args.repeats, args.min_time, check=not args.no_check,
                progress=progress) as runner:
        if "convgen" not in runner.workers:
            say("bench: the convgen worker did not start (is convgen built? "
                "python setup.py build_ext --inplace):\n" + runner.failed.get("convgen", ""))
            return 1
        peak_start = measure_peak(runner, args)
        progress.step("FMA peak")
        # the layer suite first: it is what most readers look at, and a shared
        # machine is most likely to be quiet at the start
        layer_records = runner.run(layers)
        micro_records = runner.run(micro, MODES[args.mode]["micro_peers"])
        peak_end = measure_peak(runner, args)
        progress.step("FMA peak")
        peer_info = runner.info()
    progress.close()

    results = {
        "meta": {
            "command": "python -m bench" + ("" if argv is None and len(sys.argv) <= 1 else
                                            " " + " ".join(sys.argv[1:] if argv is None else argv)),
            "mode": args.mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "duration_s": time.perf_counter() - t_start, "threads": args.threads, "repeats": args.repeats,
            "min_time": args.min_time, "machine": machine_info(), "source": source_info(), "peers": peer_info,
            "load_before": load_before, "load_after": load(), "layers_file": args.layers if layers else None,
        },
        "peak": combine_peaks(peak_start, peak_end, args.threads),
        "micro": micro_records,
        "layers": layer_records,
    }
    if args.update:
        results = merge(os.path.join(args.out, "results.json"), results, say)
    paths = report.write_all(results, args.out, plot=not args.no_plot)
    print(report.console_summary(results))
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Results -> summaries (geomeans), JSON, a Markdown report and PNG plots.

ratio vs a peer = peer's median time / convgen's median time, so > 1 means
convgen is faster.  GFLOP/s use the suite's formula (forward 2*N*OC*OH*OW*
(C/groups)*kH*kW; a whole backward pass twice that; one gradient alone once).
"""

import json
import math
import os

from .suite import CLASSES, PEER_NAMES as PEER_ORDER, describe, flops

PEER_LABEL = {"torch": "PyTorch", "numpy": "NumPy im2col", "onnxruntime": "onnxruntime",
              "convgen_1t": "convgen 1 thread", "convgen_frozen": "convgen frozen"}
# convgen itself, another way: its ratios below 1 are no loss (frozen: what freezing gains)
NOT_BOLD = ("convgen_frozen",)
DTYPE_KEY = {"float32": "f32", "float64": "f64"}


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def median_time(record, peer, direction, stat="median"):
    """A peer's seconds per call: the median over rounds (or "min": its fastest round)."""
    return record["results"].get(peer, {}).get(direction, {}).get(stat)


def ratio(record, peer, direction, stat="median"):
    mine, theirs = median_time(record, "convgen", direction, stat), median_time(record, peer, direction, stat)
    if not mine or not theirs:
        return None
    return theirs / mine


def gflops(record, direction, peer="convgen", stat="median"):
    t = median_time(record, peer, direction, stat)
    return flops(record, direction) / t / 1e9 if t else None


def peak_for(record, peak):
    if not peak:
        return None
    return peak.get(DTYPE_KEY[record["dtype"]])


def pct_peak(record, direction, peak, stat="median"):
    g, p = gflops(record, direction, stat=stat), peak_for(record, peak)
    return 100 * g / p if g and p else None


def peers_in(records):
    present = {p for r in records for p in r["results"]}
    return [p for p in PEER_ORDER if p in present and p != "convgen"]


def summarise(records, peak, group_key, groups_order, directions, stat="median"):
    """Rows of geomeans per (direction, group); group "all" first."""
    rows = []
    peers = peers_in(records)
    for d in directions:
        mine = [r for r in records if d in r["directions"] and median_time(r, "convgen", d, stat)]
        if not mine:
            continue
        groups = ["all"] + [g for g in groups_order if any(group_key(r) == g for r in mine)]
        for g in groups:
            sel = mine if g == "all" else [r for r in mine if group_key(r) == g]
            row = {"direction": d, "group": g, "n": len(sel),
                   "convgen_gflops": geomean([gflops(r, d, stat=stat) for r in sel]),
                   "pct_peak": geomean([pct_peak(r, d, peak, stat) for r in sel]), "vs": {}}
            for p in peers:
                rs = [ratio(r, p, d, stat) for r in sel]
                rs = [x for x in rs if x]
                row["vs"][p] = {"geomean": geomean(rs), "n": len(rs)}
            rows.append(row)
    return rows


def summaries(results):
    peak = results.get("peak", {}).get("best")
    out = {}
    if results.get("layers"):
        out["layers"] = summarise(results["layers"], peak, lambda r: r["cls"], CLASSES, ("fwd", "bwd"))
        out["layers_fastest"] = summarise(results["layers"], peak, lambda r: r["cls"], CLASSES, ("fwd", "bwd"),
                                          stat="min")
    if results.get("micro"):
        out["micro"] = summarise(results["micro"], peak, lambda r: f"{DTYPE_KEY[r['dtype']]} {r['cls']}",
                                 [f"{t} {g}" for t in ("f32", "f64") for g in ("dense", "depthwise", "grouped")],
                                 ("fwd", "bwd_data", "bwd_weight"))
    return out


# ---------------------------------------------------------------- JSON

def write_json(results, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------- Markdown

def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def _ms(t):
    if t is None:
        return "–"
    ms = 1e3 * t
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _x(v, bold=True):
    if v is None:
        return "–"
    text = f"{v:.2f}"
    return f"**{text}**" if v < 1 and bold else text


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_table(rows, peers, group_title):
    header = ["direction", group_title, "n", "convgen GFLOP/s", "% peak"] + [f"vs {PEER_LABEL[p]}" for p in peers]
    body = []
    for row in rows:
        cells = [row["direction"], row["group"], row["n"], _f(row["convgen_gflops"], "{:.1f}"),
                 _f(row["pct_peak"], "{:.0f}%")]
        for p in peers:
            v = row["vs"].get(p, {})
            cells.append(_x(v.get("geomean"), p not in NOT_BOLD)
                         + (f" ({v['n']})" if v.get("n") and v["n"] != row["n"] else ""))
        body.append(cells)
    return _table(header, body)


def _case_rows(records, peak, peers, with_dir_col, extra=None):
    rows = []
    for r in records:
        for d in r["directions"]:
            cells = [f"`{r['name']}`"]
            if with_dir_col:
                cells += [r["cls"], d]
            spread = r["results"].get("convgen", {}).get(d, {}).get("spread")
            noisy = " †" if spread is not None and spread > NOISY else ""
            cells += [describe(r), _ms(median_time(r, "convgen", d)) + noisy, _f(gflops(r, d), "{:.1f}"),
                      _f(pct_peak(r, d, peak), "{:.0f}%")]
            for p in peers:
                cells += [_ms(median_time(r, p, d)), _x(ratio(r, p, d), p not in NOT_BOLD)]
            if extra:
                cells.append(extra(r, d))
            rows.append(cells)
    return rows


NOISY = 0.5   # interquartile spread / median above which a timing is marked † (noisy)


def _notes(records):
    notes = []
    for r in records:
        for peer, dirs in sorted(r.get("error", {}).items()):
            for d, text in dirs.items():
                notes.append(f"- `{r['name']}` {d}: **{peer} failed**: {text.strip().splitlines()[-1]}")
        for peer, dirs in sorted(r.get("check", {}).items()):
            for d, c in dirs.items():
                if not c["ok"]:
                    notes.append(f"- `{r['name']}` {d}: {peer} disagrees with {c['vs']} "
                                 f"(relative error {c['rel_error']:.2e})")
        if r.get("dispatch_ok") is False:
            notes.append(f"- `{r['name']}`: dispatch ran {r['ran']}, not the kernel this case is for")
    skips = {}
    for r in records:
        for peer, dirs in r.get("skip", {}).items():
            for d, why in dirs.items():
                skips.setdefault((peer, why), []).append(f"{r['name']} {d}")
    for (peer, why), which in sorted(skips.items()):
        notes.append(f"- {peer} skipped {len(which)} case(s): {why}")
    return notes


def _noise_line(results):
    records = results.get("layers", []) + results.get("micro", [])
    loads = sorted(r["load"] for r in records if r.get("load") is not None)
    spreads = sorted(res["spread"] for r in records for res in r["results"].get("convgen", {}).values()
                     if res.get("spread") is not None)
    text = "- Noise: "
    if loads:
        text += f"1-minute load average {loads[0]:.1f}–{loads[-1]:.1f} during the run (median {loads[len(loads) // 2]:.1f})"
    if spreads:
        text += (f"; convgen's interquartile spread over rounds is {100 * spreads[len(spreads) // 2]:.0f}% of the "
                 f"median for the typical case, {100 * spreads[-1]:.0f}% at worst")
    return text + "." if loads or spreads else "- Noise: not recorded."


def _source_line(source):
    """Which code was timed: the checkout's commit (older results have none)."""
    if not source:
        return "- convgen's source: not a git checkout (or no record of it)."
    return (f"- convgen's source: commit `{source['commit']}`"
            + (", with changes not committed." if source.get("changed") else "."))


def markdown(results, images=()):
    meta, peak = results["meta"], results.get("peak") or {}
    best = peak.get("best") or {}
    sums = results.get("summary") or summaries(results)
    m = meta["machine"]
    lines = [
        "# convgen benchmarks",
        "",
        f"`{meta['command']}` — {meta['mode']} run, {meta['date']}, {meta['duration_s']:.0f} s.",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} logical cores, {m.get('platform', '')}; "
        f"load average {meta.get('load_before', '?')} before, {meta.get('load_after', '?')} after "
        "(a shared machine: other jobs add noise).",
        f"- Threads: {meta['threads']} for every peer. Medians over {meta['repeats']} alternating rounds "
        f"(each round times every peer once; samples of at least {1e3 * meta['min_time']:.0f} ms).",
        f"- Measured FMA peak ({meta['threads']} threads, generated `convgen._generated._peak`): "
        f"float32 **{_f(best.get('f32'), '{:.1f}')} GFLOP/s**, float64 **{_f(best.get('f64'), '{:.1f}')} GFLOP/s**"
        f" (1 thread: {_f(peak.get('single', {}).get('f32'), '{:.1f}')} / "
        f"{_f(peak.get('single', {}).get('f64'), '{:.1f}')}; best of the probes at the start and the end).",
        "- Peers: " + ", ".join(f"{p} {i.get('version', i.get('unavailable', '?')[:60])}"
                                for p, i in meta["peers"].items()) + ".",
        _source_line(meta.get("source")),
        _noise_line(results),
        *[f"- Re-timed later with `--update` ({u['date']}, load average {u['load_before']} before): "
          f"{len(u['cases'])} case(s): " + ", ".join(f"`{c}`" for c in u["cases"][:6]) +
          (", …" if len(u["cases"]) > 6 else "") + "." for u in meta.get("updates", [])],
        f"- † marks a convgen time whose rounds spread by more than {100 * NOISY:.0f}% (interquartile "
        "range / median): another job shared the cores; its fastest round is in results.json.",
        "- **Ratios are peer time / convgen time: > 1 means convgen is faster**; bold marks < 1. "
        "Geomeans over the layers of each class (each layer counts in one class).",
        *([f"- convgen 1 thread (`convgen_1t`) is convgen itself on one thread, so the ratio to it is "
           f"convgen's scaling from 1 to {meta['threads']} threads."]
          if any("convgen_1t" in r["results"] for r in results.get("layers", [])) else []),
        *(["- convgen frozen (`convgen_frozen`) is convgen's module after `Conv2d.freeze()`, forwards only: "
           "it packs its weights once, as onnxruntime's session does, so its time is the one to set beside "
           "onnxruntime's. The ratio to it is its time / convgen's (not bold: below 1 is what freezing gains)."]
          if any("convgen_frozen" in r["results"] for r in results.get("layers", [])) else []),
        "",
    ]
    if results.get("layers"):
        records = results["layers"]
        peers = peers_in(records)
        lines += ["## Layer suite: geomeans", "", _summary_table(sums["layers"], peers, "class"), "",
                  "The same from each peer's *fastest* round instead of its median (a rough estimate of "
                  "what an idle machine would show; load hurts OpenMP's static schedules most):", "",
                  _summary_table([r for r in sums["layers_fastest"] if r["group"] == "all"] +
                                 [r for r in sums["layers_fastest"] if r["group"] != "all"], peers, "class"), ""]
        header = ["layer", "class", "dir", "shape", "convgen ms", "GFLOP/s", "% peak"]
        for p in peers:
            header += [f"{p} ms", f"× {p}"]
        lines += ["## Layer suite: per layer", "",
                  "fwd = inference forward with bias (under `convgen.no_grad()` / `torch.no_grad()`); "
                  "bwd = input + weight + bias gradients.", "",
                  _table(header, _case_rows(records, best, peers, True)), ""]
    if results.get("micro"):
        records = results["micro"]
        peers = peers_in(records)
        lines += ["## Micro-benchmarks (one per generated kernel): geomeans", "",
                  "One case per spec in `codegen.table.SPECS` (`codegen.cases.case_for(spec, \"bench\")`), "
                  "timing that kernel's direction through the public API.", "",
                  _summary_table(sums["micro"], peers, "dtype / groups"), ""]
        header = ["kernel", "shape", "convgen ms", "GFLOP/s", "% peak"]
        for p in peers:
            header += [f"{p} ms", f"× {p}"]
        header.append("dispatch")

        def dispatch(r, d):
            return {True: "ok", False: "**wrong**", None: "?"}[r.get("dispatch_ok")]
        lines += ["## Micro-benchmarks: per kernel", "",
                  _table(header, _case_rows(records, best, peers, False, dispatch)), ""]
    if images:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(i)[0]}]({i})" for i in images] + [""]
    notes = _notes(results.get("layers", []) + results.get("micro", []))
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines)


def console_summary(results):
    """The peak and the geomean tables, for the terminal."""
    peak = (results.get("peak") or {}).get("best") or {}
    sums = results.get("summary") or summaries(results)
    lines = [f"FMA peak ({results['meta']['threads']} threads): float32 {_f(peak.get('f32'), '{:.1f}')} GFLOP/s, "
             f"float64 {_f(peak.get('f64'), '{:.1f}')} GFLOP/s.  Ratios: peer time / convgen time (> 1: convgen faster)."]
    for part, title, group in (("layers", "Layer suite (medians)", "class"),
                               ("layers_fastest", "Layer suite (each peer's fastest round)", "class"),
                               ("micro", "Micro-benchmarks (medians)", "dtype / groups")):
        if sums.get(part):
            records = results["layers" if part.startswith("layers") else part]
            lines += ["", title, _summary_table(sums[part], peers_in(records), group).replace("**", "")]
    notes = _notes(results.get("layers", []) + results.get("micro", []))
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

COLORS = {"convgen": "#d62728", "torch": "#1f77b4", "numpy": "#7f7f7f", "onnxruntime": "#2ca02c",
          "convgen_1t": "#ff9896", "convgen_frozen": "#9467bd"}


def plot_layers(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = results["layers"]
    best = (results.get("peak") or {}).get("best") or {}
    peers = ["convgen"] + peers_in(records)
    names = [r["name"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.42 * len(records) + 2.2), sharey=True)
    height = 0.8 / len(peers)
    for ax, d in zip(axes, ("fwd", "bwd")):
        for i, p in enumerate(peers):
            ys = [k + (i - (len(peers) - 1) / 2) * height for k in range(len(records))]
            vals = [gflops(r, d, p) or 0 for r in records]
            if any(vals):
                ax.barh(ys, vals, height=height, color=COLORS[p], label=p)
        if best.get("f32"):
            ax.axvline(best["f32"], color="k", ls="--", lw=1, label="f32 FMA peak")
        if best.get("f64"):
            ax.axvline(best["f64"], color="k", ls=":", lw=1, label="f64 FMA peak")
        ax.set_xscale("log")
        ax.set_xlabel("GFLOP/s (log scale)")
        ax.set_title({"fwd": "forward", "bwd": "backward (input + weight + bias grads)"}[d])
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(records)), names, fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"convgen vs peers, {results['meta']['threads']} threads ({results['meta']['mode']} run; "
                 "higher is better)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_micro(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = results["micro"]
    peers = peers_in(records)
    if not peers:
        return False
    ref = "torch" if "torch" in peers else peers[0]
    colors = {"fwd": "#d62728", "bwd_data": "#1f77b4", "bwd_weight": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 0.19 * len(records) + 1.8))
    ys, vals, cols, names = [], [], [], []
    for k, r in enumerate(records):
        d = r["directions"][0]
        ys.append(k)
        vals.append(ratio(r, ref, d) or float("nan"))
        cols.append(colors.get(d, "k"))
        names.append(r["name"].replace("conv2d_", ""))
    ax.barh(ys, [v - 1 for v in vals], left=1, color=cols)   # bars grow from 1 (parity)
    ax.axvline(1, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(ys, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"speed-up over {ref} (its time / convgen's; log scale; > 1: convgen faster)")
    ax.set_title("Micro-benchmarks: one per generated kernel")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=d) for d, c in colors.items()], loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results, out_dir, plot=True):
    """results.json, README.md and the plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    results["summary"] = summaries(results)
    paths, images = [], []
    path = os.path.join(out_dir, "results.json")
    write_json(results, path)
    paths.append(path)
    if plot:
        if results.get("layers"):
            plot_layers(results, os.path.join(out_dir, "layers.png"))
            images.append("layers.png")
        if results.get("micro") and plot_micro(results, os.path.join(out_dir, "micro.png")):
            images.append("micro.png")
    path = os.path.join(out_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(results, images))
    paths.append(path)
    return paths + [os.path.join(out_dir, i) for i in images]

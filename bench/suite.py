"""What gets timed: the micro-benchmarks (one per generated kernel, straight from
``codegen.table.SPECS`` and ``codegen.cases.case_for``) and the real-network layer
suite (``shared/bench/layers.json``).  Pure Python: the orchestrating process
never imports convgen, torch or onnxruntime (see bench/__init__.py).

A *case* is a plain dict, picklable and JSON-able, that every peer understands:
    name, part ("micro" | "layer"), N, C, H, W, OC, kernel, stride, padding,
    dilation (pairs), groups, padding_mode, dtype ("float32" | "float64"),
    directions (what to time), flops (forward), cls (layer class),
    spec (micro only: the kernel the case exists for).
"""

import fnmatch
import json
import os

from codegen.cases import case_for
from codegen.spec import NUMPY_DTYPES
from codegen.table import SPECS

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
DEFAULT_LAYERS = os.path.normpath(os.path.join(ROOT, os.pardir, "shared", "bench", "layers.json"))

# The peers, in report order (implemented in bench/peers.py, which only workers import).
# convgen_1t is convgen on one thread: the ratio to it is convgen's scaling from 1 thread
# to the run's --threads.  convgen_frozen is convgen with Conv2d.freeze(), forwards only:
# weights packed once, as onnxruntime's are.
PEER_NAMES = ("convgen", "torch", "numpy", "onnxruntime", "convgen_1t", "convgen_frozen")
# Peers that run on a fixed number of threads, whatever --threads says.
PEER_THREADS = {"convgen_1t": 1}

# Directions a case may time.  "bwd" is a whole backward pass (input, weight and
# bias gradients); the micro-benchmarks time one kernel direction each.
LAYER_DIRECTIONS = ("fwd", "bwd")
FLOP_FACTOR = {"fwd": 1, "bwd": 2, "bwd_data": 1, "bwd_weight": 1}

# Layer classes, most specific first: a layer gets the first that matches, so
# the per-class geomeans partition the suite.  A layer may name its own "class".
CLASSES = ("float64", "depthwise", "grouped", "small", "stem", "1x1", "dense")
SMALL_FLOPS = 2e6   # below this a forward pass is call overhead, not arithmetic


def _pair(v):
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def output_hw(case):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case["kernel"], case["stride"], case["padding"], case["dilation"]
    return ((case["H"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (case["W"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def forward_flops(case):
    """2 * N * OC * OH * OW * (C / groups) * kH * kW."""
    oh, ow = output_hw(case)
    kh, kw = case["kernel"]
    return 2 * case["N"] * case["OC"] * oh * ow * (case["C"] // case["groups"]) * kh * kw


def flops(case, direction):
    return case["flops"] * FLOP_FACTOR[direction]


def classify(case):
    groups, C = case["groups"], case["C"]
    if case["dtype"] == "float64":
        return "float64"
    if groups > 1 and groups == C:
        return "depthwise"
    if groups > 1:
        return "grouped"
    if case["flops"] < SMALL_FLOPS:
        return "small"
    if C <= 4:
        return "stem"
    if case["kernel"] == (1, 1):
        return "1x1"
    return "dense"


def make_case(name, part, N, C, H, W, OC, kernel, stride=1, padding=0, dilation=1, groups=1,
              padding_mode="zeros", dtype="float32", directions=LAYER_DIRECTIONS, **extra):
    case = dict(name=name, part=part, N=int(N), C=int(C), H=int(H), W=int(W), OC=int(OC),
                kernel=_pair(kernel), stride=_pair(stride), padding=_pair(padding),
                dilation=_pair(dilation), groups=int(groups), padding_mode=padding_mode,
                dtype=dtype, directions=tuple(directions))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{name}: dtype must be float32 or float64, got {dtype!r}")
    oh, ow = output_hw(case)
    if oh < 1 or ow < 1:
        raise ValueError(f"{name}: empty output ({oh}x{ow})")
    case["flops"] = forward_flops(case)
    case.update(extra)
    case["cls"] = extra.get("cls") or classify(case)
    return case


def micro_cases(specs=SPECS):
    """One case per generated kernel, from the same table the kernels come from."""
    cases = []
    for spec in sorted(specs, key=lambda s: s.name):
        c = case_for(spec, "bench")
        cases.append(make_case(spec.name, "micro", c["N"], c["C"], c["H"], c["W"], c["OC"], c["kernel"],
                               c["stride"], c["padding"], c["dilation"], c["groups"],
                               dtype=NUMPY_DTYPES[spec.dtype], directions=(spec.direction,),
                               spec=spec.name, cls=spec.groups))
    return cases


def load_layers(path=DEFAULT_LAYERS):
    """The layer suite as cases; raises FileNotFoundError / ValueError with a clear message."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    layers = data["layers"] if isinstance(data, dict) else data
    cases = []
    for i, layer in enumerate(layers):
        try:
            cases.append(make_case(
                layer["name"], "layer", layer.get("N", 1), layer["C"], layer["H"], layer["W"], layer["OC"],
                layer.get("k", layer.get("kernel")), layer.get("stride", 1), layer.get("padding", 0),
                layer.get("dilation", 1), layer.get("groups", 1), layer.get("padding_mode", "zeros"),
                layer.get("dtype", "float32"), source=layer.get("source", ""),
                **({"cls": layer["class"]} if "class" in layer else {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: layer {i} ({layer.get('name', '?')!r}) is malformed: {e}") from None
    return cases


def select(cases, only):
    """Cases whose name matches any of the `only` patterns (substring or glob)."""
    if not only:
        return cases
    def match(name):
        return any(p in name or fnmatch.fnmatchcase(name, p) for p in only)
    return [c for c in cases if match(c["name"])]


def describe(case):
    """Short shape string: 1x64x56x56 -> 64, k3x3 s1 p1 d1 g1."""
    k, s, p, d = case["kernel"], case["stride"], case["padding"], case["dilation"]
    def pr(v):
        return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
    text = (f"{case['N']}x{case['C']}x{case['H']}x{case['W']}->{case['OC']} k{k[0]}x{k[1]} s{pr(s)} p{pr(p)} "
            f"d{pr(d)} g{case['groups']}")
    if case["padding_mode"] != "zeros":
        text += f" {case['padding_mode']}"
    return text

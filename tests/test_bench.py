"""The benchmark harness (bench/), cheaply: the case lists come from the spec
table, the NumPy im2col peer is right, a worker subprocess answers, and a
one-layer run writes its results.  No timing is asserted."""

import json
import os
import subprocess

import numpy as np
import pytest

import convgen
from bench import im2col, report, suite
from bench.__main__ import main as bench_main
from bench.peers import case_arrays
from bench.runner import Runner
from bench.suite import ROOT
from codegen.table import SPECS

TINY = {"name": "tiny_test", "N": 2, "C": 4, "H": 9, "W": 7, "OC": 6, "k": 3, "stride": 1, "padding": 1,
        "dilation": 1, "groups": 1}


def test_micro_cases_are_the_spec_table():
    cases = suite.micro_cases()
    assert [c["name"] for c in cases] == sorted(s.name for s in SPECS)
    by_name = {s.name: s for s in SPECS}
    for c in cases:
        spec = by_name[c["name"]]
        assert c["directions"] == (spec.direction,) and c["spec"] == spec.name
        assert c["dtype"] == {"f32": "float32", "f64": "float64"}[spec.dtype]
        assert c["flops"] > 0
        # the case really dispatches to its kernel
        assert convgen.kernel_for(c["C"], c["OC"], c["kernel"], c["stride"], c["padding"], c["dilation"],
                                  c["groups"], c["dtype"], spec.direction) == spec.name


def test_layers_file_classes_and_flops(tmp_path):
    path = tmp_path / "layers.json"
    layers = [TINY,
              dict(TINY, name="dw", C=8, OC=8, H=40, W=40, groups=8),
              dict(TINY, name="f64", dtype="float64", H=64, W=64, C=32, OC=32, padding_mode="reflect"),
              dict(TINY, name="pw", k=1, padding=0, C=64, OC=64, H=32, W=32)]
    path.write_text(json.dumps({"layers": layers}))
    cases = {c["name"]: c for c in suite.load_layers(str(path))}
    assert cases["tiny_test"]["flops"] == 2 * 2 * 6 * 9 * 7 * 4 * 9
    assert suite.flops(cases["tiny_test"], "bwd") == 2 * cases["tiny_test"]["flops"]
    assert [cases[n]["cls"] for n in ("tiny_test", "dw", "f64", "pw")] == ["small", "depthwise", "float64", "1x1"]
    assert cases["f64"]["padding_mode"] == "reflect"
    assert [c["name"] for c in suite.select(list(cases.values()), ["d*"])] == ["dw"]
    with pytest.raises(FileNotFoundError):
        suite.load_layers(str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"layers": [{"name": "bad"}]}))
    with pytest.raises(ValueError, match="bad"):
        suite.load_layers(str(path))


def test_more_layers_file():
    """bench/more_layers.json (layers beyond the shared suite) loads, its names are unique,
    and each layer is a valid convgen.Conv2d on its input."""
    cases = suite.load_layers(os.path.join(ROOT, "bench", "more_layers.json"))
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)) >= 20
    for c in cases:
        conv = convgen.Conv2d(c["C"], c["OC"], c["kernel"], c["stride"], c["padding"], c["dilation"], c["groups"],
                              dtype=c["dtype"])
        assert min(convgen.functional.output_size((c["H"], c["W"]), c["kernel"], c["stride"], c["padding"],
                                                  c["dilation"])) > 0
        assert conv.weight.shape == (c["OC"], c["C"] // c["groups"], *c["kernel"])


@pytest.mark.parametrize("cfg", [
    dict(C=4, OC=6, k=3, stride=1, padding=1, dilation=1, groups=1, mode="zeros"),
    dict(C=4, OC=8, k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, mode="zeros"),
    dict(C=6, OC=12, k=5, stride=2, padding=2, dilation=1, groups=6, mode="zeros"),
    dict(C=3, OC=5, k=3, stride=1, padding=2, dilation=2, groups=1, mode="reflect"),
    dict(C=4, OC=4, k=3, stride=2, padding=1, dilation=1, groups=1, mode="circular"),
    dict(C=2, OC=3, k=1, stride=1, padding=1, dilation=1, groups=1, mode="replicate"),
], ids=lambda c: f"k{c['k']}-s{c['stride']}-d{c['dilation']}-g{c['groups']}-{c['mode']}")
def test_numpy_im2col_matches_convgen(cfg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg["C"], 11, 9)).astype(np.float32)
    conv = convgen.Conv2d(cfg["C"], cfg["OC"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"],
                          cfg["groups"], padding_mode=cfg["mode"], seed=1)
    y = conv(x)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = conv.backward(gy)
    g = im2col.Geometry(x.shape, conv.weight.shape, cfg["stride"], cfg["padding"], cfg["dilation"],
                        cfg["groups"], cfg["mode"])
    y2, cols = im2col.forward(x, np.asarray(conv.weight), np.asarray(conv.bias), g)
    gx2, gw2, gb2 = im2col.backward(gy, np.asarray(conv.weight), cols, g)
    for got, want in ((y2, y), (gx2, gx), (gw2, conv.weight.grad), (gb2, conv.bias.grad)):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_worker_subprocess_times_and_checks():
    case = suite.make_case("tiny_test", "layer", 1, 3, 8, 8, 4, 3, padding=1)
    with Runner(["convgen", "numpy"], threads=1, repeats=1, min_time=0.001) as runner:
        assert runner.info()["numpy"]["version"] == np.__version__
        record = runner.run_case(case)
    for peer in ("convgen", "numpy"):
        for d in ("fwd", "bwd"):
            res = record["results"][peer][d]
            assert len(res["samples"]) == 1 and res["median"] > 0
    assert record["check"]["convgen"]["fwd"]["ok"] and record["check"]["convgen"]["bwd"]["ok"]
    assert record["ran"]["bwd"] == [convgen.kernel_for(3, 4, 3, padding=1, direction=d)
                                    for d in ("bwd_data", "bwd_weight")]


def test_case_arrays_are_the_same_everywhere():
    case = suite.micro_cases()[0]
    a, b = case_arrays(case), case_arrays(case)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_report_ratio_and_geomeans():
    case = suite.make_case("L", "layer", 1, 8, 16, 16, 8, 3, padding=1)
    rec = dict(case, results={"convgen": {"fwd": {"median": 1.0}, "bwd": {"median": 2.0}},
                              "torch": {"fwd": {"median": 2.0}, "bwd": {"median": 1.0}}})
    assert report.ratio(rec, "torch", "fwd") == 2.0      # > 1: convgen faster
    assert report.ratio(rec, "torch", "bwd") == 0.5
    assert report.geomean([2.0, 8.0]) == pytest.approx(4.0)
    rows = report.summarise([rec], {"f32": 100.0}, lambda r: r["cls"], suite.CLASSES, ("fwd", "bwd"))
    assert rows[0]["group"] == "all" and rows[0]["vs"]["torch"]["geomean"] == 2.0


def test_peak_probe_is_generated_and_built():
    from convgen._generated import _peak
    gflops, seconds = _peak.peak_f32(1, 20_000)
    assert gflops > 0 and seconds > 0
    assert _peak.peak_f64(2, 20_000)[0] > 0


def test_python_m_bench_quick_one_layer(tmp_path, capsys):
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"layers": [TINY]}))
    out = tmp_path / "results"
    rc = bench_main(["--quick", "--part", "layers", "--layers", str(layers), "--peers", "convgen,numpy",
                     "--threads", "1", "--repeats", "1", "--out", str(out), "--no-plot", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["peak"]["best"]["f32"] > 0
    assert [r["name"] for r in results["layers"]] == ["tiny_test"]
    text = (out / "README.md").read_text()
    assert "tiny_test" in text and "vs NumPy im2col" in text
    source = results["meta"]["source"]   # (the tests run from a git checkout where git exists)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert source["commit"] == head.stdout.strip() and f"commit `{source['commit']}`" in text
    else:
        assert source is None and "not a git checkout" in text
    assert "FMA peak" in capsys.readouterr().out
    # a missing layer file is reported, not a crash
    assert bench_main(["--list", "--layers", str(tmp_path / "none.json"), "--only", "nothing"]) == 0
    assert "missing" in capsys.readouterr().err


def test_one_thread_peer_measures_scaling(tmp_path):
    """convgen_1t runs convgen on one thread beside the run's threads; the report reads its
    ratios as the scaling.  On one thread it would time convgen against itself: dropped."""
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"layers": [TINY]}))
    out = tmp_path / "results"
    common = ["--quick", "--part", "layers", "--layers", str(layers), "--peers", "convgen_1t", "--repeats", "1",
              "--out", str(out), "--no-plot", "--no-progress"]
    assert bench_main(common + ["--threads", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["peers"]["convgen"]["threads"] == 2
    assert results["meta"]["peers"]["convgen_1t"]["threads"] == 1
    assert set(results["layers"][0]["results"]) == {"convgen", "convgen_1t"}
    text = (out / "README.md").read_text()
    assert "vs convgen 1 thread" in text and "scaling from 1 to 2 threads" in text
    assert bench_main(common + ["--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["meta"]["peers"]) == {"convgen"} and "scaling" not in (out / "README.md").read_text()


def test_frozen_peer_times_forwards_only(tmp_path):
    """convgen_frozen times convgen's frozen module (weights packed once) on forwards,
    checked against NumPy im2col's output, and skips the backward; its ratios are not bold."""
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"layers": [dict(TINY, C=40, OC=48, H=7, W=7)]}))
    out = tmp_path / "results"
    assert bench_main(["--quick", "--part", "layers", "--layers", str(layers), "--peers", "convgen_frozen,numpy",
                       "--repeats", "1", "--out", str(out), "--no-plot", "--no-progress", "--threads", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    record = results["layers"][0]
    assert set(record["results"]["convgen_frozen"]) == {"fwd"} and "bwd" in record["results"]["convgen"]
    assert record["check"]["convgen_frozen"]["fwd"]["ok"]
    assert "inference forwards only" in record["skip"]["convgen_frozen"]["bwd"]
    text = (out / "README.md").read_text()
    assert "vs convgen frozen" in text and "Conv2d.freeze()" in text
    # a ratio below 1 is bold for a peer convgen lost to, not for its frozen self
    from bench import report
    record = dict(suite.make_case("a", "layer", 1, 8, 16, 16, 8, 3, padding=1),
                  results={p: {"fwd": {"median": t}} for p, t in
                           (("convgen", 2.0), ("torch", 1.0), ("convgen_frozen", 1.0))})
    row = report._case_rows([record], {}, ["torch", "convgen_frozen"], True)[0]
    assert row[-3:] == ["**0.50**", "1000", "0.50"]


def test_update_merges_into_earlier_results(tmp_path):
    from bench.__main__ import merge

    def run(names, load):
        recs = [dict(suite.make_case(n, "layer", 1, 8, 16, 16, 8, 3, padding=1), load=load,
                     results={"convgen": {"fwd": {"median": load}}}) for n in names]
        meta = dict(threads=2, mode="full", command="c", date="d", duration_s=1.0, load_before="x",
                    load_after="y", repeats=3, min_time=0.01)
        peak = {"best": {"f32": 100.0 * load}, "many": {"f32": 100.0 * load}, "single": {"f32": 50.0}}
        return {"meta": meta, "peak": peak, "layers": recs, "micro": []}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run(["a", "b"], 5.0)))
    merged = merge(str(path), run(["b", "c"], 1.0), print)
    assert [(r["name"], r["load"]) for r in merged["layers"]] == [("a", 5.0), ("b", 1.0), ("c", 1.0)]
    assert merged["meta"]["updates"][0]["cases"] == ["b", "c"]
    assert merged["peak"]["best"]["f32"] == 500.0      # the best peak is kept


def test_calibrate_ignores_one_slow_call():
    """One slow call (a page fault, another job) must not set the calls per sample."""
    import time
    from bench.worker import calibrate
    calls = []

    def run():
        calls.append(None)
        time.sleep(0.02 if len(calls) == 2 else 0.0002)   # the first timed call is slow

    inner, per_call = calibrate(run, 0.02)
    assert per_call < 0.002 and inner >= 10


def test_source_counts_changes_but_not_the_results_a_run_writes(tmp_path, monkeypatch):
    """source_info: a tracked file changed marks the source changed; the results under
    bench/results/, which the run itself rewrites, do not."""
    import shutil
    import bench.__main__ as bench_cli
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "README.md").write_text("run 1\n")
    (tmp_path / "kernel.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    monkeypatch.setattr(bench_cli, "ROOT", str(tmp_path))
    assert bench_cli.source_info()["changed"] is False
    (tmp_path / "bench" / "results" / "README.md").write_text("run 2\n")
    assert bench_cli.source_info()["changed"] is False
    (tmp_path / "kernel.py").write_text("a = 2\n")
    assert bench_cli.source_info()["changed"] is True

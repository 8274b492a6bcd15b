"""python -m convgen.demo: the seed example, then a short timing against NumPy im2col."""

import multiprocessing
import time

import numpy as np

import convgen
from convgen import _engine


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def im2col_conv(x, w, pad):
    """The textbook NumPy approach: unfold patches into columns (channel x tap, pixel),
    then one BLAS matmul per image whose result is already (out channel, pixel)."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    cols = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    cols = cols.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
    return (w.reshape(oc, -1) @ cols).reshape(n, oc, oh, ow)


def _time_im2col(args):
    x, w, repeats = args
    im2col_conv(x, w, 1)
    return _median_time(lambda: im2col_conv(x, w, 1), repeats)


def _im2col_times(cases):
    """im2col_conv's median times on (x, w, repeats) cases, measured in a fresh process:
    in this one convgen's OpenMP threads, still spinning after a call, would fight
    NumPy's BLAS threads for the cores and slow both (on 2 cores, NumPy 3-4x)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.map(_time_im2col, cases)


def main():
    # The seed example.
    conv = convgen.Conv2d(3, 16, 3, padding=1, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    output = conv(x)
    print(output.shape)
    # (the threads the call really used: small calls run on one, see _engine.threads_for)
    plan = _engine.forward_plan(conv._cfg.problem(x.shape, x.dtype))
    used, setting = _engine.threads_for(plan.work, plan.values), convgen.get_num_threads()
    print(f"{conv!r} runs {conv.kernel_name} on {used} thread(s)"
          + ("" if used == setting else f" (of {setting}: a call this small runs on one)"))

    # A short timing: the seed example and a ResNet-50 3x3 layer.
    # (NumPy in a process of its own, first: see _im2col_times)
    cases = []
    for name, c, oc, hw, repeats in [("seed 3->16 32x32", 3, 16, 32, 200),
                                     ("resnet50 3x3 64->64 56x56", 64, 64, 56, 20)]:
        layer = convgen.Conv2d(c, oc, 3, padding=1, bias=False, seed=1)
        xx = np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)
        cases.append((name, layer, xx, np.asarray(layer.weight), repeats, 2 * oc * hw * hw * c * 9))
    numpy_times = _im2col_times([(xx, w, repeats) for _, _, xx, w, repeats, _ in cases])
    # convgen's times first, its results checked against im2col after: NumPy's BLAS threads
    # busy-wait after a matmul in this process too, and took half the cores from convgen's
    # timing that followed (ResNet's layer 1.4 -> 6.3 ms on 2 cores).
    convgen_times = [_median_time(lambda: layer(xx), repeats) for _, layer, xx, _, repeats, _ in cases]
    print(f"\n{'layer':28s} {'convgen':>10s} {'im2col+BLAS':>12s} {'ratio':>7s} {'GFLOP/s':>8s}")
    for (name, layer, xx, w, repeats, flops), t_np, t_cg in zip(cases, numpy_times, convgen_times):
        print(f"{name:28s} {t_cg * 1e6:8.1f}us {t_np * 1e6:10.1f}us {t_np / t_cg:6.3g}x {flops / t_cg / 1e9:8.1f}")
    for _, layer, xx, w, _, _ in cases:
        assert np.allclose(layer(xx), im2col_conv(xx, w, 1), rtol=1e-3, atol=1e-3)


if __name__ == "__main__":
    main()

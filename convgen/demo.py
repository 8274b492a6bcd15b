"""python -m convgen.demo: the seed example, then a short timing against NumPy im2col."""

import time

import numpy as np

import convgen


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def im2col_conv(x, w, pad):
    """The textbook NumPy approach: unfold patches, one BLAS matmul."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * kh * kw)
    return (cols @ w.reshape(oc, -1).T).reshape(n, h, wd, oc).transpose(0, 3, 1, 2)


def main():
    # The seed example.
    conv = convgen.Conv2d(3, 16, 3, padding=1, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    output = conv(x)
    print(output.shape)
    print(f"{conv!r} runs {conv.kernel_name} on {convgen.get_num_threads()} thread(s)")

    # A short timing: the seed example and a ResNet-50 3x3 layer.
    print(f"\n{'layer':28s} {'convgen':>10s} {'im2col+BLAS':>12s} {'ratio':>7s} {'GFLOP/s':>8s}")
    for name, c, oc, hw, repeats in [("seed 3->16 32x32", 3, 16, 32, 200),
                                     ("resnet50 3x3 64->64 56x56", 64, 64, 56, 20)]:
        layer = convgen.Conv2d(c, oc, 3, padding=1, bias=False, seed=1)
        xx = np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)
        w = np.asarray(layer.weight)
        assert np.allclose(layer(xx), im2col_conv(xx, w, 1), rtol=1e-3, atol=1e-3)
        t_cg = _median_time(lambda: layer(xx), repeats)
        t_np = _median_time(lambda: im2col_conv(xx, w, 1), repeats)
        flops = 2 * oc * hw * hw * c * 9
        print(f"{name:28s} {t_cg * 1e6:8.1f}us {t_np * 1e6:10.1f}us {t_np / t_cg:6.1f}x {flops / t_cg / 1e9:8.1f}")


if __name__ == "__main__":
    main()

"""Threads: set/get_num_threads, OMP_NUM_THREADS and threadpoolctl honoured,
and results bitwise identical whatever the thread count."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convgen
from convgen import _engine
from conftest import make_rng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    for k, v in env.items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_set_get_num_threads(restore_threads):
    for n in (1, 3, 2):
        convgen.set_num_threads(n)
        assert convgen.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_set_num_threads_rejects(bad, restore_threads):
    with pytest.raises((ValueError, TypeError)):
        convgen.set_num_threads(bad)
    assert convgen.get_num_threads() == restore_threads


def test_omp_num_threads_honoured():
    code = """
        import json, convgen
        print(json.dumps(convgen.get_num_threads()))
    """
    assert _python(code, OMP_NUM_THREADS="1") == 1
    assert _python(code, OMP_NUM_THREADS="3") == 3


def test_threadpoolctl_sees_and_limits_convgen():
    pytest.importorskip("threadpoolctl")
    code = """
        import json
        import numpy as np
        from threadpoolctl import threadpool_info, threadpool_limits
        before = [i["user_api"] for i in threadpool_info()]
        import convgen
        after = threadpool_info()
        convgen.set_num_threads(3)
        with threadpool_limits(limits=1, user_api="openmp"):
            inside = convgen.get_num_threads()
            conv = convgen.Conv2d(4, 4, 3, padding=1, seed=0)
            y1 = conv(np.ones((2, 4, 9, 9), np.float32))
        outside = convgen.get_num_threads()
        y3 = conv(np.ones((2, 4, 9, 9), np.float32))
        print(json.dumps(dict(before=before, after=[i["user_api"] for i in after],
                              libs=[i["filepath"] for i in after if i["user_api"] == "openmp"],
                              inside=inside, outside=outside, same=bool((y1 == y3).all()))))
    """
    r = _python(code, OMP_NUM_THREADS="2")
    assert "openmp" not in r["before"]
    assert "openmp" in r["after"], r
    assert r["inside"] == 1 and r["outside"] == 3
    assert r["same"]


# ---- results do not depend on the thread count ----------------------------------------

# Big enough (over 2**20 multiply-adds each) that convgen really splits them over
# threads: it runs smaller calls on one thread whatever the setting.  The tiles of
# calls under _engine.STATIC_WORK go to the threads in one run each, larger ones
# dynamically ("dense-k3s1-large").
N_IMAGES = 3
THREAD_CASES = [
    # (C, OC, H, W, kernel, stride, padding, dilation, groups)
    pytest.param((16, 24, 17, 19, 3, 1, 1, 1, 1), id="dense-k3s1"),
    pytest.param((32, 32, 40, 40, 3, 1, 1, 1, 1), id="dense-k3s1-large"),
    pytest.param((16, 32, 41, 38, 3, 2, 1, 1, 1), id="dense-k3s2"),
    pytest.param((16, 24, 31, 32, (3, 2), (2, 1), (1, 0), (1, 2), 1), id="dense-generic"),
    pytest.param((16, 32, 48, 44, 3, 1, 1, 1, 16), id="depthwise-k3-x2"),
    pytest.param((24, 24, 64, 60, 5, 2, 2, 1, 24), id="depthwise-k5s2"),
    pytest.param((12, 18, 28, 30, 3, 1, 1, 1, 3), id="grouped-k3"),
]


def _multiply_adds(C, OC, H, W, kernel, stride, padding, dilation, groups):
    oh, ow = convgen.output_size((H, W), kernel, stride, padding, dilation)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return N_IMAGES * OC * oh * ow * (C // groups) * kh * kw


def test_thread_cases_cover_both_schedules():
    work = [_multiply_adds(*c.values[0]) for c in THREAD_CASES]
    assert min(work) < _engine.STATIC_WORK < max(work)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", THREAD_CASES)
def test_bitwise_identical_across_thread_counts(case, dtype, restore_threads):
    assert _multiply_adds(*case) > 2 ** 20
    C, OC, H, W, kernel, stride, padding, dilation, groups = case
    rng = make_rng("threads", case, dtype)
    x = rng.standard_normal((N_IMAGES, C, H, W)).astype(dtype)
    results = {}
    for n in (1, 2, 3):
        convgen.set_num_threads(n)
        assert convgen.get_num_threads() == n
        conv = convgen.Conv2d(C, OC, kernel, stride, padding, dilation, groups, dtype=dtype, seed=4)
        y = conv(x)
        gy = make_rng("threads-gy", case, dtype).standard_normal(y.shape).astype(dtype)
        gx = conv.backward(gy)
        results[n] = (y, gx, conv.weight.grad, conv.bias.grad)
    for n in (2, 3):
        for what, a, b in zip(("forward", "input grad", "weight grad", "bias grad"), results[1], results[n]):
            assert np.array_equal(a, b), f"{what} differs between 1 and {n} threads"


def test_set_num_threads_is_process_wide(restore_threads):
    import threading
    wanted = restore_threads + 1          # differs from what a new thread starts with
    convgen.set_num_threads(wanted)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(convgen.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [wanted]


def test_python_threads_share_plans_and_steps():
    """Python threads running the same layers at once (their own modules, the plans and
    the steps worked out for them shared; each thread's scratch memory its own) get the
    results a single thread gets, forward, inference and backward."""
    from concurrent.futures import ThreadPoolExecutor
    cases = [c.values[0] for c in THREAD_CASES]

    def run(case):
        C, OC, H, W, kernel, stride, padding, dilation, groups = case
        x = make_rng("python-threads", case).standard_normal((N_IMAGES, C, H, W)).astype(np.float32)
        conv = convgen.Conv2d(C, OC, kernel, stride, padding, dilation, groups, seed=5)
        out = []
        for _ in range(3):
            with convgen.no_grad():
                out.append(conv(x))
            y = conv(x)
            conv.zero_grad()
            out += [y, conv.backward(np.cos(y)), conv.weight.grad, conv.bias.grad]
        return out

    alone = [run(case) for case in cases]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, cases * 3))
    for i, got in enumerate(together):
        for a, b in zip(alone[i % len(cases)], got):
            assert np.array_equal(a, b), f"case {i % len(cases)} differs when run beside other threads"

"""The examples run and learn, in shortened runs."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)


def test_numpy_sgd_drives_the_loss_down(capsys):
    import numpy_sgd
    losses = numpy_sgd.main(["--steps", "8"])
    assert len(losses) == 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.25 * losses[0]
    out = capsys.readouterr().out
    assert "step   7  loss" in out and "->" in out


def test_numpy_sgd_needs_no_torch():
    code = ("import sys, runpy; sys.modules['torch'] = None\n"
            f"sys.argv = ['numpy_sgd.py', '--steps', '2']\n"
            f"runpy.run_path({os.path.join(EXAMPLES, 'numpy_sgd.py')!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "step   1  loss" in out


def test_digits_short_run_learns_and_matches_torch(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import digits_train
    results = digits_train.main(["--epochs", "3", "--quiet"])
    ours, ref = results["convgen"], results["torch"]
    assert ours["accuracy"] >= 0.95, ours
    assert all(b < a for a, b in zip(ours["losses"], ours["losses"][1:])), ours["losses"]
    # the same network, weights and batches: the same learning curve up to rounding
    for a, b in zip(ours["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (ours["losses"], ref["losses"])
    assert abs(ours["accuracy"] - ref["accuracy"]) <= 0.02
    out = capsys.readouterr().out
    assert "convgen.torch.Conv2d" in out and "torch.nn.Conv2d" in out and "test accuracy" in out


def test_demo_the_main_job():
    """`make demo`: the seed example's shape, then convgen against NumPy im2col (timed in a
    process of its own) on two layers, each row with positive times and a ratio."""
    out = subprocess.run([sys.executable, "-m", "convgen.demo"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    lines = out.splitlines()
    # (the threads such a call takes: one, or all where a second pays, see _engine.SMALL_WORK)
    from convgen import _engine
    fp = _engine.inference_plan(_engine.Problem(1, 3, 32, 32, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, "zeros", "f32"))
    threads = _engine.threads_for(fp.work, fp.values)
    assert lines[0] == "(1, 16, 32, 32)" and f"runs conv2d_fwd_f32_k3x3_s1_d1_dense on {threads} thread(s)" in lines[1]
    rows = [line for line in lines if line.startswith(("seed", "resnet50"))]
    assert len(rows) == 2
    for row in rows:
        convgen_us, numpy_us, ratio = (float(v.rstrip("usx")) for v in row.split()[-4:-1])
        assert convgen_us > 0 and numpy_us > 0 and abs(ratio - numpy_us / convgen_us) < 0.06 * ratio


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_resnet18_convert_computes_torchs_numbers(train, capsys):
    pytest.importorskip("torch")
    import resnet18_convert
    argv = ["--size", "48", "--batch", "2", "--rounds", "2", "--calls", "1"] + (["--train"] if train else [])
    result = resnet18_convert.main(argv)
    assert result["diff"] < 1e-5
    assert result["grad_diff"] < 1e-3 if train else result["grad_diff"] == 0.0
    assert result["torch"] > 0 and result["convgen"] > 0
    out = capsys.readouterr().out
    assert "converted 20 convolutions" in out and "alternating rounds" in out

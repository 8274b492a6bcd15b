"""A few steps of plain SGD on a convgen.Conv2d, with NumPy only (no torch).

The layer learns to imitate a fixed "teacher" convolution: forward, a mean squared
error loss, backward (convgen's weight and bias gradients: the input is data, so its
gradient is skipped), an in-place update of each parameter, zero_grad.

    python examples/numpy_sgd.py
    python examples/numpy_sgd.py --steps 5 --lr 0.1
"""

import argparse

import numpy as np

import convgen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    teacher = convgen.Conv2d(3, 8, 3, padding=1, seed=rng)
    conv = convgen.Conv2d(3, 8, 3, padding=1, seed=rng)
    x = rng.standard_normal((16, 3, 12, 12)).astype(np.float32)
    target = teacher(x)

    losses = []
    for step in range(args.steps):
        y = conv(x)
        diff = y - target
        loss = float(np.mean(diff * diff))
        losses.append(loss)
        print(f"step {step:3d}  loss {loss:.6f}")
        # dloss/dy; fills weight.grad, bias.grad (input_grad=False: x is data, as a first layer's)
        conv.backward(2 * diff / diff.size, input_grad=False)
        conv.weight -= args.lr * conv.weight.grad    # in place: still a Parameter
        conv.bias -= args.lr * conv.bias.grad
        conv.zero_grad()                             # grads back to None
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    return losses


if __name__ == "__main__":
    main()

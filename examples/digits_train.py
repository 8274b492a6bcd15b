"""Train a small CNN on scikit-learn's handwritten digits with convgen's drop-in
Conv2d, and the same network with torch.nn.Conv2d for comparison.

    python examples/digits_train.py              # both, 15 epochs
    python examples/digits_train.py --epochs 3   # a shorter run
    python examples/digits_train.py --only convgen

The digits (1797 8x8 greyscale images, bundled with scikit-learn, no download) are
split 75/25 (stratified, fixed seed).  Both networks start from the same weights
(same torch seed) and see the batches in the same order, so they differ only in
which code computes the convolutions (and in float rounding).
"""

import argparse
import time

import numpy as np
import torch

from convgen.torch import Conv2d as ConvgenConv2d


def make_net(conv_cls, seed=0):
    """conv(1->16) - ReLU - conv(16->32) - ReLU - maxpool 2 - linear(512->10)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        conv_cls(1, 16, 3, padding=1), torch.nn.ReLU(),
        conv_cls(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def load_data(seed=0):
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                          stratify=digits.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(xte), torch.from_numpy(yte).long())


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def train(conv_cls, data, epochs=15, batch_size=32, lr=3e-3, seed=0, log=None):
    """Train make_net(conv_cls) with Adam; returns dict(accuracy, seconds, losses)
    (losses: the mean training loss of each epoch)."""
    xtr, ytr, xte, yte = data
    net = make_net(conv_cls, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)  # the same batches for every network
    losses = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=order)
        total = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xtr))
        if log:
            log(f"  epoch {epoch + 1:2d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(net, xte, yte), "seconds": seconds, "losses": losses}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("convgen", "torch"), help="train just one of the two networks")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = ap.parse_args(argv)

    data = load_data(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, "
          f"{args.epochs} epochs, batch {args.batch_size}, {torch.get_num_threads()} threads")
    nets = {"convgen": ("convgen.torch.Conv2d", ConvgenConv2d), "torch": ("torch.nn.Conv2d", torch.nn.Conv2d)}
    results = {}
    for key, (name, conv_cls) in nets.items():
        if args.only and key != args.only:
            continue
        print(name)
        r = results[key] = train(conv_cls, data, args.epochs, args.batch_size, args.lr, args.seed,
                                 log=None if args.quiet else print)
        print(f"  test accuracy {r['accuracy']:.2%} in {r['seconds']:.2f} s")
    if len(results) == 2:
        c, t = results["convgen"], results["torch"]
        print(f"\n{'':22s} {'accuracy':>9s} {'time':>8s}")
        for key, (name, _) in nets.items():
            print(f"{name:22s} {results[key]['accuracy']:9.2%} {results[key]['seconds']:7.2f}s")
        print(f"convgen / torch time: {c['seconds'] / t['seconds']:.2f}x")
    return results


if __name__ == "__main__":
    main()

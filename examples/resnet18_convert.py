"""Run an existing PyTorch model's convolutions through convgen: ResNet-18 (torchvision's
layout, written out here so that nothing needs downloading) before and after
``convgen.torch.convert``.

    python examples/resnet18_convert.py                  # inference, one 224x224 image
    python examples/resnet18_convert.py --train --batch 4   # a training step (SGD)

It checks that the converted model computes the same outputs (and, with --train, the same
weight gradients), then times it against PyTorch's own convolutions in alternating
rounds in this one process: ``revert`` and ``convert`` swap the same model's 20
convolutions between the two, weights and all, so nothing else differs.
"""

import argparse
import time

import numpy as np
import torch

import convgen.torch as cgt

nn = torch.nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and the shortcut (a strided 1x1 where the
    shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet18(num_classes=1000):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="time a training step, not an inference forward")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="image height and width")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each")
    ap.add_argument("--calls", type=int, default=10, help="timed calls per round")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = resnet18()
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.train:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                return model(x)

    # The same numbers: outputs (and gradients) of the model both ways, weights unchanged.
    def outputs_and_grads():
        model.zero_grad()
        y = model(x)
        if args.train:
            y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    y_torch, g_torch = outputs_and_grads()
    cgt.convert(model)
    y_ours, g_ours = outputs_and_grads()
    diff = (y_ours - y_torch).abs().max().item() / max(1.0, y_torch.abs().max().item())
    gdiff = max([((a - b).abs().max() / max(1.0, b.abs().max())).item() for a, b in zip(g_ours, g_torch)],
                default=0.0)
    print(f"converted {sum(isinstance(m, cgt.Conv2d) for m in model.modules())} convolutions; "
          f"largest difference from PyTorch's outputs {diff:.1e}" + (f", gradients {gdiff:.1e}" if args.train else ""))

    times = {"torch": [], "convgen": []}
    for r in range(args.rounds):
        for name in (("torch", "convgen") if r % 2 == 0 else ("convgen", "torch")):
            (cgt.revert if name == "torch" else cgt.convert)(model)
            step()   # (a warm-up call: plans, allocations)
            ts = []
            for _ in range(args.calls):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
            times[name].append(float(np.median(ts)))
    what = f"training step, batch {args.batch}" if args.train else f"inference, batch {args.batch}"
    t_torch, t_ours = np.median(times["torch"]), np.median(times["convgen"])
    print(f"ResNet-18 {what}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} alternating rounds: torch.nn.Conv2d {t_torch * 1e3:.1f} ms, "
          f"converted {t_ours * 1e3:.1f} ms ({t_torch / t_ours:.2f}x)")
    return dict(diff=diff, grad_diff=gdiff, torch=t_torch, convgen=t_ours)


if __name__ == "__main__":
    main()

"""The implementations timed against each other.  Each runs in its own worker
process (bench/worker.py), so only one of them is ever imported in a process.

A peer turns a case (bench/suite.py) and a direction into a zero-argument
callable; ``Skip`` says it cannot run that one (and why).  Directions:
    fwd         the forward pass, with bias
    bwd         the whole backward pass: input, weight and bias gradients, given
                a forward pass done beforehand (not timed)
    bwd_data    the input gradient alone (micro-benchmarks)
    bwd_weight  the weight gradient alone (micro-benchmarks)
Every peer builds the same data from the same seed (``case_arrays``), and can
hand back what it computed (``outputs``) so the runner can check they agree.
"""

import zlib

import numpy as np

from .suite import PEER_NAMES as NAMES, output_hw


class Skip(Exception):
    """This peer does not run this case/direction; the message says why."""


def case_arrays(case):
    """x, w, b, gy for a case: the same numbers in every process."""
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    dtype = np.dtype(case["dtype"])
    (kh, kw), cg = case["kernel"], case["C"] // case["groups"]
    oh, ow = output_hw(case)
    x = rng.standard_normal((case["N"], case["C"], case["H"], case["W"])).astype(dtype)
    bound = 1 / np.sqrt(cg * kh * kw)
    w = rng.uniform(-bound, bound, (case["OC"], cg, kh, kw)).astype(dtype)
    b = rng.uniform(-bound, bound, case["OC"]).astype(dtype)
    gy = rng.standard_normal((case["N"], case["OC"], oh, ow)).astype(dtype)
    return x, w, b, gy


class Peer:
    name = "?"

    def __init__(self, threads):
        self.threads = threads

    def info(self):
        return {}

    def make(self, case, direction):
        """(callable, outputs): outputs() returns the last call's results as
        a tuple of NumPy arrays (y for fwd; gx, gw, gb for bwd)."""
        raise NotImplementedError


class ConvgenPeer(Peer):
    name = "convgen"
    frozen = False   # (Conv2d.freeze() before timing: ConvgenFrozenPeer)

    def __init__(self, threads):
        super().__init__(threads)
        import convgen
        import convgen.functional
        self.convgen = convgen
        convgen.set_num_threads(threads)

    def info(self):
        import subprocess
        from .suite import ROOT
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        return {"version": self.convgen.__version__, "commit": commit,
                "threads": self.convgen.get_num_threads()}

    def kernel(self, case, direction):
        """The generated kernel(s) this case runs, by convgen.kernel_for."""
        dirs = ("bwd_data", "bwd_weight") if direction == "bwd" else (direction,)
        return [self.convgen.kernel_for(case["C"], case["OC"], case["kernel"], case["stride"], case["padding"],
                                        case["dilation"], case["groups"], np.dtype(case["dtype"]), d)
                for d in dirs]

    def make(self, case, direction):
        cg, F = self.convgen, self.convgen.functional
        x, w, b, gy = case_arrays(case)
        args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
        out = {}
        if self.frozen and direction != "fwd":
            raise Skip("frozen parameters (Conv2d.freeze): inference forwards only")
        if direction in ("fwd", "bwd"):
            conv = cg.Conv2d(case["C"], case["OC"], case["kernel"], padding_mode=case["padding_mode"],
                             dtype=np.dtype(case["dtype"]), **args)
            conv.weight[...] = w
            conv.bias[...] = b
            if self.frozen:
                conv.freeze()
            if direction == "fwd":
                def run():
                    with cg.no_grad():   # inference, as PyTorch's forward runs under torch.no_grad()
                        out["y"] = conv(x)
                return run, lambda: (out["y"],)
            conv(x)

            def run():
                conv.zero_grad()
                out["gx"] = conv.backward(gy)
            return run, lambda: (out["gx"], conv.weight.grad, conv.bias.grad)
        if case["padding_mode"] != "zeros":
            raise Skip("the functional gradients take zero padding only")
        if direction == "bwd_data":
            def run():
                out["r"] = F.conv2d_input(x.shape, w, gy, **args)
        else:
            def run():
                out["r"] = F.conv2d_weight(x, w.shape, gy, **args)
        return run, lambda: (out["r"],)


class TorchPeer(Peer):
    name = "torch"

    def __init__(self, threads):
        super().__init__(threads)
        import torch
        self.torch = torch
        torch.set_num_threads(threads)

    def info(self):
        return {"version": self.torch.__version__, "threads": self.torch.get_num_threads(),
                "mkldnn": bool(self.torch.backends.mkldnn.is_available())}

    def make(self, case, direction):
        torch = self.torch
        x, w, b, gy = (torch.from_numpy(a) for a in case_arrays(case))
        args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
        out = {}
        if direction in ("fwd", "bwd"):
            conv = torch.nn.Conv2d(case["C"], case["OC"], case["kernel"], padding_mode=case["padding_mode"],
                                   dtype=x.dtype, **args)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            if direction == "fwd":
                def run():
                    with torch.no_grad():
                        out["y"] = conv(x)
                return run, lambda: (out["y"].numpy(),)
            xr = x.clone().requires_grad_(True)
            y = conv(xr)
            params = [xr, conv.weight, conv.bias]

            def run():
                out["g"] = torch.autograd.grad(y, params, gy, retain_graph=True)
            return run, lambda: tuple(t.numpy() for t in out["g"])
        if case["padding_mode"] != "zeros":
            raise Skip("aten.convolution_backward takes zero padding only")
        mask = [direction == "bwd_data", direction == "bwd_weight", False]
        cb = torch.ops.aten.convolution_backward
        stride, padding, dilation = list(case["stride"]), list(case["padding"]), list(case["dilation"])

        def run():
            out["g"] = cb(gy, x, w, None, stride, padding, dilation, False, [0, 0], case["groups"], mask)
        return run, lambda: (out["g"][0 if mask[0] else 1].numpy(),)


class NumpyPeer(Peer):
    name = "numpy"

    def info(self):
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return {"version": np.__version__, "blas": blas}

    def make(self, case, direction):
        from . import im2col
        x, w, b, gy = case_arrays(case)
        g = im2col.Geometry(x.shape, w.shape, case["stride"], case["padding"], case["dilation"], case["groups"],
                            case["padding_mode"])
        out = {}
        if direction == "fwd":
            def run():
                out["r"] = (im2col.forward(x, w, b, g)[0],)
        elif direction == "bwd":
            _, cols = im2col.forward(x, w, b, g)   # the forward pass keeps its columns

            def run():
                out["r"] = im2col.backward(gy, w, cols, g)
        elif direction == "bwd_data":
            def run():
                out["r"] = (im2col.backward_data(gy, w, g),)
        else:
            def run():
                out["r"] = (im2col.backward_weight(im2col.im2col(x, g), gy, g),)
        return run, lambda: out["r"]


class OnnxruntimePeer(Peer):
    """One Conv node (plus an explicit Pad node for reflect / replicate / circular
    padding); forward only, float32 only (the CPU provider has no double Conv)."""

    name = "onnxruntime"
    PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}

    def __init__(self, threads):
        super().__init__(threads)
        import onnxruntime
        self.ort = onnxruntime

    def info(self):
        return {"version": self.ort.__version__, "threads": self.threads}

    def model(self, case, w, b):
        from onnx import TensorProto, helper, numpy_helper
        ph, pw = case["padding"]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        nodes, conv_in, conv_pads = [], "x", [ph, pw, ph, pw]
        if case["padding_mode"] != "zeros" and (ph or pw):
            inits.append(numpy_helper.from_array(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), "pads"))
            nodes.append(helper.make_node("Pad", ["x", "pads"], ["xp"], mode=self.PAD_MODES[case["padding_mode"]]))
            conv_in, conv_pads = "xp", [0, 0, 0, 0]
        nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["y"], kernel_shape=list(case["kernel"]),
                                      pads=conv_pads, strides=list(case["stride"]),
                                      dilations=list(case["dilation"]), group=case["groups"]))
        shape = [case["N"], case["C"], case["H"], case["W"]]
        graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 9
        return model.SerializeToString()

    def make(self, case, direction):
        if direction != "fwd":
            raise Skip("onnxruntime is an inference engine: forward only")
        if case["dtype"] != "float32":
            raise Skip("onnxruntime's CPU Conv is float32 only")
        x, w, b, _ = case_arrays(case)
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = self.ort.InferenceSession(self.model(case, w, b), opts, providers=["CPUExecutionProvider"])
        feed = {"x": x}
        out = {}

        def run():
            out["y"] = sess.run(None, feed)[0]
        return run, lambda: (out["y"],)


class ConvgenOneThreadPeer(ConvgenPeer):
    """convgen on one thread (suite.PEER_THREADS): the reference for its scaling."""
    name = "convgen_1t"


class ConvgenFrozenPeer(ConvgenPeer):
    """convgen's module frozen (Conv2d.freeze): its weights packed by the first call and
    kept, as onnxruntime keeps its session's."""
    name = "convgen_frozen"
    frozen = True


PEERS = {p.name: p for p in (ConvgenPeer, TorchPeer, NumpyPeer, OnnxruntimePeer, ConvgenOneThreadPeer,
                             ConvgenFrozenPeer)}
assert tuple(PEERS) == NAMES

"""Plans and runs a convolution on validated, contiguous arrays.

A *plan* holds everything that depends only on the problem's shape: output size,
the padded phase-plane geometry, the taps' flat offsets and the kernel to run.
Plans are cached, so a repeated call costs a dictionary lookup.  Validation is
done before (convgen._validate); nothing here checks its arguments.
"""

import math
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import _dispatch, _geometry, _layout

PADDING_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
DTYPE_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
LANES = _dispatch.LANES              # elements of one vector, per dtype (as generated)
ITEMSIZE = {"f32": 4, "f64": 8}

# Bytes of input a kernel pass should keep in cache (a share of the 2 MB L2 per core):
# the reduction is split into blocks that fit, resuming from partial sums.
CACHE_BUDGET = 1 << 20


# Below this many multiply-adds a call runs on one thread: waking a second thread
# and joining it costs more than it saves (measured on the seed example's layer with
# AVX-512).  On AVX2 (AMD Zen 3, 2 cores shared with another job) a second thread paid
# from about 200K while the other job was idle (separate processes alternating, inference /
# module backward: the seed example's 442K 1.22x / 1.20x, its batch of two 1.44x / 1.41x;
# 8 -> 8 at 16x16 (147K) 0.86x / 0.97x) but lost while it ran (the seed example 0.67x /
# 0.81x, its batch of two 0.86x / 0.96x, minutes apart): the call then waits for a thread
# the other job has the core of.  So one thread, the steadier choice, on both ...
SMALL_WORK = 1 << 20
# ... unless it reads and writes this many values: depthwise layers do few
# multiply-adds per value (MobileNetV2's 960x7x7: 2 threads, forward 45 -> 38 us,
# backward 218 -> 153 us).
SMALL_VALUES = 1 << 16
# Below this many multiply-adds the tiles' work items go to the threads in one run each
# (static_schedule); above, dynamically, a few runs per thread, which balances better on
# a shared machine (ResNet's layers 3-6% faster than static).  Handing out an item costs
# a microsecond or so here: the seed example's tiles took 15 us on 2 threads handed out
# dynamically, 5.7 us static, 7.5 us on 1 thread.
STATIC_WORK = 1 << 23
# The dense forward and input gradient run in bands (BandSplit) from this many
# pixel chunks per thread: a band is a static share, off by at most a chunk (ResNet's
# 256 -> 256 at 14x14, 5 chunks: 0.93 -> 1.11 ms banded).
BAND_MIN_CHUNKS = 8
# ... and on at most this many threads.  Bands pay on these 2 cores, where reading a line
# the other core has just written costs most (ResNet's 3x3 at 56x56 and its strided 3x3
# 1.09x and 1.10x against the dynamic schedule, 8 alternating rounds).  On a 16-core Intel
# Xeon (a device machine lent for one session, 4-5 alternating rounds) the dynamic
# schedule ran DeepLab's ASPP 1.26x faster on 16 threads and 1.27x on 8 (its bands of two
# rows each: the edge rows skip a third of their taps), ResNet's 3x3 at 56x56 1.03x and
# 1.05x.  Between 2 and 8 threads nothing was measured: 4 splits the difference.
BAND_MAX_THREADS = 4
# ... and each thread packs its own copy of the channel-vector tile's weights where the
# copies take at most this many bytes in all: reading the half another core packed costs
# more than packing it again (2 threads, 21 alternating rounds: Inception's 5x5 1.038x,
# CIFAR's batch of 32 1.021x, ResNet's strided 3x3 and 128 -> 128 at 28x28 1.016x, its 3x3
# 1.003x; larger copies cost more than they save: ASPP's 2 x 4.6 MB 0.96x, DeepLab's
# 2 x 2.3 MB 1.00x).  (Measured on 2 cores only; the budget keeps many threads' copies
# within what 2 threads' took.)
PACK_COPY_BYTES = 2 << 20
# Dense weight gradients on the pixel-vectorised kernel extend grad_output onto the flat
# grid from this many multiply-adds per grad_output value (input channels x taps), and
# read its own rows below (see ForwardPlan).  Module-level weight gradient, 2 threads,
# flat -> rows: 3 -> 32 3x3 stride 2 at 224x224 0.281 -> 0.161 ms, 3 -> 64 3x3 at 224x224
# 1.45 -> 1.01, the seed example 14.6 -> 12.0 us (a batch of 8 of it 94 -> 59), 8 -> 8 3x3
# at 128x128 0.139 -> 0.111, 3 -> 64 5x5 (75) 0.229 -> 0.220; above: 16 -> 16 3x3 (144)
# 0.115 / 0.112, the 7x7 stem (147) 1.27 / 1.31, 64 -> 16 3x3 (576) 0.28 / 0.34.
WGRAD_FLAT_MIN_MACS = 100
# The channel-vectorised weight gradient runs in bands of output channels where they
# split evenly (see backward_params).  (2 threads, module backward, 11-21 alternating
# rounds against the dynamic schedule: ASPP 1.023-1.025x, DeepLab's rate-2 layer 1.019x,
# ResNet's 3x3 at 14x14 1.016x, Inception 1.015x, its strided 3x3 1.006-1.011x, the rest
# within 1%: its 1x1 0.98-0.994x.)
WGRAD_BANDS = True
# ... from this many vectors of output channels (its tile takes two at a time, so 24
# channels leave a quarter of its lanes idle).  (2 threads, module backward against the
# pixel-vectorised kernel, 10 alternating rounds each way: MobileNetV2's projections
# 144 -> 24 and 96 -> 24 at 56x56 1.24-1.26x and 1.19-1.24x, float64 144 -> 12 1.19x; 3x3
# layers to 24 channels: 32 at 56x56 1.06x, 16 at 112x112 1.10x, 64 at 28x28 0.96x, float64
# 32 -> 12 1.08x.  16 output channels, half the lanes idle, 0.92-1.0x, 8 0.77x.)
WGRAD_MIN_OUT_VECTORS = 1.5
# ... and from this many input channels (a group's), or, dense layers, this many columns
# (input channels x taps: first layers with large kernels).  (Module backward, 2 threads,
# 6 alternating rounds, against the pixel-vectorised kernel: ResNet's 7x7 stem
# 1.14-1.16x, float64 1.13x, a batch of 8 1.24x; YOLOv5's 6x6 stem 1.21x; 8 -> 32 at 32x32
# x 32 1.12x, float64 1.13x; 12 -> 48 5x5 at 28x28 x 16 1.10x; 36-54 columns 1.03-1.11x
# (4 -> 32 at 56x56 x 8, 6 -> 64 at 32x32 x 16, 2 -> 32 5x5 at 28x28 x 32, 4 -> 64 at
# 224x224).  Fewer columns lost or tied: 27, 3 -> 64 3x3 at 224x224, 0.94x, and 1.01-1.02x
# (MobileNetV2's 3 -> 32 stem, 3 -> 64 at 56x56); 9, 1 -> 32 at 112x112, 0.90x, MNIST's
# 1 -> 32 1.04x; so did a grouped layer of 8 channels a group, 0.75x.)
WGRAD_MIN_CHANNELS = 16
WGRAD_MIN_COLUMNS = 32
# Stride-1 1x1 layers without padding with fewer output channels than that compute their
# weight gradient as the transposed one of the 1x1 layer the other way round, which runs by
# channel (see ForwardPlan.wgrad_transposed), where their planes are the input itself;
# their training forwards read the input in place too.  (2 threads, on against off,
# separate processes alternating, 6-8 rounds: functional weight gradient, which pads no
# planes now, of MobileNetV2's 32 -> 16 at 112x112 0.251-0.261 -> 0.142-0.144 ms, 64 -> 16
# at 56x56 0.121 -> 0.081-0.084, 96 -> 20 at 28x28 0.077 -> 0.055; a module's training
# forward, which keeps padded planes for the pixel-vectorised kernel, 1.33-1.46x, its
# backward 0.95-1.01x.  Its backward from a plain copy of the input, transposed: 0.90-0.97x.)
WGRAD_TRANSPOSED = True
# Dense layers with too few output channels for that form (below WGRAD_MIN_OUT_VECTORS
# vectors) and not transposed sum their weight gradient vectorised over input channels
# instead (KernelSpec.icvec_tiles): 8 output channels' gradients broadcast against 3
# vectors of input channels at a time (or 3 against 8, _icvec_shape), each loaded once
# per pixel, where the pixel-vectorised kernel loads a vector of grad_output and of input
# per column and re-reads its segment from L2 for every tile.  Kernels larger than 1x1,
# from ICVEC_MIN_VECTORS vectors of input channels (16 in float32, 8 in float64) that
# leave at most CVEC_CHANNEL_WASTE of their lanes idle, from ICVEC_MIN_OUT_CHANNELS
# output channels.  (Module backward, 2 threads, 6-8 alternating rounds, against the
# pixel-vectorised kernel: CIFAR ResNet-20's stage 1, 16 at 32x32 x 128, 1.28x, x 8
# 1.32x; 16 at 56x56 1.18x; 32 -> 16 5x5 at 28x28 x 16 1.20x; 16 -> 8 at 8x8 x 32 1.27x;
# stride 2, 16 from 32x32 x 64, 1.21x; 7x7 16 at 28x28 1.25x; 32 -> 8 at 112x112 1.12x;
# 64 -> 16 at 56x56 1.12x; 48 -> 20 at 14x14 x 8 1.06x; 16 -> 4 1.13x; float64 32 -> 8,
# 16 -> 8, 8 -> 8 at 32x32 x 32 1.12x, 1.20x, 1.24x, 16 -> 4 and 8 -> 4 5x5 1.04x.  On
# 1-3 output channels the 8-row tile, mostly idle, ran 0.76-0.88x (16 -> 1, 32 -> 2, an
# RGB output layer 64 -> 3 at 128x128 0.79x, 32 -> 3 9x9 0.76x); the 3-row one runs 2
# and 3 of them 1.01-1.17x (64 -> 3 1.01x, 32 -> 3 at 64x64 x 8 1.04x, 32 -> 2 1.05x, the
# 9x9 1.17x), 1 0.98x, and 4-12 as the 8-row one, 0.98-1.09x.  On 1x1 layers one column a
# block of input channels leaves most of a tile idle: 16 -> 16 at 56x56 x 8 0.94x,
# 16 -> 8 at 112x112 0.64x.)
WGRAD_BY_INPUT = True
ICVEC_MIN_VECTORS = 1
ICVEC_MIN_OUT_CHANNELS = 2
# Its work items (see _icvec_chunking): windows of the input (every channel, pixel-major)
# of at most ICVEC_WINDOW_BYTES, which the item's tiles read while they stay in L2 (1 MB
# rather than 256 KB: 96 -> 4 and 96 -> 12 7x7 at 56x56 and 28x28, whose windows of 4
# and 7 rows carried 6 rows of halo, 1.10x and 1.06x; others even); at
# least ICVEC_ITEM_PIXELS output pixels an item on small maps (each item zeroes, fills and
# hands over a whole partial gradient); the partial sums of all items at most
# ICVEC_PARTIAL_BYTES.  Not where a window would hold more than ICVEC_WINDOW_RATIO times
# the flat-grid pixels of its rows (a stride's other phase planes beneath few rows).
ICVEC_WINDOW_BYTES = 1 << 20
ICVEC_ITEM_PIXELS = 1024
ICVEC_PARTIAL_BYTES = 4 << 20
ICVEC_WINDOW_RATIO = 5
# Stride-1 dense layers (not 1x1) that the by-channel form would take run this one
# instead where that form's one block of output channels would leave more than
# CVEC_CHANNEL_WASTE of it idle (24 of 32), or on maps of at most ICVEC_SMALL_MAP
# pixels whose batch has ICVEC_MIN_PIXELS_PER_WEIGHT pixels per weight (the partial
# sums of each work item are a whole weight gradient).  (Module backward, 2 threads, 6
# alternating rounds, against by channel: 24 output channels from 16 at 32x32 x 64,
# from 64 at 56x56 and from 32 at 28x28 x 8 1.15x, 1.11x, 1.14x; CIFAR ResNet-20's
# 32 at 16x16 and 64 at 8x8 x 128 1.04x and 1.08x, 32 at 14x14 x 16 1.13x, 32 -> 64 at
# 14x14 x 64 1.05x, 64 at 16x16 x 8 1.04x, 128 at 8x8 x 32 1.09x; float64 64 at 8x8 x 128
# 1.05x, 32 at 16x16 x 64 1.01x, 32 -> 12 at 28x28 x 8 1.04x.  Not chosen: 128 and
# 256 at 8x8 x 8 and x 32 (0.0035 pixels per weight) 0.83x and 0.95x; 64 at 32x32 x 32,
# 32 and 64 at 56x56, Inception's 5x5 at 35x35 0.95-0.99x; stride 2, 64 from 32x32,
# 0.83x.)
ICVEC_INSTEAD = True
ICVEC_SMALL_MAP = 256
ICVEC_MIN_PIXELS_PER_WEIGHT = 0.01


# Threads set by convgen.set_num_threads: process-wide, passed to every parallel loop
# (OpenMP's own setting is per calling thread).  A calling thread whose OpenMP setting
# differs from the start-up default (threadpoolctl's limits, omp_set_num_threads) keeps
# its own; until it is called, convgen follows OpenMP (OMP_NUM_THREADS) everywhere.
set_num_threads = _layout.set_num_threads
get_num_threads = _layout.get_num_threads
_OPENMP_DEFAULT = _layout.openmp_default_threads()


def threads_for(work, values=0):
    """OpenMP threads for a call doing `work` multiply-adds over `values` inputs and outputs."""
    return 1 if work < SMALL_WORK and values < SMALL_VALUES else get_num_threads()


# Dense layers run the channel-vector tile (over the input in blocks of channels,
# pixel-major) from this many input and output channels and this many output pixels
# (over the batch) per weight: its weights are packed each call.
# (Forward, 2 threads: ResNet's strided 3x3 at 28x28 1.18x faster than the pixel
# tiles, DeepLab's rate-2 layer 1.09x; at 14x14 and 7x7 packing costs more than it saves.)
CVEC_MIN_CHANNELS = 32
# ... or, forwards that keep nothing for a backward (inference) of kernels larger than 1x1,
# from this many input channels: their pixel tiles read padded planes that a training
# forward keeps for the weight gradient anyway, but an inference forward copies only for
# them.  (2 threads, no_grad module forwards, separate processes alternating, 6 rounds,
# against the pixel tiles: the digits example's 16 -> 32 on 32 8x8 maps 1.41x, CIFAR
# ResNet-20's strided 16 -> 32 on 128 32x32 maps 1.34x, 16 -> 32 on 8 28x28 maps 1.18x,
# 5x5 on 16 24x24 maps 1.15x, 16 -> 32 on 112x112 1.13x, 24 -> 64 on 56x56 1.05x, 20
# channels 1.00x.  Training forwards: the strided one 0.89x, so not there.)
CVEC_MIN_CHANNELS_INFERENCE = 16
CVEC_MIN_PIXELS = 512
# ... or, 1x1 layers, this many: the pixel tiles would waste a third of a 14x14 map, which
# the 14-pixel channel-vector tile divides exactly (2 threads: ResNet's 1024 -> 256 at 14x14
# forward 0.71 -> 0.56 ms, input gradient 0.68 -> 0.55; 256 -> 1024 0.52 -> 0.47 and
# 0.77 -> 0.64; a batch of four 7x7 maps, 512 -> 2048, input gradient 4.1 -> 2.9; on one
# 7x7 map it would be 1.25-1.75x slower).
CVEC_MIN_PIXELS_1X1 = 128
# ... or, from this many, where the flat grid's rows are this much wider than the map's:
# the pixel tiles would spend a quarter of their work on its scratch columns, which the
# row tiles skip (2 threads, side by side: Inception's 1x7 layers at 17x17, 128-192
# channels, forward 1.24-1.42x, backward 1.20-1.24x; 7x7 at 16x16 and 17x17 1.21-1.22x,
# 1.08-1.11x; 3x3 at rate 3 on 17x17 1.22x, 1.12x.  At 1.25x, 5x5 and 3x3 at rate 2 on 16x16,
# they were 0.90-0.95x.)
CVEC_WIDE_ROWS = 1.3
CVEC_MIN_PIXELS_WIDE = 256
# ... and forwards of 1x1 layers narrowing the channels from this many output channels,
# whatever their blocks' idle lanes (see ForwardPlan).  (2 threads, against the pixel
# tiles: MobileNetV2's projections 144 -> 24 and 96 -> 24 at 56x56 1.69x and 1.54x,
# 240 -> 40 at 28x28 1.38x, 144 -> 16 1.62x, 64 -> 24 and 64 -> 16 1.10-1.14x; at 8 output
# channels 0.90-1.38x, so not below 16.)
CVEC_NARROW_MIN_OUT = 16
# ... and where its blocks of output channels compute at most this share more than the
# channels there are (Inception's 5x5 input gradient: 48 channels in two blocks of 32
# ran 1.3x slower than the pixel tiles).
CVEC_CHANNEL_WASTE = 1.2
# Bytes of input a pass of the channel-vector tile takes at once (a block of images):
# its tiles read a few rows of each block of channels, so the copy need not fit in L2,
# and fewer, larger passes balance better over threads (CIFAR's batch of 32 at 4 MB
# rather than CACHE_BUDGET: forward 4%, input gradient 14% faster).
CVEC_IMAGE_BUDGET = 4 << 20
# ... or, on fewer output pixels (from PACK_BLOCK_MIN_PIXELS, kernels larger than 1x1),
# where one block of output channels' packed weights takes at most PACK_BLOCK_BYTES:
# each work item then packs a block itself, which stays in its core's L2 while its
# tiles run over every image (see _run_block_packed), rather than pack_weights writing
# every packed weight out of cache for the tiles to read back.  (Forward, 2 threads,
# against the pixel tiles, separate processes alternating: ResNet's 3x3 256 at 14x14
# 1.15-1.21x, 128 at 14x14 1.10-1.20x, its strided 256 at 28x28 1.18x, 512 at 7x7 in
# batches of 2-4 1.20-1.29x, AlexNet's 384 at 13x13 1.28x, 5x5 64 at 14x14 1.35x, 192 at
# 12x12 1.11x, at 17x17 0.97-1.06x; a training forward, which also keeps the planes,
# 1.03-1.15x.  On a single 7x7 or 8x8 map, 0.72-0.99x, and 1x1 layers 0.80-0.84x: each
# item reads its block from L3 before its multiply-adds start, which the pixel tiles
# overlap with theirs.  Neither the tiles prefetching the thread's next block into L2
# (0.99-1.015x on ResNet's 512 at 7x7) nor a pass per block of channels, each packed into
# L1 just before its tiles (0.69-0.87x on 7x7 and 8x8 maps), recovered them.)
PACK_BLOCK_BYTES = 1 << 20
PACK_BLOCK_MIN_PIXELS = 80
# ... but on AVX2, forwards that keep nothing for a backward (inference) from this many:
# there the pixel tiles (12 accumulators) lose more to a small map's scratch columns
# than the packing costs.  (AMD Zen 3, 2 threads, no_grad module forwards against the
# pixel tiles, separate processes alternating, 6-8 rounds: ResNet's 3x3 512 at 7x7
# 1.06x, 256 at 7x7 1.15x, 512 at 8x8 1.12-1.13x, 5x5 128 at 7x7 1.29x, stride-2 256 -> 512
# to 7x7 1.13-1.15x, 512 and 384 at 6x6 1.07-1.14x, 64 at 8x8 1.19x; float64 512 at 7x7
# 1.00x; 512 at 4x4 0.96x.  Training forwards were mixed (0.96-1.13x) and input
# gradients lost (module backward 0.85-0.98x, a 5x5 1.03x), so they keep
# PACK_BLOCK_MIN_PIXELS; AVX-512 was not measured.)
PACK_BLOCK_MIN_PIXELS_INFERENCE = 32 if _dispatch.TARGET == "avx2" else PACK_BLOCK_MIN_PIXELS
# ... and, forward only, on larger maps whose weights hold at least this many times as
# many values as their input's blocked copy (2 threads, against pack_weights, separate
# processes alternating: ResNet's 3x3 256 at 28x28 1.05-1.06x, at rate 2 1.06-1.07x, 512 at
# 28x28 1.06-1.08x, float64 256 1.01-1.03x; 128 at 28x28 (1.3 times as many) 1.0x, ASPP
# (1.1) 1.02x, 128 at 56x56 with stride 2 (0.3) 0.94x; 1x1 expansions at 14x14: MobileNetV2's
# 96 -> 576 1.12-1.13x, ResNet's 256 -> 1024 1.04x, 160 -> 960 and float64 0.99x, against
# 0.98x for two layers the rule leaves alone.  The input gradient's, for the 3x3 layers
# against grad_output's copy: 0.99-1.03x, so not there.)
PACK_BLOCK_WEIGHT_RATIO = 2
PACK_BLOCKS = True
# A frozen module (Conv2d.freeze) keeps its packed weights for this many plans at most
# (an input shape's inference forward and its input gradient count one each): each
# takes as much memory as the weights.
FROZEN_PACKS = 4
# Patch embeddings (windows that do not overlap, no padding) run as 1x1 layers over their
# windows gathered as channels from this many taps (see patch_pointwise).  (2 threads,
# against the generic kernel on its phase planes, separate processes alternating, 3 -> 768
# 16x16 at stride 16 on 224x224: forward 1.09x, backward 2.6x, a batch of 4 1.25x, 3.0x;
# 32x32: 1.0x, 6.4x.  Smaller windows, module backward, 5-6 rounds: ConvNeXt's 4x4 stem
# 1.51x, a batch of 4 1.21x, Swin's (to 128) 1.14x, 4x4 from 8 channels 1.40x, 3 -> 384 and
# 768 8x8 1.61x and 2.04x, 14x14 to 384, 768 and DINOv2's 1024 1.66x, 1.42x and 1.50x, a 4x4
# stem to 512 1.57x; 3x3 windows 0.98x, so not from 9.  A training step, forward and
# backward: ConvNeXt's stem 1.43x, the 4x4 stem to 512 1.52x, 8x8 to 384 1.44x, DINOv2's
# 1.39x; its forward alone 0.82-1.08x.)
PATCH_MIN_TAPS = 16
# ... but a forward that keeps nothing for a weight gradient (inference: the route of the
# backward's planes does not bind it) only from this many: against the generic kernel, those
# smaller windows' forwards were mixed (ConvNeXt's 4x4 stem 1.06x, a batch of 4 1.20x, 8x8 to
# 384 and 768 1.14x and 1.07x, but a 4x4 stem to 512 0.87x, 14x14 to 768 0.93x, DINOv2's
# 0.91x).  On AVX2, since the 1x1 layers read in place prefetch their input
# (codegen.context.IN_PLACE_PREFETCH_CHANNELS) and run tiles inner on large inputs
# (IN_PLACE_TILES_INNER), from 64 (AMD Zen 3, 2 threads, inference forwards, separate
# processes alternating, 8 rounds, median / fastest round, against 256: 8x8 to 384 and 768
# 1.24x / 1.19x and 1.17x / 1.13x, 14x14 to 768 1.09x / 1.05x, DINOv2's 1.09x / 1.07x; from
# 16 the 4x4 stems were mixed: ConvNeXt's 1.20x / 1.08x, a batch of 4 0.81x / 1.02x, to 512
# 1.05x / 1.05x).
PATCH_MIN_TAPS_INFERENCE = 64 if _dispatch.TARGET == "avx2" else 256
# Grouped layers with wide groups (at least 2 vectors of output channels and 16 input
# channels each, their blocks of output channels at most CVEC_CHANNEL_WASTE idle) sum
# their weight gradient by output channel (see ForwardPlan).  (2 threads, side by side,
# module backward: two groups of 64 channels at 27x27 and 56x56 1.20x, a batch of 8 1.17x;
# 9 groups of 48 channels at 14x14 1.11x but 4 of them at 28x28 0.93x, a third of their
# blocks idle, hence the waste bound.)
WGRAD_GROUPWISE = True
# Grouped layers whose groups, each a dense layer of its own, would run the channel-vector
# tile run the forward a group at a time as such (the grouped kernel's pixel tiles keep
# ResNeXt's narrow groups); so does the input gradient where the groups also have at
# least GROUPWISE_INPUT_MIN_CHANNELS input channels.  (2 threads, side by side: AlexNet's
# two groups of 64 at 27x27 forward 1.07x, input gradient 1.13x; two of 128 at 14x14
# 1.28x, 1.33x; 192 -> 384 in two groups at 13x13 1.41x, 1.16x; a batch of 4 1.05x, 1.17x;
# three groups of 32 forward 1.07x but input gradient 0.85x; four groups of 16, no
# channel-vector tile, 0.55x.)
GROUPWISE = True
GROUPWISE_INPUT_MIN_CHANNELS = 64
# Depthwise weight gradients run by blocks of channels on maps of up to this many output
# pixels (2 threads, 3x3: 7x7 maps 2.3x faster than the per-channel rows, 14x14 1.25x,
# 28x28 equal, 56x56 0.85x; 5x5 at 7x7 2.4x).
WGRAD_CHANNEL_BLOCK_PIXELS = 256
# 1x1 layers at stride 1 without padding copy their input into the tile's layout a
# run of pixel chunks at a time (see ForwardPlan.panels).
PANELS = True
# A work item's panel holds this many bytes of input (a run of pixel chunks, every
# channel), as long as the call still has PANEL_MIN_ITEMS work items: the copy then reads
# rows of a few hundred pixels rather than one chunk's (2 threads: ResNet's 256 -> 64 at
# 56x56 0.62 -> 0.51 ms, a batch of 8 of it 7.0 -> 3.8 ms; 64 -> 256's input gradient
# 0.61 -> 0.53).  On AVX2, float32's hold 128 KB, as many values as float64's 256 KB
# (Zen 3, 2 threads, module calls in process, alternating, 7 rounds, median / fastest
# round, against 256 KB, inference: 512 -> 512, 1024 -> 256 and 768 -> 384 at 32x32 1.14x /
# 1.13x, 1.10x / 1.10x and 1.09x / 1.12x, a batch of 2 of 512 -> 512 at 28x28 1.14x /
# 1.09x, 128 -> 256 at 64x64 1.13x / 1.03x, batches of 8 of ResNet's 256 -> 64 at 56x56 and
# 512 -> 128 at 28x28 1.04x / 1.05x and 1.03x / 1.10x, 96 -> 96 at 112x112 1.04x / 1.05x;
# training forwards 1.02-1.15x but a batch of 8 of 1024 -> 256 at 14x14 0.95x / 1.12x;
# 4 of 256 -> 256 at 32x32 0.95x / 1.01x.  64 and 96 KB ran about as 128.  Float64 at
# 128 KB: 0.85-1.00x.)
PANEL_BUDGET = {"f32": (128 if _dispatch.TARGET == "avx2" else 256) << 10, "f64": 256 << 10}
PANEL_MIN_ITEMS = 8
# On AVX2, 1x1 layers run their channel tiles inner (ForwardPlan.tiles_inner), and so
# through panels where those apply, whatever their channel counts, not only where they
# reduce over more channels than they output: a channel tile's weights, 16 output
# channels of every input channel, are at most 32 KB for 512 channels, so they stay near
# while a panel's pixels stay in L2, where a channel tile's sweep over every pixel chunk
# read the whole input again from L3 for each tile.  (AMD Zen 3, 2 threads, module calls
# in process, alternating, 7-9 rounds, median / fastest round, inference: 512 -> 512,
# 256 -> 256 and 256 -> 1024 at 32x32 1.07x / 1.07x, 1.10x / 1.09x and 1.05x / 1.06x,
# 128 -> 256 and 64 -> 256 at 64x64 1.04x / 1.09x and 1.11x / 1.07x, a batch of 8 of
# ResNet's 128 -> 512 at 28x28 1.09x / 1.09x, 96 -> 96 at 112x112 1.11x / 1.12x, float64
# 128 -> 256 at 32x32 1.22x / 1.33x and 64 -> 256 at 56x56 1.12x / 1.11x; training
# forwards 512 -> 512 at 32x32 1.15x / 1.10x, batches of 8 of 128 -> 512 at 28x28 and
# 64 -> 256 at 56x56 1.07x / 1.09x and 1.08x / 1.07x; the rest, those read in place among
# them, 0.91-1.03x where median and fastest round disagree (float64 256 -> 1024 at 14x14
# 0.91x / 1.00x, then 0.99x / 1.00x in a second run); backwards 0.99-1.14x.)
TILES_INNER_ALL_POINTWISE = _dispatch.TARGET == "avx2"
# A training forward whose kernels read no planes (1x1 layers in place or through panels)
# keeps the planes of a weight gradient by the channel-vector tiles (wgrad_reads_input) as
# a copy of the input's rows into rows x_chan long (_layout.copy_rows), not through
# pad_phase: their rows are the input's own, and pad_phase's loop over each 7- or 14-pixel
# row and its infinity check cost 3-10x the copy on 7x7 and 14x14 maps.  Nothing is
# checked for infinities, as where the planes are the input itself (those tiles multiply
# real pixels only).  (AMD Zen 3, 2 threads, module training steps, in process
# alternating, 7 rounds, forward median / fastest round: batches of 8 of ResNet's
# 1024 -> 256 at 14x14 1.37x / 1.20x and 2048 -> 512 at 7x7 1.22x / 1.18x; one image of
# 1024 -> 256 at 14x14 1.12x / 1.11x, 2048 -> 512 at 7x7 1.08x / 1.11x, 64 -> 256 at 56x56
# 1.11x / 1.11x, MobileNetV2's 160 -> 960 at 7x7 1.07x / 1.13x and 32 -> 16 at 112x112
# 1.07x / 1.08x; float64 128 -> 512 at 28x28 1.19x / 1.10x; the rest 0.97-1.04x by one
# or the other.  Backwards read the same planes as before: 0.90-1.09x, noise.  Rows H * W
# long, the input's own layout, lost 0.76x on 4 images of 96 -> 24 at 56x56's backward:
# planes 12544 bytes apart start at only 16 offsets within 4 KB, see ForwardPlan.plane_len.)
COPY_KEPT_ROWS = True
# ... on every thread where the planes hold more than this (a 2-thread copy of 400 KB 9
# against 12-14 us on one, of 200 KB 5.7-7.3 against 5.1-5.4 us).
COPY_MIN_BYTES = 256 << 10
# Forwards of stride-1 1x1 layers without padding run the pixel tiles over the input in
# place -- no copy, no packed weights, each thread a static run of pixel chunks with every
# channel tile over each; a training forward keeps the input itself for the weight
# gradient (ForwardPlan.wgrad_reads_input, the drop-in's) or padded planes as the other
# paths do (a module's: training forwards 0.99-1.35x faster than through the panels or
# the padded planes, 2 threads, 8 rounds) -- where the channel-vector tile would not
# run, or for at most IN_PLACE_MAX_OUT output channels, or up to IN_PLACE_MAX_WORK
# multiply-adds.  (2 threads, module forward, in place against not, separate processes
# alternating, 6-8 rounds, NumPy's own inputs.  MobileNetV2's projections: 32 -> 16 at
# 112x112 1.62-1.77x, 96 -> 24 and 144 -> 24 at 56x56 1.42-1.46x and 1.27-1.36x (float64
# 1.13-1.15x, a batch of 4 1.19x), 192 -> 32 at 28x28 1.17-1.38x, 64 -> 32 at 56x56 1.35x,
# 960 -> 160 and 960 -> 320 at 7x7 1.40x and 1.16x; 1280 -> 256 at 7x7 1.24x.  Where the
# pixel tiles ran from a padded copy: 16 -> 16 at 56x56 1.65-1.71x, 3 -> 16 1.25x,
# MobileNetV2's expansions 16 -> 96 at 112x112 1.18x (0.91x in a run under load),
# 24 -> 144 at 56x56 1.10-1.13x, 32 -> 192 at 28x28 1.07x, 160 -> 960 at 7x7 1.03-1.07x.
# Up to 2^24: 64 -> 64 at 56x56 and 128 -> 128 at 28x28 1.04-1.14x, 256 -> 256 at 14x14
# 1.07x, 512 -> 512 at 7x7 1.01x, 128 -> 64 at 28x28 1.17x, 384 -> 64 and 576 -> 96 at
# 14x14 1.22-1.28x and 1.06x.  Above, with more than 32 output channels, mixed: 2^24.6
# multiply-adds 0.89-1.09x (256 -> 512 at 14x14 0.89x, a batch of 2 of 128 -> 128 at
# 28x28 1.09x); 2^25.6 0.85-1.08x (ResNet's 256 -> 64 at 56x56 0.88-0.91x -- its vector
# loads straddle cache lines unless the input is 64-byte aligned, then 1.06x --
# 1024 -> 256 at 14x14 0.86-0.91x, 512 -> 128 at 28x28 0.80-0.85x, 2048 -> 512 at 7x7
# 1.01-1.07x, 64 -> 256 at 56x56 0.93-1.08x).)
IN_PLACE = True
IN_PLACE_MAX_OUT = 32
IN_PLACE_MAX_WORK = 1 << 24
# ... or on maps of at most IN_PLACE_MAX_PIXELS pixels in batches of at most
# IN_PLACE_MAX_BATCH_PIXELS (one map's are too few for the channel-vector tile: 49, 64 and
# 100 pixels take it only in batches).  (As above, in batches of 2-8, against the
# channel-vector tile: 960 -> 160 and 1024 -> 256 at 7x7 1.30x and 1.03x, 512 -> 2048 at 7x7
# 1.02x, 2048 -> 512 1.24x; 512 -> 512 at 8x8 1.36x and at 10x10 1.28x.  At 14x14, mixed:
# 0.89-1.08x; in larger batches, 16 of 1024 -> 256 at 7x7 0.98x, 32 of 2048 -> 512 and of
# 512 -> 2048 0.91x, 32 of 512 -> 512 at 8x8 1.03x, so not there.)
IN_PLACE_MAX_PIXELS = 100
IN_PLACE_MAX_BATCH_PIXELS = 400
# ... and on AVX2, inference forwards (inference_plan) on maps of at most this many pixels
# in batches of any size.  (AMD Zen 3, 2 threads, module calls, separate processes
# alternating, 6 rounds, median / fastest round, against the channel-vector tile's panels:
# batches of 2 and 4 of ResNet's 1024 -> 256 at 14x14 1.19x / 1.16x and 1.12x / 1.11x, 2 of
# 512 -> 512 and 2048 -> 512 1.51x / 1.45x and 1.20x / 1.19x, 4 of 256 -> 1024 1.07x / 1.02x,
# 4 of ViT-S/16's patch embedding (768 -> 384) 1.08x / 1.08x, MobileNetV2's 96 -> 576 and
# 576 -> 96 in batches of 4 and 2 1.04x / 1.05x and 1.24x / 1.16x, float64 1.11x / 1.05x;
# 8 of 2048 -> 512 at 7x7 1.00x.  Training forwards were mixed, 0.80-1.37x, MobileNetV2's
# batches losing with their backwards, 0.88-0.91x, so they keep the rules above.)
IN_PLACE_INFERENCE_MAX_PIXELS = 196 if _dispatch.TARGET == "avx2" else 0
# ... and, beyond all of those, maps of at most this many pixels in all (one 14x14 map), with
# each channel tile's run of pixel chunks innermost (plan's last field false): their few
# chunks then reuse the tile's weights from cache, where the channel-vector tile would pack
# every weight each call.  (2 threads, module calls, against the channel-vector tile, 5-6
# alternating rounds: ResNet's 1024 -> 256, 256 -> 1024, 1024 -> 512 and 512 -> 512 at 14x14
# inference forward 1.28x, 1.17x, 1.16x and 1.12x, training forward 1.17x, 1.02x and 1.17x,
# backward 0.98-1.13x; 1024 -> 256 at 12x12 1.40x; ViT-B's patch embedding (768 -> 768 at
# 14x14 as a 1x1 layer) 1.03x.  A batch of two of 1024 -> 256 at 14x14 1.0x and 28x28 maps
# 0.70-0.94x, so not there.  With the chunks outermost instead, as the rules above run them: 1024 -> 256
# at 14x14 0.93x, 256 -> 1024 0.91x; the other way round, the rules above would lose:
# 256 -> 32 at 56x56 0.54x, 384 -> 64 at 14x14 0.94x.)
IN_PLACE_CHUNKS_INNER_PIXELS = 196
# Under the rules before that one, layers whose weights outweigh their input (more output
# channels than input pixels) also run each channel tile's chunks innermost: the threads
# then split the channel tiles, each reading its own tiles' weights once, rather than the
# chunks, each reading every weight.  (2 threads, inference forwards, 10-14 alternating
# rounds, against the chunks outermost: 512 -> 512 at 10x10 1.14-1.16x, MobileNetV2's
# 96 -> 576 and 64 -> 384 at 14x14 1.05-1.06x and 1.03-1.06x, their module backwards
# 1.00x and 1.02x; layers of one chunk an image (7x7 and 8x8 maps, batches of two 7x7 maps)
# 0.99-1.01x.)
IN_PLACE_WEIGHT_MAJOR = True
# ... and, above, where the input starts on a cache line and so does each of its planes (its
# loads then never straddle two lines), and the input and output hold at most this many
# bytes.  (As above, inputs 64-byte aligned, as PyTorch's tensors are: 256 -> 64 at 56x56
# 1.05-1.09x, 128 -> 128 1.23x, 64 -> 256 1.21x; 512 -> 128 and 256 -> 256 at 28x28 1.02x and
# 1.03x, 128 -> 512 1.07x.  Beyond: a batch of two of 256 -> 64 at 56x56 (8 MB) 0.99x, of 8
# 0.92x, 64 -> 128 at 112x112 (9.6 MB) 0.93x, but a batch of two of 64 -> 256 at 56x56 (8 MB)
# 1.14x.  ResNet's 1024 -> 256 at 14x14, whose 784-byte planes start mid-line, 0.89x.)
IN_PLACE_ALIGNED_BYTES = 6 << 20
# ... where the input itself starts on a cache line, on AVX-512 only: AVX2's 32-byte loads
# straddle a line half as often, and its pixel tiles then beat the panels on inputs that
# start anywhere.  (AMD Zen 3, 2 threads, in-process alternating, 10-16 rounds, NumPy's
# inputs, in place against the panels: ResNet's 256 -> 64 at 56x56 1.18-1.22x (module
# backward 1.11x), 64 -> 256 1.29-1.38x (backward 1.02x), 512 -> 128 at 28x28 1.03x,
# 128 -> 512 0.88-0.99x, 256 -> 1024 1.01x.)
IN_PLACE_ANY_ADDRESS = _dispatch.VECTOR_BYTES < 64
# ... and where the input starts off a cache line but every plane starts the same way (a
# plane a whole number of lines), without a leftover, the chunks start at the line before
# each plane (up to a line of pixels before it: the same page, so readable), and their
# loads never straddle two lines.  (AVX2, ResNet's 256 -> 64 at 56x56 from NumPy's arrays,
# 16 or 48 bytes past a line: in-process 0.79 ms against 0.70 ms from an aligned copy.)
IN_PLACE_SHIFT = True
# ... and on AVX2, where each channel tile runs its run of chunks (the rules for small maps
# and for weights outweighing the input: chunks inner), the input outgrows a core's L2 (this
# many bytes: Zen 3's 512 KB; those rules were measured on the AVX-512 machine's 2 MB, and
# stay there) and a plane holds at least IN_PLACE_TILES_INNER_MIN_CHUNKS chunks, every
# channel tile runs over a chunk in turn instead (tiles inner): the chunk's channels stay in
# cache across the tiles rather than each tile re-reading the whole input from L3.  (AMD Zen
# 3, 2 threads, the tiles prefetching (codegen.context.IN_PLACE_PREFETCH_CHANNELS), in-process
# kernel calls, 15 rounds alternating, against chunks inner: ResNet's 1024 -> 256 and
# 2048 -> 512 at 14x14 1.06-1.12x and 1.08x, 2048 -> 512 at 10x10 1.04-1.08x, ViT-B/16's
# patch embedding (768 -> 768 at 14x14 as a 1x1 layer) 0.97-1.07x, float64 2048 -> 512 at 7x7
# 1.03-1.05x; module calls, separate processes alternating, 6 rounds, inference / training
# forward: 1024 -> 256 at 14x14 1.10x / 1.10x, 2048 -> 512 at 10x10 1.10x / 1.09x, ViT-B/16's
# 1.05x / 1.00x, float64 2048 -> 512 at 7x7 and a batch of 4 of 1024 -> 256 1.06x / 1.09x
# and 1.11x / 1.06x.  Inputs that fit L2 lose: 256 -> 1024 and MobileNetV2's 96 -> 576 at
# 14x14 0.91-0.95x; so do 7x7 float32 maps, 2-3 chunks, 0.91-0.99x.  Reductions in passes
# over blocks of channels, each chunk's block in L1, partial sums between (_run_in_place's
# rblock; before the prefetches they were 1.3-1.5x faster than chunks inner): 0.86-0.95x
# against one pass now.)
IN_PLACE_TILES_INNER = _dispatch.TARGET == "avx2"
IN_PLACE_TILES_INNER_INPUT_BYTES = 512 << 10
IN_PLACE_TILES_INNER_MIN_CHUNKS = 4
# On AVX2, none of those rules reads in place an input whose planes alias in L2: planes a
# whole number of 4 KB pages, and more channels than L2's ways times the planes' distinct
# offsets within one way (IN_PLACE_L2_WAY_BYTES / gcd(plane bytes, it)).  A pixel chunk's
# lines in every channel, which each channel tile re-reads, then fall into a few of L2's sets
# (and all in the same of L1's), do not fit, and come from L3.  (AMD Zen 3, 512 KB 8-way L2,
# 2 threads, inference forwards, in-process alternating, 7-9 rounds, in place against not:
# 32x32 maps (4 KB planes, 16 offsets: 128 channels) 192 -> 384, 256 -> 256, 256 -> 1024,
# 512 -> 512, 768 -> 384, 768 -> 768 and 1024 -> 256 0.60-0.75x, 64x64 (16 KB, 4: 32)
# 64 -> 256, 128 -> 128, 128 -> 256 and 256 -> 64 0.56-0.59x; float64 at 32x32 (8 KB, 8:
# 64) 128 -> 256 and 256 -> 256 0.53-0.77x.  Planes off whole pages measured mixed, so
# kept: 16x16 maps (1 KB) 1024 -> 256 and 1024 -> 588 0.90-0.91x but 384 -> 1536, 512 -> 512,
# 588 -> 1024 (DINOv2's patch embedding), 768 -> 768 and 1536 -> 384 1.10-1.29x, float64's
# (2 KB) 0.89-1.13x; 56x56, 28x28 and 112x112 maps 1.04-1.39x (but MobileNetV2's 16 -> 96
# at 112x112 0.91x), 8x8 0.96-1.01x.)
IN_PLACE_ALIASING = _dispatch.TARGET == "avx2"
IN_PLACE_L2_WAY_BYTES = 64 << 10
IN_PLACE_L2_WAYS = 8


def _plane_offsets(p: "Problem", span):
    """How many different offsets within `span` bytes (a power of two) the input's channel
    planes start at, each plane H * W values after the last."""
    return span // math.gcd(p.H * p.W * ITEMSIZE[p.dtype], span)


def _planes_alias(p: "Problem"):
    """Whether a 1x1 layer's input planes alias in L2 when read in place (IN_PLACE_ALIASING):
    whole 4 KB pages (one offset within a page), and more channels than L2 holds lines at
    their offsets within a way."""
    return (IN_PLACE_ALIASING and _plane_offsets(p, 4096) == 1
            and p.C // p.groups > IN_PLACE_L2_WAYS * _plane_offsets(p, IN_PLACE_L2_WAY_BYTES))


# Their input gradients run as such forwards of grad_output (input_gradient_as_forward),
# the weight read transposed (run's weight_transposed), where it holds at most this share
# of the values read and written.  (Module backward, input and weight gradients, in place
# against not, 6 rounds, from a transposed copy of the weight: MobileNetV2's 32 -> 16 at
# 112x112 1.22x, 96 -> 24 and 144 -> 24 at 56x56 1.10x and 1.01x, 16 -> 96 at 112x112 and
# 24 -> 144 at 56x56 1.34x and 1.40x, 64 -> 64 at 56x56 1.18x; reading it transposed
# instead, 0.995-1.09x faster again.  Larger weights, read transposed, 6 rounds: 160 -> 960
# and 320 -> 1280 at 7x7 1.30x and 1.18x, 960 -> 160 1.01x, but ResNet's 2048 -> 512 and
# 512 -> 2048 at 7x7 0.92x and 0.94x and 512 -> 512 at 10x10 0.81x, so not there.)
INPUT_AS_FORWARD_WEIGHT_SHARE = 0.25
# Elsewhere they run as such forwards from a transposed copy of the weight (_layout.transpose),
# where it is at most this many bytes.  (AMD Zen 3, 2 threads, functional input gradient
# against the input-gradient kernels, separate processes, 5 rounds, median / fastest round:
# float32 MobileNetV2's 320 -> 1280 and 960 -> 160 at 7x7 1.22x / 1.24x and 1.20x / 1.20x,
# ResNet's 512 -> 2048 and 2048 -> 512 at 7x7 1.24x / 1.26x and 1.27x / 1.29x, 1024 -> 256
# at 14x14 1.12x / 1.12x, 128 -> 512 and 512 -> 128 at 28x28 1.19x / 1.16x and 1.04x /
# 1.03x, batches of 8 of 512 -> 2048 at 7x7 1.20x / 1.15x and of 4 of 1024 -> 256 at 14x14
# 1.00x / 1.02x; float64 320 -> 1280 at 7x7 1.04x / 1.07x, 256 -> 1024 at 14x14 1.11x /
# 1.12x, 128 -> 512 at 28x28 1.06x / 1.04x; but float64's 8 MB weights of 512 -> 2048 and
# 2048 -> 512 at 7x7 mixed, 0.82x / 0.88x and 1.16x / 1.20x, so not there.  Not measured
# on AVX-512: none there.)
INPUT_AS_FORWARD_COPY_BYTES = 4 << 20 if _dispatch.TARGET == "avx2" else 0
# ... and where grad_output's planes start at least this many different offsets within
# 4 KB (4096 / gcd(plane bytes, 4096)).  (float32, same measurements, that forward reading
# in place: 32x32 maps 0.58x and 0.65x (1 offset), 16x16 0.86-0.91x but 512 -> 512 1.14x (4),
# 8x8 1.08x and 0.94x (16); 28x28 and 12x12 (64) 1.05-1.31x, 10x10 and 14x14 (256)
# 1.10-1.29x.  Again where it no longer reads such planes in place (IN_PLACE_ALIASING), 6
# rounds: 32x32 0.80-0.94x, 8x8 0.77-0.88x, 16x16 0.92-1.09x.  Why those maps lose with
# the channel-vector tile too is not settled.)
INPUT_AS_FORWARD_MIN_OFFSETS = 64
# ... and on AVX2, where the forward runs in place only by the rule for inputs at any
# address (IN_PLACE_ANY_ADDRESS, in_place_aligned), where the weight holds at most this
# share.  (AMD Zen 3, 2 threads, module backward, separate processes, 14 alternating
# rounds, median / fastest round: ResNet's 256 -> 64 at 56x56 (share 0.016) 1.10x / 1.06x;
# at 0.13 no gain or a loss: 512 -> 128 at 28x28 1.00x / 0.99x, 128 -> 512 0.89x / 0.90x.)
INPUT_AS_FORWARD_ALIGNED_SHARE = 0.05
# ... on maps whose pixel chunks compute at most this share more pixels than there are
# (a 7x7 map: 64 for 49; not the 1x1 maps of squeeze-and-excitation blocks, whose
# channel-vector tiles fill every lane).
IN_PLACE_PIXEL_WASTE = 1.35
# Their chunks stop at most this many pixels short of a plane's end where that costs less
# (Kernel.pick_tile_leftover, each pixel past them priced as this many of a tile's): the
# kernels' _leftover computes those as dot products over the channels, each tile's right
# after its last chunk, from a copy of them with the channels contiguous.  A 7x7 map's 49
# pixels then take a chunk of 48 and a dot product rather than a chunk of 64.  (2 threads,
# module forward, against IN_PLACE_LEFTOVER 0, separate processes alternating, 6-8 rounds:
# ResNet's 2048 -> 512 and 512 -> 2048 at 7x7 1.25-1.30x and 1.16x (float64 1.20x), a batch
# of two of 1024 -> 256 1.25x, MobileNetV2's 320 -> 1280, 960 -> 160 and 160 -> 960 at 7x7
# 1.28-1.32x, 1.17x and 1.26x, its 14x14 layers (384 -> 64, 64 -> 384, 576 -> 96, 96 -> 576)
# 1.09-1.23x; 512 -> 512 at 10x10 1.18-1.25x; Inception's 768 -> 192 at 17x17 1.02x; small
# layers (64 -> 64 at 7x7, 64 -> 256 at 10x10) 1.0-1.07x.)
IN_PLACE_LEFTOVER = 4
IN_PLACE_LEFTOVER_PRICE = 2
# Its tiles start at each output row where that computes less than this share of the
# flat grid's rows, whose scratch columns they skip (wide paddings: DeepLab's ASPP
# computes 42 of every 45 pixels); elsewhere they run along the flat grid.
ROW_TILE_SAVING = 1.0
# What a row tile pays per tap and row besides its pixels, in pixels (its weight loads
# and loop; see _row_tiling).
ROW_TILE_OVERHEAD = 2
# A row tile holding fewer accumulators than this waits on its multiply-adds' latency
# (two FMA units with 4 cycles' latency need 8 sums in flight), so it is priced as the
# narrowest tile that holds this many (_row_tiling: row pairs, which hold two rows'
# sums, are not).
CVEC_MIN_ACCUMULATORS = 8
# Forward row tiles of a tail's pixels or fewer run two rows at once where both rows
# skip the same taps (see _row_pairs).
ROW_PAIRS = True
# ... so such a tile pays half of ROW_TILE_OVERHEAD per row (its weight loads feed both
# rows), plus this much for its narrower register tile (see _run_price).
ROW_PAIR_PRICE = 0.25
# Rows that _cvec_layout leaves on the flat grid run row tiles instead where, priced by
# _row_tiling (skipping the taps that read only padding; where the kernel has row pairs, the
# float32 forward's, narrow tiles as pairs), they pay at most this share of the flat grid's
# tiles (_priced_row_tiling).  The price runs 4-8% optimistic, so only clear savings switch: small maps with wide
# padding, whose flat grids compute up to half their pixels in scratch columns and every
# tap through padding.  (2 threads, 6 alternating rounds, against the flat grid.
# Forward, predicted / measured: 5x5 at 9x9 and 17x17 1.30 / 1.20x and 1.21 / 1.16x, 3x3
# at rate 2 on 10x10 and 16x16 1.25 / 1.20x and 1.18 / 1.16x, 3x3 at 11x11 and 12x12
# 1.17 / 1.13x and 1.16 / 1.11x, 5x5 at 30x30 1.12 / 1.04x; below the bound: 3x3 at 24x24
# 1.06 / 0.98x, CIFAR's batch of 32 1.05 / 1.00-1.05x, at rate 2 on 58x58 1.06 / 1.01x,
# 5x5 at 64x64 1.05 / 1.01x, 3x3 at 38x38 1.04 / 1.03x.  Module backward, whose input
# gradient switches: 5x5 at 9x9 1.07x, a batch of four 1.07x, 3x3 at rate 2 on 16x16 and
# on a batch of four 10x10 1.06x and 1.04-1.08x, 5x5 and 1x7 at 15x15 1.07x and 1.05x.
# Float64 forward, no row pairs, 8 rounds: 5x5 at 9x9 (a batch of four) and 15x15 1.16x,
# 3x3 at rate 2 on four 10x10 maps and on 16x16 1.11x and 1.13x.)
ROW_PRICE_SAVING = 0.9


# Depthwise forward runs its row-block tile when a row's vectors cover at most this
# many times the flat grid's row (56 pixels: 64 computed for 58; on 7x7 and 14x14 maps
# the pixel tiles are faster).
ROW_BLOCK_WASTE = 1.15
# Largest per-thread pixel-major copy (a strip of padded rows of 16 channels) of the
# depthwise channel-block tiles (forward, stride-2 input gradient): it should stay in L2.
CHANNEL_BLOCK_MAX_BYTES = 1 << 19

# ... and runs the whole map at once, along one flat grid, where that computes at most
# this share of the pixels its row tiles would (7x7 maps: 64 pixels for 7 rows of 16;
# MobileNetV2's 960 channels at 7x7, kernel alone, 2 threads: 21 -> 16 us).
CHANNEL_BLOCK_MAP_SHARE = 0.75

# A forward that keeps its planes for the weight gradient runs the channel-block tile too
# (and pads the planes apart) at stride 1 on maps of up to this many output pixels;
# elsewhere the per-channel tiles compute from the planes as they pad them (2 threads,
# forward with a backward to follow: MobileNetV2's 960 channels at 7x7 70 -> 64 us, 384
# at 14x14 62 -> 57, 192 at 28x28 85 -> 81; 144 at 56x56 225 -> 246, 576 at 14x14 with
# stride 2 107 -> 114: AVX-512).  On AVX2, since the row-block tile's 1.2-1.5x (a88e3e4),
# on maps of up to 8x8, and at any size for kernels of more than CHANNEL_BLOCK_KEEP_TAPS
# taps or maps the row-block tile does not cover (AMD Zen 3, 2 threads, in-process, 14
# alternating rounds, median / fastest round, the row-block route against the
# channel-block tile's: 3x3 192 channels at 28x28 1.09-1.14x / 1.12-1.14x, 384 at 14x14
# 1.06x / 1.06x, 256 at 12x12 1.06x / 1.06x, 512 at 8x8 0.99x, 960 at 7x7 0.96x; 5x5 480
# at 14x14 0.72x, 240 at 28x28 0.80x, 144 at 56x56 0.82x; 7x7 384 at 14x14 0.49x, 96 at
# 56x56 0.66x.)
CHANNEL_BLOCK_KEEP_PIXELS = 28 * 28 if _dispatch.VECTOR_BYTES == 64 else 8 * 8
CHANNEL_BLOCK_KEEP_TAPS = None if _dispatch.VECTOR_BYTES == 64 else 9

# Dense forwards on the pixel tiles over batches of at least DENSE_FUSED_MIN_IMAGES images
# whose padded planes take at most CACHE_BUDGET an image run fused, an image per work item:
# each thread pads an image's planes, then runs every tile over them while they are in its
# cache, instead of padding blocks of images in one parallel pass (half of each block's
# planes then written by the other core) and running them in another.  Separate processes
# alternating, 2 threads, inference / training forward: CIFAR ResNet's 16 -> 32 stride-2
# layer on a batch of 128 1.46x / 1.46x, its 16 -> 16 1.17x / 1.19x, 1 -> 32 on 64 28x28
# maps 1.74x / 1.58x, a batch of 4 224x224 stems (7x7, stride 2) 1.09x / 1.07x, 16 -> 16
# on eight 112x112 maps 1.26x / 1.24x, float64 24 -> 24 on eight 56x56 1.22x / 1.16x,
# batches of 4-32 32x32 RGB maps 1.11-1.22x; LeNet's 6 -> 16 5x5 on 64 14x14 maps 0.99x /
# 0.98x.  On two images training forwards lost (the seed example's batch of two 0.86x).
# Their input gradients (DENSE_FUSED_INPUT) likewise extend an image's grad_output, run
# every phase's tiles and fold them into its input gradient, an image per work item, where
# the plan would run the pixel tiles in one reduction pass and the image's extended
# grad_output and phase planes take at most CACHE_BUDGET.  Module backward (input, weight
# and bias gradients), 2 threads, against the three parallel passes: the stride-2 layer
# above 1.57x, its 16 -> 16 1.16x, 1 -> 32 on 28x28 maps 1.25x, LeNet's first layer 1.13x,
# four 32x32 RGB images 1.14x; 8x8 maps 1.01-1.08x; maps too large for it unchanged.
# Forwards on the channel-vector tile in one reduction pass (DENSE_FUSED_CVEC) likewise pad
# an image's blocks of channels per work item, into its thread's scratch, where an image's
# blocks take at most CACHE_BUDGET (inference / training forward): CIFAR ResNet-20's
# 32 -> 32 on 128 16x16 maps 1.20x / 1.21x, 64 -> 64 on 8x8 1.06x / 1.06x, the suite's CIFAR
# batch of 32 (64 -> 64 at 32x32) 1.06-1.08x / 1.06-1.11x, 32 -> 64 on 64 14x14 maps
# 1.04x / 1.04x, 64 -> 256 1x1 on eight 28x28 maps 1.26-1.28x / 1.22x.  So do their input
# gradients where they store straight into it (DENSE_FUSED_CVEC_INPUT: stride 1, zero
# padding), bordering an image's grad_output per work item; module backward: 32 -> 32 on
# 16x16 maps 1.15x, 64 -> 64 on 8x8 1.06x, the CIFAR batch of 32 1.04x, 32 -> 64 at 14x14
# 1.06x, 64 -> 64 on sixteen 16x16 maps 1.04x.
DENSE_FUSED = True
DENSE_FUSED_MIN_IMAGES = 4
DENSE_FUSED_INPUT = True
DENSE_FUSED_CVEC = True
DENSE_FUSED_CVEC_INPUT = True
# ... where the images share evenly among the threads, or there are at least this many: an
# image per work item leaves a thread idle through the last one when they do not (2
# threads, against the old paths, forward / module backward: 3 images of 64 channels at
# 32x32 and 56x56 0.82x / 0.90x, 5 0.88-0.91x / 0.93-0.96x, 7 0.92x / 0.97x; 13 of 32
# channels at 16x16 1.05x / 1.06x).
DENSE_FUSED_UNEVEN_IMAGES = 12

# Multiply-adds per output element that a reduction pass does at least (_reduction_block).
PASS_MIN_MACS = 64
# A reduction pass of the channel-vector tile covers at least this many blocks of
# `lanes` channels: its tiles read a few rows of each block, not whole planes, and each
# pass stores and reloads their partial sums (the 128x128 reflect layer, 64 channels:
# 4 passes of one block 4.89-5.08 ms forward, one pass 4.68-4.83; ASPP's passes of 7
# blocks and DeepLab's rate 2's of 8 took the same time as one pass).
CVEC_PASS_BLOCKS = 4
# A forward's channel-vector row tiles in bands (or on one thread) run every channel tile over
# this many output rows of the band at a time (then the next rows), not over the whole band:
# the rows' blocked input stays in L2 across the channel tiles.  (AMD Zen 3, 512 KB L2, 2 threads,
# separate processes alternating, 6 rounds, inference / training forward, against whole
# bands: ResNet's strided 3x3, whose band reads 430 KB of phase planes a pass, 1.058x /
# 1.05-1.21x, on a batch of three 1.08x / 1.07x; its 3x3 64 and 128 channels, Inception's
# 5x5, the reflect layer and float64 0.998-1.02x / 1.02-1.05x; the 3x3 64 on a batch of three
# 0.99x / 0.98x.  2 rows: the strided one 1.047x, 8 rows 1.045x.  On one thread: the strided
# one 1.080x / 1.073x, the 3x3 64 and 128 and the reflect layer 0.99x / 0.99-1.01x.)
BAND_SUB_ROWS = 4


def _cvec_pass(channels, rblock, lanes):
    """The channel-vector tile's reduction pass for a _reduction_block of `rblock`: whole
    blocks of `lanes` channels (a pass starts at a block), at least CVEC_PASS_BLOCKS of
    them, at most every channel."""
    return min(channels, max(CVEC_PASS_BLOCKS * lanes, _geometry.round_up(rblock, lanes)))

# The weight gradient split over pixels (_wgrad_chunks): work items it aims at per
# image, their largest size per image, and their most in all (each sums a weight
# gradient of its own).  Enough items for OpenMP's default threads, 4 at least (on 2
# threads 4 items ran faster than 8 or 16: fewer partials), but not set by the threads
# of a call: the split, and so the bits of the result, must not depend on them.
WGRAD_CHUNKS = max(4, _OPENMP_DEFAULT)
WGRAD_CHUNK_BYTES = 1 << 20
WGRAD_MAX_CHUNKS = max(16, 2 * _OPENMP_DEFAULT)

# The dense weight gradient's tiles take one tap of a block of channels each (rather
# than consecutive columns) where that visits fewer than WGRAD_TAP_ORDER_SAVING of the
# pixels, counting WGRAD_TILE_OVERHEAD pixels per tile and WGRAD_TAPS_LAST_PIXELS per
# (channel, tap) column for turning the tap-major sums around (see _wgrad_tiles).
# (Measured, 2 threads, same build, orders forced: ASPP at rate 6 9.9 -> 8.9 ms; ResNet's
# 14x14 3x3 0.96 -> 1.33 ms and DeepLab's rate-2 layer 4.05 -> 4.23 ms, which the cost
# keeps in consecutive columns.)
WGRAD_TAP_ORDER_SAVING = 0.95
WGRAD_TILE_OVERHEAD = 16
WGRAD_TAPS_LAST_PIXELS = 3


def _reduction_block(channels, bytes_per_channel, taps):
    """Channels per block so that a block's input fits CACHE_BUDGET, the blocks as
    even as they can be: each pass reloads and stores the partial sums, which a last
    pass over a few channels would pay for little work (ResNet's 256->64 1x1: passes
    of 83, 83, 83 and 7 channels took 0.95 ms, 4 x 64 0.82 ms).  For the same reason a
    pass does at least PASS_MIN_MACS multiply-adds per output (float64 64->64 1x1 at
    56x56: one pass 0.29 ms, two 0.36 ms)."""
    if channels * bytes_per_channel <= CACHE_BUDGET:
        return channels
    minimum = max(8, _geometry.ceil_div(PASS_MIN_MACS, taps))
    blocks = _geometry.ceil_div(channels, max(minimum, CACHE_BUDGET // bytes_per_channel))
    return _geometry.ceil_div(channels, blocks)


# The input gradients of 1x1 layers whose weights outgrow L2 (L1_PASS_MIN_WEIGHT_BYTES)
# run their pixel tiles (small maps) in passes whose rows of grad_output take at most
# L1_PASS_BYTES, kept in L1 while every tile of input channels runs over them rather
# than evicted from L2 by the weights streaming past, as long as a pass covers
# L1_PASS_MIN_CHANNELS channels (each pass stores and reloads the partial sums).
# Module backward, 2 threads, 6 alternating rounds: ResNet's 512 -> 2048 and
# 2048 -> 512 at 7x7 (4 MB of weights; passes of 158 and 128 channels instead of one)
# 1.10-1.13x and 1.12-1.16x (float64 1.22x and 1.10x), a batch of two 1.18x, 1024 ->
# 2048 at 7x7 and its stride-2 twin from 14x14 1.25x and 1.27x, 2048 -> 1024 at 10x10
# 1.25x, MobileNetV2's 320 -> 1280 in float64 (3.3 MB) 1.09x.  Smaller weights lost:
# its 160 -> 960 at 7x7 (0.6 MB) 0.92x, 320 -> 1280 in float32 (1.6 MB) 0.99x, and
# ResNet's 3x3 of 512 at 7x7 0.98x.
L1_PASS_BYTES = 40 << 10
L1_PASS_MIN_CHANNELS = 64
L1_PASS_MIN_WEIGHT_BYTES = 2 << 20


def _l1_pass(channels, bytes_per_channel):
    """The channels of an L1_PASS_BYTES pass (as even as they can be), or all of them
    where such a pass would cover fewer than L1_PASS_MIN_CHANNELS."""
    fit = L1_PASS_BYTES // bytes_per_channel
    if fit < L1_PASS_MIN_CHANNELS or fit >= channels:
        return channels
    return _geometry.ceil_div(channels, _geometry.ceil_div(channels, fit))


_scratch_pool = threading.local()

# The kernels' vector loads are 64 bytes; NumPy aligns large arrays to 16 bytes only,
# which makes every load straddle two cache lines.
ALIGN = 64


def aligned_empty(shape, dtype):
    """np.empty whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    count = 1
    for n in shape:
        count *= n
    buf = np.empty(count + ALIGN // dtype.itemsize, dtype=dtype)
    start = (-_layout.address(buf) % ALIGN) // dtype.itemsize
    return buf[start:start + count].reshape(shape)


def scratch(name, shape, dtype):
    """An uninitialised temporary array, reused across calls from this thread: fresh
    memory costs a page fault per 4 KiB on first touch, which on small and mid-sized
    layers rivals the convolution itself.  `name` tells apart temporaries that are
    alive at the same time; the memory is only valid until the next call that asks
    for the same name (so never return it, or keep it past the call)."""
    pool = _scratch_pool.__dict__
    last = pool.get((name, dtype))
    if last is not None and last[1] == shape:
        return last[2]   # the same view as last time (small calls: a view costs a microsecond)
    count = 1
    for n in shape:
        count *= n
    buf = None if last is None else last[0]
    if buf is None or buf.size < count:
        buf = aligned_empty((max(count, 1),), dtype)
    view = buf[:count].reshape(shape)
    pool[(name, dtype)] = (buf, shape, view)
    return view


def scratches(names_shapes, dtype):
    """[scratch(name, shape, dtype) for each (name, shape)], in one Python call."""
    pool = _scratch_pool.__dict__
    views = []
    for name, shape in names_shapes:
        last = pool.get((name, dtype))
        views.append(last[2] if last is not None and last[1] == shape else scratch(name, shape, dtype))
    return views


class Problem(NamedTuple):
    """A convolution's shape, normalised: every pair split into (h, w)."""

    N: int
    C: int
    H: int
    W: int
    OC: int
    KH: int
    KW: int
    sh: int
    sw: int
    dh: int
    dw: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    groups: int
    mode: str      # padding mode
    dtype: str     # "f32" | "f64"

    @property
    def pointwise(self):
        """A 1x1 kernel at stride 1 without padding: each output pixel reads its own
        input pixel, so the input itself is the flat grid (its planes, no halo)."""
        return ((self.KH, self.KW, self.sh, self.sw) == (1, 1, 1, 1)
                and self.pad_top == self.pad_bottom == self.pad_left == self.pad_right == 0)

    @property
    def output_hw(self):
        hp = self.H + self.pad_top + self.pad_bottom
        wp = self.W + self.pad_left + self.pad_right
        return ((hp - self.dh * (self.KH - 1) - 1) // self.sh + 1,
                (wp - self.dw * (self.KW - 1) - 1) // self.sw + 1)


def _index(values):
    return np.asarray(values, dtype=np.intp).reshape(-1)


def _phase_sources(start, count, step, size, padded, mode):
    """Source index along one axis for each (phase, position) of the phase planes:
    row i of phase a is padded position step * i + a; -1 means zero."""
    table = np.empty((step, count), dtype=np.intp)
    for a in range(step):
        table[a] = _layout.source_indices(start + a, count, size, mode, step)
        positions = a + step * np.arange(count)
        table[a, positions >= padded] = -1
    return table


def _interior(pad, count, step, size):
    """Per phase b, the [lo, hi) of positions j whose padded column step*j + b is an
    input column (step*j + b - pad in [0, size)): copied without a lookup table."""
    out = np.zeros((step, 2), dtype=np.intp)
    for b in range(step):
        lo = max(0, _geometry.ceil_div(pad - b, step))
        hi = min(count, _geometry.ceil_div(pad + size - b, step))
        out[b] = (lo, max(lo, hi))
    return out


def _cvec_layout(cvec, out_channels, reduced_channels, taps, images, rows, cols, width,
                 min_out=None, waste=None, any_pixels=False, min_reduced=None):
    """How a kernel's channel-vector tile `cvec` (its module's CVEC_TILES entry) runs: None
    where it should not (too few channels either way, too few output pixels per weight
    unless the rows are wide, too many idle lanes in the blocks of output channels), else
    its row tiles per output row (rows `width` apart, `cols` real pixels each), or 0 for
    tiles along the flat grid (see ROW_TILE_SAVING).
    min_out / waste: the fewest output channels and the most idle lanes in their blocks
    allowed (CVEC_MIN_CHANNELS and CVEC_CHANNEL_WASTE unless given); min_reduced: the
    fewest channels reduced over (CVEC_MIN_CHANNELS unless given); any_pixels: however
    few output pixels (where the weights are packed a block at a time: PACK_BLOCK_BYTES)."""
    min_out = CVEC_MIN_CHANNELS if min_out is None else min_out
    min_reduced = CVEC_MIN_CHANNELS if min_reduced is None else min_reduced
    waste = CVEC_CHANNEL_WASTE if waste is None else waste
    wide = width >= CVEC_WIDE_ROWS * cols and images * rows * cols >= CVEC_MIN_PIXELS_WIDE
    if (cvec is None or out_channels < min_out or reduced_channels < min_reduced
            or (images * rows * width < (CVEC_MIN_PIXELS if taps > 1 else CVEC_MIN_PIXELS_1X1)
                and not (wide or any_pixels))
            or _geometry.round_up(out_channels, cvec[2]) > waste * out_channels):
        return None
    row_tiles = _geometry.ceil_div(cols, cvec[1])
    rest = cols - (row_tiles - 1) * cvec[1]   # the last tile's pixels: a narrower twin's if it can
    computed = (row_tiles - 1) * cvec[1] + _form(rest, _tile_forms(cvec))
    return row_tiles if computed < ROW_TILE_SAVING * width else 0


def _shared_evenly(images, threads):
    """Whether a dense layer's fused forms (an image per work item) keep `threads` evenly
    busy over `images` (DENSE_FUSED_UNEVEN_IMAGES)."""
    return images % threads == 0 or images >= DENSE_FUSED_UNEVEN_IMAGES


def _runs_fused(planned, p: "Problem", threads):
    """Whether a fused form that a plan has (planned) runs on a call on `threads` threads:
    a grouped or depthwise layer's always, a dense layer's (an image per work item) only
    where its images keep the threads evenly busy (_shared_evenly)."""
    return bool(planned) and (p.groups != 1 or _shared_evenly(p.N, threads))


def _pair_width(cvec):
    """The widest of a channel-vector tile's row tiles that run as row pairs, or 0."""
    return cvec[4] if ROW_PAIRS else 0


def _flat_price(out_len, taps, pixels):
    """What the tiles of `pixels` along a flat grid of out_len pay, as _row_tiling prices
    row tiles: each chunk runs every tap, and starts and stores once."""
    return out_len // pixels * (taps + 1) * (pixels + ROW_TILE_OVERHEAD)


def _priced_row_tiling(masks, forms, pair_width, flat_len, pixels, floor=0):
    """_row_tiling(masks, forms, pair_width, floor) for rows left on a flat grid of flat_len
    pixels (chunks of `pixels`), where its price is at most ROW_PRICE_SAVING of the flat
    grid's tiles (_flat_price), else None."""
    tiling = _row_tiling(masks, forms, pair_width, floor)
    return tiling if tiling[2] <= ROW_PRICE_SAVING * _flat_price(flat_len, len(masks), pixels) else None


def _tap_positions(weight_taps, taps):
    """intp (taps,): each weight tap's position in weight_taps (the weight indices of a run
    of taps), -1 where the run does not have it (what the kernels' block packing reads)."""
    positions = np.full(taps, -1, dtype=np.intp)
    positions[weight_taps] = np.arange(len(weight_taps))
    return positions


def _packed_block_values(dtype, reduced, taps, width):
    """Values of one block of `width` output channels' packed weights, reducing over
    `reduced` channels (rounded up to whole vectors) with `taps` taps (see pack_weights)."""
    return _geometry.round_up(reduced, LANES[dtype]) * taps * width


def _small_map_layout(cvec, dtype, out_channels, reduced_channels, taps, pixels, layout_args, layout_kwargs,
                      min_pixels=None):
    """_cvec_layout(cvec, out_channels, reduced_channels, taps, *layout_args, **layout_kwargs,
    any_pixels=True) where the weights are to be packed a block at a time on a map of
    `pixels` output pixels too few for _cvec_layout's own rule (from min_pixels,
    PACK_BLOCK_MIN_PIXELS unless given; kernels larger than 1x1, PACK_BLOCK_BYTES), else
    None."""
    min_pixels = PACK_BLOCK_MIN_PIXELS if min_pixels is None else min_pixels
    if (not PACK_BLOCKS or cvec is None or taps == 1 or pixels < min_pixels
            or _packed_block_values(dtype, reduced_channels, taps, cvec[2]) * ITEMSIZE[dtype] > PACK_BLOCK_BYTES):
        return None
    return _cvec_layout(cvec, out_channels, reduced_channels, taps, *layout_args, **layout_kwargs, any_pixels=True)


def _panel_pixels(p: "Problem", channels, chunk):
    """The length, in pixels, of a panel's block of channels for a 1x1 layer reducing
    over `channels`: a multiple of chunk, plus a pixel where that makes its cache lines
    odd in number (blocks a multiple of 4 KB apart would pile into a few of L1's sets)."""
    lanes, itemsize = LANES[p.dtype], ITEMSIZE[p.dtype]
    per_chunk = _geometry.round_up(channels, lanes) * chunk * itemsize
    chunks = _geometry.ceil_div(p.H * p.W, chunk)
    most = max(1, p.N * chunks // PANEL_MIN_ITEMS)
    pixels = chunk * max(1, min(chunks, most, PANEL_BUDGET[p.dtype] // per_chunk))
    return pixels + 1 if pixels * lanes * itemsize // 64 % 2 == 0 else pixels


def _tile_forms(cvec):
    """The pixels of a channel-vector tile and of its narrower twins."""
    return (cvec[1], *cvec[3])


def _form(pixels, forms):
    """The pixels computed by a row tile of `pixels`: it runs the narrowest form that
    holds them."""
    return min(f for f in forms if f >= pixels)


def _run_price(pixels, forms, pair_width, floor=0):
    """What a row tile of `pixels` pays per tap and row, in pixels (see ROW_TILE_OVERHEAD
    and ROW_PAIR_PRICE): pair_width, the widest tile that runs as row pairs (0: none);
    floor, the fewest pixels a tile pays for otherwise (_latency_pixels)."""
    if pixels <= pair_width:
        return _form(pixels, forms) + ROW_TILE_OVERHEAD / 2 + ROW_PAIR_PRICE
    return max(_form(pixels, forms), floor) + ROW_TILE_OVERHEAD


def _latency_pixels(cvec, dtype, pairs):
    """The pixels a channel-vector row tile pays for at least (CVEC_MIN_ACCUMULATORS
    sums of its vectors of output channels), or 0 where the kernel has row pairs (its
    narrow tiles then run two rows at once: the float32 forward)."""
    return 0 if pairs else _geometry.ceil_div(CVEC_MIN_ACCUMULATORS, cvec[2] // LANES[dtype])


def _row_tiled_length(flat_len, rows, width, tile_cols, forms, pixels):
    """Flat output length that also holds the last row's row tiles (which may compute
    past the flat grid's end), in whole chunks of `pixels`."""
    extent = max(s + _form(n, forms) for s, n in tile_cols)
    return _geometry.round_up(max(flat_len, (rows - 1) * width + extent), pixels)


def _wgrad_chunks(N, OH, OW, C, OC, kk, x_chan, itemsize):
    """(output rows, images) per work item of the weight gradient split over pixels (its
    module's `ocvec_chunks`), or None where that does not pay.  Each work item sums a
    whole weight gradient of its own, so the split pays where those partials are small
    beside the data read.  It aims at WGRAD_CHUNKS items of at most WGRAD_CHUNK_BYTES
    per image, and at most WGRAD_MAX_CHUNKS items (the same rows of several images each).
    (Measured, 2 threads, against the split over tiles: partials at 6-35% of the data
    1.09-1.29x -- ResNet's 1x1 and 56x56 3x3, the 128x128 reflect layer, CIFAR's batch
    of 32, float64 1x1 2.3x; at 110% 0.96x, at 500-2000% 0.66-0.95x.)"""
    image_bytes = (OC * OH * OW + C * x_chan) * itemsize
    per_image = min(OH, max(_geometry.ceil_div(WGRAD_CHUNKS, N), _geometry.ceil_div(image_bytes, WGRAD_CHUNK_BYTES)))
    rows = _geometry.ceil_div(OH, per_image)
    per_image = _geometry.ceil_div(OH, rows)
    images = _geometry.ceil_div(N, max(1, WGRAD_MAX_CHUNKS // per_image))
    items = _geometry.ceil_div(N, images) * per_image
    if items < 2 or 2 * items * OC * C * kk > N * (OC * OH * OW + C * x_chan):
        return None
    return rows, images


def _icvec_table(C, kk, lanes, tap_off, span, columns):
    """The tiles' table of the weight gradient vectorised over input channels: a row per
    tile of `columns` columns (a block of `lanes` channels at one tap each, block-major,
    the last tile's spare columns repeating its last), each column's offset in a window
    of `span` pixels (pixel-major blocks of channels), then each one's in an output
    channel's row of partial sums (tap-major: tap * Cp + block * lanes), then how many
    of the columns are real."""
    Cp = _geometry.round_up(C, lanes)
    cols = [(b, t) for b in range(Cp // lanes) for t in range(kk)]
    rows = []
    for i in range(0, len(cols), columns):
        group = cols[i:i + columns]
        used = len(group)
        group = group + [group[-1]] * (columns - used)
        rows.append([(b * span + int(tap_off[t])) * lanes for b, t in group]
                    + [t * Cp + b * lanes for b, t in group] + [used])
    return np.asarray(rows, dtype=np.intp)


def _icvec_shape(tiles, OC, columns):
    """Which of the weight gradient's tiles by input channel (rows, columns) wastes least
    on OC output channels x `columns` columns, both rounded up to whole tiles (the first
    on a tie): their loads per multiply-add are the same."""
    return min(range(len(tiles)), key=lambda i: (_geometry.round_up(OC, tiles[i][0])
                                                 * _geometry.round_up(columns, tiles[i][1]), i))


def _icvec_chunking(N, OH, We, C, OC, kk, max_off, itemsize, lanes):
    """(output rows per work item, window length, images per item) of the weight
    gradient vectorised over input channels: windows within ICVEC_WINDOW_BYTES, at
    least WGRAD_CHUNKS items (rows cut finer on few images), of ICVEC_ITEM_PIXELS pixels
    where that leaves as many (images grouped on small maps), and the partial sums
    within ICVEC_PARTIAL_BYTES.  None of it depends on the threads, so neither do the
    sums."""
    Cp = _geometry.round_up(C, lanes)
    rows = max(1, min(OH, (ICVEC_WINDOW_BYTES // (Cp * itemsize) - max_off) // We))
    chunks = _geometry.ceil_div(OH, rows)
    if N * chunks < WGRAD_CHUNKS:
        chunks = min(OH, _geometry.ceil_div(WGRAD_CHUNKS, N))
        rows = _geometry.ceil_div(OH, chunks)
        chunks = _geometry.ceil_div(OH, rows)
    images = min(N, max(1, min(_geometry.ceil_div(ICVEC_ITEM_PIXELS, rows * We), N * chunks // WGRAD_CHUNKS),
                        _geometry.ceil_div(N * chunks * OC * kk * Cp * itemsize, ICVEC_PARTIAL_BYTES)))
    return rows, rows * We + max_off, images


def _wgrad_tiles(masks, C, kk, columns, fields):
    """The dense weight gradient's tile table (its module's `ocvec` and `ocvec_chunks`)
    and whether it sums tap-major.  The table: a row per tile of `columns` columns
    (channel * kk + tap, the last repeated past the used ones), then `fields` (the
    modules' OCVEC_FIELDS).  masks: _padding_masks (taps, OH, OW), True where a tap
    reads only zero padding.

    Two orders: consecutive columns (each tile a run of the weight's (channel, tap)
    columns), or one tap of `columns` consecutive channels per tile (the taps of a block
    of channels one after another, so their input stays in cache), which visits only
    the output pixels' rectangle where that tap reads data and stores its columns into
    a tap-major gradient, (OC, kk, C), that _layout.taps_last then turns into the
    weight's layout.  The tap order is taken where it visits fewer pixels, counting
    WGRAD_TILE_OVERHEAD pixels per tile and WGRAD_TAPS_LAST_PIXELS per column for the
    turn; with much padding (DeepLab's ASPP at rate 6: its corner taps read data on 67%
    of the pixels) it visits a fifth fewer."""
    valid = ~masks
    rows_any, cols_any = valid.any(axis=2), valid.any(axis=1)   # (taps, OH), (taps, OW)
    OH, OW = rows_any.shape[1], cols_any.shape[1]
    # Each tap's rectangle, [h0, h1) x [w0, w1); an empty one (a tap reading only
    # padding) as (OH, 0, OW, 0), which a min / max over a tile's taps ignores.
    first = lambda a, n: np.where(a.any(axis=1), a.argmax(axis=1), n)
    last = lambda a: np.where(a.any(axis=1), a.shape[1] - a[:, ::-1].argmax(axis=1), 0)
    rects = np.stack([first(rows_any, OH), last(rows_any), first(cols_any, OW), last(cols_any)], axis=1)

    def table(cols, used, store):
        """The rows of tiles of columns `cols` (tiles, columns): their rectangle the
        bounding box of their taps' (all zero if empty)."""
        taps = cols % kk
        box = np.stack([rects[taps, 0].min(axis=1), rects[taps, 1].max(axis=1),
                        rects[taps, 2].min(axis=1), rects[taps, 3].max(axis=1)], axis=1)
        box[(box[:, 1] == 0) | (box[:, 3] == 0)] = 0
        values = dict(used=used, store=store, h0=box[:, 0], h1=box[:, 1], w0=box[:, 2], w1=box[:, 3])
        return np.concatenate([cols, np.stack([values[f] for f in fields], axis=1)], axis=1).astype(np.intp)

    def cost(t):
        f = {name: columns + i for i, name in enumerate(fields)}
        return int(((t[:, f["h1"]] - t[:, f["h0"]]) * (t[:, f["w1"]] - t[:, f["w0"]]) + WGRAD_TILE_OVERHEAD).sum())

    j = np.arange(columns)
    starts = np.arange(0, C * kk, columns)
    by_column = table(np.minimum(starts[:, None] + j, C * kk - 1), np.minimum(columns, C * kk - starts), starts)
    if kk == 1:
        return by_column, False
    c0, t = np.divmod(np.arange(_geometry.ceil_div(C, columns) * kk), kk)   # tile (c0, t), taps inner
    c0 = c0 * columns
    by_tap = table(np.minimum(c0[:, None] + j, C - 1) * kk + t[:, None], np.minimum(columns, C - c0), t * C + c0)
    tap_major = cost(by_tap) + WGRAD_TAPS_LAST_PIXELS * C * kk < WGRAD_TAP_ORDER_SAVING * cost(by_column)
    return (by_tap if tap_major else by_column), tap_major


def _padding_masks(taps, rows, cols, out_rows, out_cols):
    """bool (taps, out_rows, out_cols): True where output pixel (i, o) reads only zero
    padding through a tap.  taps: (a, b, dy, dx) each: output pixel (i, o) reads the
    grid's flat position (i + dy) * width + o + dx, whose row's source is in rows[a] and
    column's in cols[b] (width = len(cols[b]); -1: padding; a row past the table counts
    as data)."""
    width, n_rows = cols.shape[1], rows.shape[1]
    flat = (np.arange(out_rows)[:, None] * width + np.arange(out_cols)[None, :])
    masks = np.zeros((len(taps), out_rows, out_cols), bool)
    for t, (a, b, dy, dx) in enumerate(taps):
        r, c = np.divmod(flat + dy * width + dx, width)
        masks[t] = (r < n_rows) & ((rows[a, np.minimum(r, n_rows - 1)] < 0) | (cols[b, c] < 0))
    return masks


def _row_tiling(masks, forms, pair_width=0, floor=0):
    """How row tiles cover each output row: (tile_cols, skip, price).  tile_cols (tiles, 2):
    each tile's first column and its pixels, the same in every row; skip uint8
    (out_rows * tiles, taps): 1 where a row's tile reads only zero padding through a
    tap (which it then skips), or None where no tile does; price, what the split pays
    (below).  masks: _padding_masks.  forms: the pixels of the tile's forms (see _form).
    pair_width: the widest tile that runs as row pairs, which pays less (_run_price);
    floor: the fewest pixels any other tile pays for (_latency_pixels).

    The split minimises the pixels computed, counting a tap a tile skips as free, by
    dynamic programming over the columns: a tile pays its _run_price (its form's pixels +
    ROW_TILE_OVERHEAD) per tap and row it runs, and once more per row (its start and
    store).  So a tile
    boundary lands where a tap starts or stops reading padding when that pays: DeepLab's
    ASPP (dilation 6, 33 columns) splits 6 + 14 + 7 + 6, its edge tiles skipping a
    column of taps, instead of 14 + 14 + 6."""
    taps, out_rows, out_cols = masks.shape
    widest = max(forms)
    # padding[t, i, s]: columns of [0, s) in row i that read padding through tap t
    padding = np.zeros((taps, out_rows, out_cols + 1), np.int32)
    np.cumsum(masks, axis=2, out=padding[:, :, 1:])
    best = np.full(out_cols + 1, np.inf)
    best[0], choice = 0.0, np.zeros(out_cols + 1, np.intp)
    run_cost = []   # run_cost[n - 1][s]: cost of a tile of n pixels at column s
    for n in range(1, min(widest, out_cols) + 1):
        starts = np.arange(out_cols - n + 1)
        skipped = (padding[:, :, starts + n] - padding[:, :, starts]) == n   # (taps, rows, starts)
        runs = taps * out_rows - skipped.sum(axis=(0, 1)) + out_rows
        run_cost.append(runs * _run_price(n, forms, pair_width, floor))
    for end in range(1, out_cols + 1):
        for n in range(1, min(widest, end) + 1):
            cost = best[end - n] + run_cost[n - 1][end - n]
            if cost < best[end]:
                best[end], choice[end] = cost, n
    tiles, end = [], out_cols
    while end > 0:
        tiles.append((end - choice[end], choice[end]))
        end -= choice[end]
    tile_cols = np.array(tiles[::-1], dtype=np.intp).reshape(-1, 2)
    skip = np.zeros((out_rows, len(tile_cols), taps), np.uint8)
    for j, (s, n) in enumerate(tile_cols):
        skip[:, j, :] = masks[:, :, s:s + n].all(axis=2).T
    skip = skip.reshape(out_rows * len(tile_cols), taps)
    return tile_cols, (skip if skip.any() else None), best[out_cols]


def _row_pairs(tile_cols, skip, out_rows, narrow):
    """Which narrow row tiles (`narrow` pixels or fewer) run as row pairs: uint8
    (out_rows * tiles), 1 where a tile also computes the same tile of the next row, 2
    there, 0 elsewhere; or None where none does.  A narrow tile loads a vector of packed
    weights per `narrow` pixels or fewer, twice as often as the wide tile, and its weights
    stream from L2; two rows at once halve that (DeepLab's ASPP, 6 + 14 + 7 + 6 pixels a
    row).  Rows pair from the top while both skip the same taps (skip: _row_tiling's)."""
    tiles = len(tile_cols)
    pairs = np.zeros((out_rows, tiles), np.uint8)
    taps = None if skip is None else skip.reshape(out_rows, tiles, -1)
    for j, (_, n) in enumerate(tile_cols):
        h = 0
        while n <= narrow and h + 1 < out_rows:
            if taps is None or np.array_equal(taps[h, j], taps[h + 1, j]):
                pairs[h, j], pairs[h + 1, j] = 1, 2
                h += 2
            else:
                h += 1
    return pairs.reshape(-1) if pairs.any() else None


def _in_place_order(plan, p: "Problem", kernel):
    """An InPlacePlan (or None) of 1x1 layer p, its channel tiles inner where its chunks are
    inner, its input outgrows L2 and its planes hold enough chunks (IN_PLACE_TILES_INNER)."""
    if plan is None or plan.tiles_inner or not IN_PLACE_TILES_INNER:
        return plan
    if (p.N * p.C * p.H * p.W * ITEMSIZE[p.dtype] <= IN_PLACE_TILES_INNER_INPUT_BYTES
            or p.H * p.W < IN_PLACE_TILES_INNER_MIN_CHUNKS * kernel.variants[plan.tile][2]):
        return plan
    return plan._replace(tiles_inner=True)


class BandSplit:
    """How a call splits its pixel chunks into one band per thread (see `__call__`), or
    (`split` false) does not: per image, out_rows rows of row_tiles chunks, or else a
    flat grid of out_len pixels, `pixels` to a chunk, `width` to a row; output row i
    first reads row first_row + i of the padded planes, plane_rows rows of `width`.
    Thread t runs the t-th share of each image's chunks (the kernels' _run_band) after
    padding (or extending) itself the rows from the one its first chunk starts on: most
    of what it reads it wrote itself, as a line another core has just written costs far
    more to read here, and a band's input stays in its core's L2 for every channel
    tile.  A thread done with its band takes what is left of the others' (the kernels'
    _run_claimed), so a core that another job slows does not hold up the call.
    Measured, 2 threads, forward:
    - pixel tiles: MobileNetV2's 3 -> 32 stem at 224x224 0.166 -> 0.136 ms, 8 -> 8
      3x3 at 128x128 0.136 -> 0.100, 16 -> 16 at 64x64 0.111 -> 0.090;
    - channel-vector tiles, against the dynamic schedule: ResNet's strided 3x3
      1.075x, DeepLab's rate-2 layer and Inception's 5x5 1.04x, ResNet's 3x3 1.036x
      (float64 too), the reflect layer 1.02x, ASPP 1.01x, CIFAR's batch of 32 0.99x.
    (The input gradient's: see BackwardDataPlan.)"""

    def __init__(self, split, out_rows, row_tiles, out_len, pixels, width, first_row, plane_rows):
        self.chunks = 0 if not split else out_rows * row_tiles if row_tiles else out_len // pixels
        self.row_tiles, self.pixels = row_tiles, pixels
        self.width, self.first_row, self.plane_rows = width, first_row, plane_rows
        self._rows = {}

    def __call__(self, threads):
        """band_rows (intp, threads + 1) for pad_phase / pad_blocked / extend when the call
        runs in bands on `threads` threads, else None: BAND_MIN_CHUNKS chunks per thread
        at least, for balance, and at most BAND_MAX_THREADS threads."""
        if threads == 1 or threads > BAND_MAX_THREADS or self.chunks < BAND_MIN_CHUNKS * threads:
            return None
        rows = self._rows.get(threads)
        if rows is None:
            firsts = [t * self.chunks // threads for t in range(threads)]
            starts = [c // self.row_tiles if self.row_tiles else c * self.pixels // self.width for c in firsts]
            rows = self._rows[threads] = _index([min(self.plane_rows, self.first_row + s) if t else 0
                                                 for t, s in enumerate(starts)] + [self.plane_rows])
        return rows


class InPlacePlan(NamedTuple):
    """How a 1x1 layer's forward runs the pixel tiles over its input in place (IN_PLACE)."""
    tile: int          # the compiled tile (Kernel.variants index)
    out_len: int       # flat output pixels of a plane that its chunks cover
    left: int          # pixels past them, computed as dot products (IN_PLACE_LEFTOVER)
    tiles_inner: bool  # each chunk runs every channel tile (else each channel tile its
                       # run of chunks: IN_PLACE_CHUNKS_INNER_PIXELS)


class ForwardPlan:
    """Geometry of the forward pass (and of the weight gradient, which reads the
    same padded phase planes).  inference: for a forward that keeps nothing for a
    backward, the channel-vector tile from CVEC_MIN_CHANNELS_INFERENCE channels
    (inference_plan says which layers build one).  frozen: an inference forward whose
    weights were packed once, by an earlier call (frozen_plan): the channel-vector
    tile on maps of any size, over the whole packed weights."""

    def __init__(self, p: Problem, inference=False, frozen=False):
        inference = inference or frozen
        self.problem = p
        self.inference_twin = self if inference else None   # (see inference_plan)
        self.frozen = frozen
        self.frozen_twin = self if frozen else None   # (see frozen_plan)
        self.routes = {}   # forward()'s steps by (keep, share_input, threads, aligned)
        self.input_gradient_routes = {}   # _input_gradient's by threads
        self.weight_gradient_routes = {}   # backward_params' kernels by threads
        self.G = p.groups
        self.Cg, self.OCg = p.C // p.groups, p.OC // p.groups
        self.kk = p.KH * p.KW
        self.OH, self.OW = p.output_hw
        # multiply-adds of one direction (all three cost about the same)
        self.work = p.N * p.OC * self.OH * self.OW * self.Cg * self.kk
        self.static_schedule = self.work < STATIC_WORK
        self.values = p.N * (p.C * p.H * p.W + p.OC * self.OH * self.OW)
        hp, wp = p.H + p.pad_top + p.pad_bottom, p.W + p.pad_left + p.pad_right
        self.Hq, self.We = _geometry.ceil_div(hp, p.sh), _geometry.ceil_div(wp, p.sw)
        self.n_planes = p.sh * p.sw
        self.kernel = _dispatch.lookup("fwd", p)
        lanes, itemsize = LANES[p.dtype], ITEMSIZE[p.dtype]
        self.tile, chunk = self.kernel.pick_tile(self.OCg, self.OH * self.We)
        # Dense layers with enough channels run the channel-vector tile over the input
        # in blocks of channels, pixel-major (see pad_blocked).
        # 1x1 layers that narrow the channels (MobileNetV2's projections, 144 -> 24) read their
        # input once, through the panels below, however idle their one block of output
        # channels: the pixel tiles read it along as many streams as channels.
        narrowing = p.KH * p.KW == 1 and self.Cg > self.OCg
        min_out, waste = (min(CVEC_MIN_CHANNELS, CVEC_NARROW_MIN_OUT), float("inf")) if narrowing else (None, None)
        min_reduced = min(CVEC_MIN_CHANNELS, CVEC_MIN_CHANNELS_INFERENCE) if inference else None
        layout = _cvec_layout(self.kernel.cvec, self.OCg, self.Cg, p.KH * p.KW, p.N, self.OH, self.OW, self.We,
                              min_out, waste, min_reduced=min_reduced)
        # Small maps: the tiles pack their own blocks of weights (PACK_BLOCK_BYTES).
        self.pack_blocks = False
        if layout is None:
            layout = _small_map_layout(self.kernel.cvec, p.dtype, self.OCg, self.Cg, self.kk, p.N * self.OH * self.OW,
                                       (p.N, self.OH, self.OW, self.We),
                                       dict(min_out=min_out, waste=waste, min_reduced=min_reduced),
                                       1 if frozen else PACK_BLOCK_MIN_PIXELS_INFERENCE if inference else None)
            # (frozen: the tiles read the weights packed once, whole)
            self.pack_blocks = layout is not None and not frozen
        self.cvec = None if layout is None else self.kernel.cvec
        self.row_tiles = layout or 0
        if self.cvec is not None:
            self.tile, chunk, width = self.cvec[:3]
            self.blocks = _geometry.ceil_div(self.OCg, width)
        # Depthwise forward runs a row-block tile on rows it covers with little waste.
        self.row_block = None
        for i, (rows, width) in enumerate(self.kernel.row_blocks):
            if _geometry.round_up(self.OW, width) <= ROW_BLOCK_WASTE * self.We:
                self.row_block = i
                break
        # Depthwise forward (one output channel each) without a backward to keep the
        # planes for, or with one on small maps (channel_block_keeps): 16 channels at a
        # time, pixel-major (see KernelSpec.channel_block).
        # (its rows / columns tables, the columns that copy the input, strips)
        self.channel_block = None
        self.channel_block_map = None
        self.channel_block_keeps = False
        if self.kernel.cblock is not None and self.OCg == 1:
            mode = PADDING_MODES[p.mode]
            slack = (lanes - 1) * p.sh + (p.KW - 1) * p.dw + 1   # as codegen's channel-block slack

            def per_thread(strip):
                rows = (strip - 1) * p.sh + (p.KH - 1) * p.dh + 1
                return _geometry.round_up((rows * wp + slack) * lanes, lanes)

            self.channel_block = (_phase_sources(-p.pad_top, hp, 1, p.H, hp, mode),
                                  _phase_sources(-p.pad_left, wp, 1, p.W, wp, mode),
                                  _interior(p.pad_left, wp, 1, p.W), ChannelBlockStrips(p, self.OH, per_thread))
            # Narrow maps at stride 1: the whole map per work item, its tiles along one
            # flat grid (the kernel's map_item); the values of each thread's copy, or None.
            flat = _geometry.round_up((self.OH - 1) * wp + self.OW, lanes)
            if (p.sh == p.sw == 1 and flat <= CHANNEL_BLOCK_MAP_SHARE * self.OH * _geometry.round_up(self.OW, lanes)):
                # (the padded copy, the flat grid, the dense pixels in whole transposed blocks)
                values = (hp * wp + slack + flat + _geometry.round_up(max(p.H * p.W, self.OH * self.OW), lanes)) * lanes
                if values * itemsize <= CHANNEL_BLOCK_MAX_BYTES:
                    self.channel_block_map = values
            # (the row-block tile would lose at any size: kernels of more taps, uncovered maps)
            row_block_loses = CHANNEL_BLOCK_KEEP_TAPS is not None and (p.KH * p.KW > CHANNEL_BLOCK_KEEP_TAPS
                                                                        or self.row_block is None)
            self.channel_block_keeps = p.sh == p.sw == 1 and (self.OH * self.OW <= CHANNEL_BLOCK_KEEP_PIXELS
                                                              or row_block_loses)
        self.out_len = _geometry.round_up(self.OH * self.We, chunk)
        if self.row_block is not None:
            # the last row block reads its rows past OH, and its vectors past OW
            rows, width = self.kernel.row_blocks[self.row_block]
            self.out_len = _geometry.round_up(
                max(self.out_len, (_geometry.round_up(self.OH, rows) - 1) * self.We
                    + _geometry.round_up(self.OW, width)), chunk)
        taps = _geometry.forward_taps(p.KH, p.KW, p.sh, p.sw, p.dh, p.dw)
        mode = PADDING_MODES[p.mode]
        self.rows = _phase_sources(-p.pad_top, self.Hq, p.sh, p.H, hp, mode)
        self.cols = _phase_sources(-p.pad_left, self.We, p.sw, p.W, wp, mode)
        self.col_interior = _interior(p.pad_left, self.We, p.sw, p.W)
        # The channel-vector row tiles: where each starts in a row and, with zero padding,
        # the taps through which it reads only padding, which it skips (DeepLab's ASPP
        # at rate 6: over a quarter of them) as long as the weights are finite (0 * inf
        # is NaN).
        self.tile_cols, self.tap_skip, self.row_pairs = None, None, None
        masks = None   # (the taps' padding masks, made when first needed: also below)
        tiling = None
        floor = 0 if self.cvec is None else _latency_pixels(self.cvec, p.dtype, _pair_width(self.cvec))
        if self.row_tiles:
            masks = self.padding_masks(taps)
            tiling = _row_tiling(masks, _tile_forms(self.cvec), 0, floor)
        elif self.cvec is not None and self.We > self.OW:
            # The flat grid computes scratch columns: row tiles, priced as row pairs where
            # the kernel has them, may still cost less (ROW_PRICE_SAVING).  (Only here: rows
            # that split evenly into wide tiles measured no faster split into pairs: 27 and
            # 13 pixels, 0.98-0.99x.)
            masks = self.padding_masks(taps)
            tiling = _priced_row_tiling(masks, _tile_forms(self.cvec), _pair_width(self.cvec), self.out_len,
                                        self.cvec[1], floor)
        if tiling is not None:
            forms = _tile_forms(self.cvec)
            self.tile_cols, self.tap_skip, _ = tiling
            self.row_tiles = len(self.tile_cols)
            if _pair_width(self.cvec):
                self.row_pairs = _row_pairs(self.tile_cols, self.tap_skip, self.OH, _pair_width(self.cvec))
            self.out_len = _row_tiled_length(self.out_len, self.OH, self.We, self.tile_cols, forms, chunk)
        # output pixels the channel-vector tiles compute (their partial sums' length)
        self.tiled_len = self.OH * self.row_tiles * chunk if self.row_tiles else self.out_len
        # 1x1 layers reducing over more channels than they output (on AVX2 all of them:
        # TILES_INNER_ALL_POINTWISE): consecutive work items share a pixel chunk, which
        # stays in L1 across the channel tiles (otherwise each tile re-reads it from L2,
        # which cannot feed one multiply-add per load).
        self.tiles_inner = self.kk == 1 and (self.Cg > self.OCg or TILES_INNER_ALL_POINTWISE)
        reach = max(t.dy for t in taps) * self.We + max(t.dx for t in taps)
        # (+ a vector: the weight gradient's last, partial vector of a row loads whole)
        self.plane_len = _geometry.round_up(max(self.Hq * self.We, self.out_len + reach) + lanes, lanes)
        if (self.plane_len * itemsize // 64) % 2 == 0:
            # An odd number of cache lines per plane: a tile reading the same pixels of
            # consecutive channels then spreads over L1's sets instead of piling into a
            # few (a 56x56 plane is 196 lines: 1x1 layers lost a third to conflict misses).
            self.plane_len += lanes
        self.x_chan = self.n_planes * self.plane_len
        # The channel-vector tile's input: blocks of `lanes` channels, each pixel-major.
        self.in_blocks = _geometry.ceil_div(p.C, lanes)
        self.block_len = self.x_chan * lanes
        # Larger maps whose weights outweigh their input (PACK_BLOCK_WEIGHT_RATIO) pack
        # them a block at a time too.
        if (self.cvec is not None and not self.pack_blocks and PACK_BLOCKS and not narrowing and not frozen
                and p.groups == 1
                and _packed_block_values(p.dtype, self.Cg, self.kk, self.cvec[2]) * itemsize <= PACK_BLOCK_BYTES
                and p.OC * self.Cg * self.kk >= PACK_BLOCK_WEIGHT_RATIO * p.N * p.C * self.x_chan):
            self.pack_blocks = True
        self.rblock = _reduction_block(self.Cg, self.x_chan * itemsize, self.kk)
        if self.cvec is not None:
            # (one pass where the tiles pack their weights: the input is small beside them)
            self.rblock = self.Cg if self.pack_blocks else _cvec_pass(self.Cg, self.rblock, lanes)
        # 1x1 layers at stride 1 without padding, whose input is its own flat grid, skip
        # the blocked copy: each work item copies a run of pixel chunks into its thread's
        # panel, which stays in cache while every channel tile runs over it.
        # (Only the 1x1 kernels have panel tiles: stride and dilation 1.)
        self.panels = (self.cvec is not None and p.pointwise and self.tiles_inner and p.dh == p.dw == 1
                       and p.groups == 1 and not self.row_tiles and not self.pack_blocks and PANELS)
        if self.panels:
            self.rblock = self.Cg   # (a panel holds every channel: one pass)
            self.panel_pixels = _panel_pixels(p, self.Cg, self.cvec[1])
        # ... or run the pixel tiles over it in place (IN_PLACE; an InPlacePlan), always
        # (in_place) or where the input starts on a cache line (in_place_aligned).
        self.in_place = self.in_place_aligned = None
        pixels = p.H * p.W
        if IN_PLACE and self.kernel.in_place and p.pointwise and p.groups == 1 and not _planes_alias(p):
            tile, chunk = self.kernel.pick_tile(self.OCg, pixels)
            plan = InPlacePlan(tile, _geometry.round_up(pixels, chunk), 0, True)
            short = self.kernel.pick_tile_leftover(self.OCg, pixels, IN_PLACE_LEFTOVER, IN_PLACE_LEFTOVER_PRICE)
            if short is not None and short[2] < self.kernel.tile_cost(tile, self.OCg, pixels):
                plan = plan._replace(tile=short[0], out_len=pixels - pixels % short[1], left=pixels % short[1])
            if plan.out_len + plan.left <= IN_PLACE_PIXEL_WASTE * pixels:
                if (self.cvec is None or self.OCg <= IN_PLACE_MAX_OUT or self.work <= IN_PLACE_MAX_WORK
                        or (pixels <= IN_PLACE_MAX_PIXELS and p.N * pixels <= IN_PLACE_MAX_BATCH_PIXELS)
                        or (inference and pixels <= IN_PLACE_INFERENCE_MAX_PIXELS)):
                    # (weights outweighing the input: each thread its run of channel tiles)
                    weighty = IN_PLACE_WEIGHT_MAJOR and p.OC > p.N * pixels
                    self.in_place = plan._replace(tiles_inner=False) if weighty else plan
                elif p.N * pixels <= IN_PLACE_CHUNKS_INNER_PIXELS:
                    self.in_place = plan._replace(tiles_inner=False)
                elif (pixels * itemsize % ALIGN == 0
                      and p.N * (p.C + p.OC) * pixels * itemsize <= IN_PLACE_ALIGNED_BYTES):
                    self.in_place_aligned = plan
            self.in_place, self.in_place_aligned = (_in_place_order(q, p, self.kernel)
                                                    for q in (self.in_place, self.in_place_aligned))
        # Images per forward pass: padded, then convolved while their planes are in cache.
        self.images = max(1, min(p.N, (CACHE_BUDGET if self.cvec is None else CVEC_IMAGE_BUDGET)
                                 // max(1, p.C * self.x_chan * itemsize)))
        self.tap_off = _index([t.plane * self.plane_len + t.dy * self.We + t.dx for t in taps])
        self.block_off = self.tap_off * lanes   # the same taps in the pixel-major blocks
        self.tap_w = _index([t.w_index for t in taps])
        self.tap_pos = _tap_positions(self.tap_w, self.kk)
        # Weight gradient: pixels reduced per image (whole vectors; scratch columns are zero).
        self.grad_len = _geometry.round_up(self.OH * self.We, lanes)
        self.wgrad_kernel = _dispatch.lookup("bwd_weight", p)
        # Dense layers with enough channels vectorise the weight gradient over output
        # channels (no horizontal sums, only real pixels summed).  (Large single maps
        # used to keep the pixel-vectorised kernel; on 2 threads it now runs 3-8% slower
        # there: ResNet's 56x56 3x3 and 1x1, the 128x128 reflect layer.)  So do grouped
        # layers with groups as wide (two of 64 channels), through the dense kernel's
        # form, a call per group (see backward_params): the grouped kernel's pixel-
        # vectorised tile suits ResNeXt's groups of 4 channels.
        self.wgrad_ocvec = self.wgrad_kernel if p.groups == 1 else _dispatch.lookup("bwd_weight",
                                                                                    p._replace(groups=1))
        self.wgrad_by_channel = (self.wgrad_ocvec.ocvec is not None and self.OCg >= WGRAD_MIN_OUT_VECTORS * lanes
                                 and (self.Cg >= WGRAD_MIN_CHANNELS
                                      or p.groups == 1 and self.Cg * self.kk >= WGRAD_MIN_COLUMNS)
                                 and (p.groups == 1 or WGRAD_GROUPWISE
                                      and _geometry.round_up(self.OCg, 2 * lanes) <= CVEC_CHANNEL_WASTE * self.OCg))
        self.wgrad_tiles, self.wgrad_tap_major, self.wgrad_chunks = None, False, None
        if self.wgrad_by_channel:
            self.wgrad_tiles, self.wgrad_tap_major = _wgrad_tiles(
                self.padding_masks(taps) if masks is None else masks, self.Cg, self.kk,
                self.wgrad_ocvec.ocvec_columns, self.wgrad_ocvec.ocvec_fields)
            # Dense layers whose weight gradient is small beside their data split it over pixels.
            if p.groups == 1:
                self.wgrad_chunks = _wgrad_chunks(p.N, self.OH, self.OW, p.C, p.OC, self.kk, self.x_chan, itemsize)
        # Wide groups: each group's forward (and input gradient) as a dense layer's, the
        # Problem of one group (see GROUPWISE).
        self.groupwise = self.groupwise_input = None
        if GROUPWISE and 1 < p.groups < p.C:
            one = p._replace(C=self.Cg, OC=self.OCg, groups=1)
            if forward_plan(one).cvec is not None:
                self.groupwise = one
            if self.Cg >= GROUPWISE_INPUT_MIN_CHANNELS and backward_data_plan(one).cvec is not None:
                self.groupwise_input = one
        # Stride-1 1x1 layers without padding: the input itself can serve as its planes
        # (each channel's pixels, rows W apart), since these tiles read only the pixels
        # of the rectangles they visit (no scratch columns); F.conv2d_weight then skips
        # copying it.
        self.wgrad_reads_input = self.wgrad_by_channel and p.pointwise
        # ... and so do those with too few output channels for it that narrow the channels
        # (WGRAD_TRANSPOSED): their weight gradient, transposed, is that of the 1x1 layer from
        # their output channels to their input channels, grad_output as its input and the
        # input as its grad_output, which the layer's planes then are where they are the
        # input itself (conv2d_weight's, the drop-in's; a module keeps padded planes).
        self.wgrad_transposed = None
        if WGRAD_TRANSPOSED and not self.wgrad_by_channel and p.pointwise and p.groups == 1 and p.C > p.OC:
            q = p._replace(C=p.OC, OC=p.C, mode="zeros")
            if forward_plan(q).wgrad_reads_input:   # (q widens the channels: no recursion)
                self.wgrad_transposed = q
                self.wgrad_reads_input = True
        # Its reduction segments: images x pixels whose transposed grad_output fits the cache.
        seg = max(16 * lanes, CACHE_BUDGET // (_geometry.round_up(p.OC, 2 * lanes) * itemsize) // lanes * lanes)
        if seg >= self.grad_len:
            self.ocvec_images, self.ocvec_pixels = max(1, seg // self.grad_len), self.grad_len
        else:
            self.ocvec_images, self.ocvec_pixels = 1, seg
        # Depthwise layers with one output channel per channel sum their weight gradient
        # a vector of channels at a time (KernelSpec.channel_block) on maps of up to
        # WGRAD_CHANNEL_BLOCK_PIXELS output pixels.
        self.wgrad_channel_block = (self.wgrad_kernel.cblock is not None and p.groups == p.C == p.OC
                                    and self.OH * self.OW <= WGRAD_CHANNEL_BLOCK_PIXELS)
        # Weight-gradient reduction segments: images x pixels whose input fits the cache.
        # Dense layers reduce over grad_output extended onto the flat grid (zero scratch
        # columns) as one long row per image: long runs of whole vectors, cut into
        # segments of pixels.  Depthwise and grouped layers read grad_output's own rows
        # (no extended copy; each row's last vector masked), cut into segments of rows;
        # so do dense layers whose grad_output values each feed fewer than
        # WGRAD_FLAT_MIN_MACS multiply-adds (channels x taps: first layers), where the
        # extended copy costs more than its long rows save.
        seg = max(16 * lanes, CACHE_BUDGET // (p.C * self.n_planes * itemsize) // lanes * lanes)
        self.wgrad_flat = p.groups == 1 and self.Cg * self.kk >= WGRAD_FLAT_MIN_MACS
        if self.wgrad_flat:
            self.wgrad_shape = (1, self.grad_len, self.grad_len)  # (rows, columns, input row stride)
            per_image, seg_rows, seg_cols = self.grad_len, 1, min(seg, self.grad_len)
        else:
            self.wgrad_shape = (self.OH, self.OW, self.We)
            per_image, seg_rows, seg_cols = self.OH * self.We, max(1, seg // self.We), self.OW
        if seg >= per_image:
            self.wgrad_segments = (max(1, seg // per_image), self.wgrad_shape[0], self.wgrad_shape[1])
        else:
            self.wgrad_segments = (1, seg_rows, seg_cols)
        # ... or, few output channels, vectorised over input channels (WGRAD_BY_INPUT),
        # reading grad_output's own rows, where the last row's taps lie within the planes;
        # also instead of by channel on some stride-1 layers (ICVEC_INSTEAD).
        max_off = int(self.tap_off.max())
        instead = (ICVEC_INSTEAD and self.wgrad_by_channel and p.groups == 1 and not p.pointwise
                   and p.sh == p.sw == 1
                   and (p.OC < 2 * lanes and _geometry.round_up(p.OC, 2 * lanes) > CVEC_CHANNEL_WASTE * p.OC
                        or self.OH * self.OW <= ICVEC_SMALL_MAP
                        and p.N * self.OH * self.OW >= ICVEC_MIN_PIXELS_PER_WEIGHT * p.C * p.OC * self.kk))
        self.wgrad_by_input = (WGRAD_BY_INPUT and p.groups == 1 and self.kk > 1
                               and (instead or not self.wgrad_by_channel)
                               and self.wgrad_transposed is None and self.wgrad_kernel.icvec is not None
                               and p.C >= ICVEC_MIN_VECTORS * lanes and p.OC >= ICVEC_MIN_OUT_CHANNELS
                               and _geometry.round_up(p.C, lanes) <= CVEC_CHANNEL_WASTE * p.C
                               and self.OH * self.We + max_off <= self.x_chan)
        if self.wgrad_by_input:
            self.icvec_chunking = _icvec_chunking(p.N, self.OH, self.We, p.C, p.OC, self.kk, max_off, itemsize,
                                                  lanes)
            # (not where each item would copy far more of the input than its rows: a
            # stride's other phase planes under a few rows)
            rows, span, _ = self.icvec_chunking
            self.wgrad_by_input = span <= ICVEC_WINDOW_RATIO * rows * self.We
        if self.wgrad_by_input:
            self.wgrad_by_channel, self.wgrad_tiles, self.wgrad_tap_major, self.wgrad_chunks = False, None, False, None
            Cp = _geometry.round_up(p.C, lanes)
            self.icvec_shape = _icvec_shape(self.wgrad_kernel.icvec_tiles, p.OC, Cp // lanes * self.kk)
            self.icvec_table = _icvec_table(p.C, self.kk, lanes, self.tap_off, span,
                                            self.wgrad_kernel.icvec_tiles[self.icvec_shape][1])
            # Its scratch: the work items' partial sums (items, values each), a window per thread.
            items = _geometry.ceil_div(p.N, self.icvec_chunking[2]) * _geometry.ceil_div(self.OH, rows)
            self.icvec_partial, self.icvec_window = (items, p.OC * self.kk * Cp), Cp * span
        # The calls' fixed arguments, gathered once (small layers: each attribute looked up
        # per call costs a share of the convolution's few microseconds).
        self.y_shape = (p.N, p.OC, self.OH, self.OW)
        self.x3_shape = (p.N * p.C, p.H, p.W)
        self.pad_args = (self.rows, self.cols, self.col_interior, self.plane_len)
        self.run_args = (self.G, self.Cg, self.OCg, self.out_len, self.block_len if self.cvec else self.x_chan,
                         self.kk, self.block_off if self.cvec else self.tap_off, self.tap_w, self.We, self.OH,
                         self.OW, self.rblock)
        # Grouped and depthwise forwards pad each (image, group)'s channels just before its
        # tiles run (the kernel's fused form); so do dense ones on the pixel tiles over a
        # batch of small images (DENSE_FUSED_MIN_IMAGES, CACHE_BUDGET).
        self.fused = self.kernel.fused is not None and (
            p.groups != 1 or (DENSE_FUSED and self.cvec is None and self.in_place is None and self.groupwise is None
                              and self.rblock >= self.Cg and p.N >= DENSE_FUSED_MIN_IMAGES
                              and p.C * self.x_chan * itemsize <= CACHE_BUDGET))
        # ... and dense ones on the channel-vector tile (one reduction pass), whose work
        # items each pad an image into its thread's blocks (see _run_fused_images).
        self.cvec_fused = (DENSE_FUSED_CVEC and self.cvec is not None and p.groups == 1 and self.in_place is None
                           and not (self.panels or self.pack_blocks) and self.rblock >= self.Cg
                           and p.N >= DENSE_FUSED_MIN_IMAGES
                           and self.in_blocks * self.block_len * itemsize <= CACHE_BUDGET)
        # One pass of the pixel tiles over every image, from planes padded beforehand.
        # (Dense layers run it where they do not run fused: see _shared_evenly.)
        self.one_pass = (self.cvec is None and (p.groups == 1 or not self.fused) and self.images >= p.N
                         and self.rblock >= self.Cg)
        # On several threads the pixel tiles' one pass, and the channel-vector tiles (but
        # for 1x1 panels and small maps' packed blocks), run in bands when they have enough
        # pixel chunks.
        self.bands = BandSplit(self.one_pass or (self.cvec is not None and not (self.panels or self.pack_blocks)),
                               self.OH, self.row_tiles, self.out_len, chunk, self.We, 0, self.Hq)

    def padding_masks(self, taps):
        """_padding_masks of the forward's taps: True where an output pixel reads only
        zero padding through a tap (nowhere unless the padding is zeros)."""
        p = self.problem
        if p.mode != "zeros":
            return np.zeros((len(taps), self.OH, self.OW), bool)
        return _padding_masks([(t.plane // p.sw, t.plane % p.sw, t.dy, t.dx) for t in taps], self.rows,
                              self.cols, self.OH, self.OW)


def channel_block_strip(plan, threads):
    """(rows per work item, values of each thread's copy) for a plan's channel-block tile
    (ForwardPlan's or BackwardDataPlan's) on `threads` threads, or None where it does
    not run."""
    return None if plan.channel_block is None else plan.channel_block[3].pick(threads)


class ChannelBlockStrips:
    """How a channel-block tile cuts its work: images x blocks of channels x strips of
    `rows` rows, each work item's pixel-major copy per_thread(strip) values long."""

    def __init__(self, p: Problem, rows, per_thread):
        self.items = p.N * _geometry.ceil_div(p.C, LANES[p.dtype])
        self.rows, self.per_thread = rows, per_thread
        self.largest = 0   # the longest strip whose copy fits CHANNEL_BLOCK_MAX_BYTES
        while self.largest < rows and per_thread(self.largest + 1) * ITEMSIZE[p.dtype] <= CHANNEL_BLOCK_MAX_BYTES:
            self.largest += 1

    def pick(self, threads):
        """(rows per work item, values of each thread's copy) on `threads` threads, or None
        if one row's copy is too large: strips short enough for 8 work items per thread
        (balance)."""
        if not self.largest:
            return None
        strips = _geometry.ceil_div(8 * threads, self.items) if threads > 1 else 1
        strip = min(self.largest, _geometry.ceil_div(self.rows, strips))
        return strip, self.per_thread(strip)


class BackwardDataPlan:
    """Geometry of the input gradient: per stride phase of the padded input, a
    correlation of grad_output (bordered by `halo` zeros) with that phase's taps.

    The rows of grad_output are `width` apart; reads past a row's end wrap onto the
    next row's zero border, so `width` need only hold a row's data.  With stride 1
    and zero padding only the gradient of real input pixels is computed (the padded
    border would be dropped); otherwise the whole padded plane, folded back after."""

    def __init__(self, fp: ForwardPlan):
        p = fp.problem
        self.kernel = _dispatch.lookup("bwd_data", p)
        lanes, itemsize = LANES[p.dtype], ITEMSIZE[p.dtype]
        self.top, self.left = _geometry.bwd_data_halo(p.KH, p.KW, p.sh, p.sw, p.dh, p.dw)
        self.width = max(fp.We, fp.OW + self.left)
        interior = p.sh == p.sw == 1 and p.mode == "zeros"
        out_rows = p.H if interior else fp.Hq
        shift = p.pad_top * self.width + p.pad_left if interior else 0
        self.tile, chunk = self.kernel.pick_tile(fp.Cg, out_rows * self.width)
        # As in the forward: the channel-vector tile on dense layers with enough channels,
        # over grad_output in pixel-major blocks (its row tiles skip a dilated layer's
        # wide halo).
        self.out_rows, self.out_cols = out_rows, (p.W if interior else fp.We)
        layout = _cvec_layout(self.kernel.cvec, fp.Cg, fp.OCg, fp.kk, p.N, out_rows, self.out_cols, self.width)
        # As the forward's pack_blocks (on the input's pixels), at stride 1: every stride
        # phase's items would read their blocks' weights whole again for their few taps
        # (ResNet's strided 3x3 at 28x28, 2 threads: 0.82x).  (Input gradient, 2 threads,
        # against the pixel tiles: ResNet's 3x3 256 at 14x14 1.13x, 128 at 14x14 1.08x,
        # 512 at 7x7 in a batch of 2 1.10x, AlexNet's 384 at 13x13 1.18x, 5x5 64 at 14x14
        # 1.16x, 192 at 12x12 and 17x17 1.01-1.02x.)
        self.pack_blocks = False
        if layout is None and p.sh == p.sw == 1:
            layout = _small_map_layout(self.kernel.cvec, p.dtype, fp.Cg, fp.OCg, fp.kk, p.N * p.H * p.W,
                                       (p.N, out_rows, self.out_cols, self.width), {})
            self.pack_blocks = layout is not None
        self.cvec = None if layout is None else self.kernel.cvec
        self.row_tiles = layout or 0
        if self.cvec is not None:
            self.tile, chunk, width = self.cvec[:3]
            self.blocks = _geometry.ceil_div(fp.Cg, width)
        phases = _geometry.bwd_data_phases(p.KH, p.KW, p.sh, p.sw, p.dh, p.dw)
        self.out_len = _geometry.round_up(out_rows * self.width, chunk)

        def bordered(rows):
            """pad_blocked's one-phase tables of grad_output bordered by the halo, for
            `rows` rows: rows, columns and the columns that copy grad_output."""
            return (_index([i - self.top if 0 <= i - self.top < fp.OH else -1 for i in range(rows)]).reshape(1, rows),
                    _index([j - self.left if 0 <= j - self.left < fp.OW else -1
                            for j in range(self.width)]).reshape(1, self.width),
                    _index([self.left, self.left + fp.OW]).reshape(1, 2))

        # As the forward's row tiles.  They skip the taps that read only grad_output's
        # zero border where they store into gx (stride 1, zero padding: one phase).
        self.tile_cols, self.tap_skips = None, None
        masks = None
        if self.cvec is not None and interior and (self.row_tiles or self.width > self.out_cols):
            taps = [(0, 0, t.dy + p.pad_top, t.dx + p.pad_left) for t in phases[0]]
            rows, cols, _ = bordered(out_rows + max(t[2] for t in taps) + 1)
            masks = _padding_masks(taps, rows, cols, out_rows, self.out_cols)
        tiling = None
        floor = 0 if self.cvec is None else _latency_pixels(self.cvec, p.dtype, False)
        if self.row_tiles:
            tiling = _row_tiling(np.zeros((1, out_rows, self.out_cols), bool) if masks is None else masks,
                                 _tile_forms(self.cvec), 0, floor)
        elif masks is not None:   # (as the forward's; no row pairs here)
            tiling = _priced_row_tiling(masks, _tile_forms(self.cvec), 0, self.out_len, chunk, floor)
        if tiling is not None:
            forms = _tile_forms(self.cvec)
            self.tile_cols, skip, _ = tiling
            self.tap_skips = None if skip is None else [skip]
            self.row_tiles = len(self.tile_cols)
            self.out_len = _row_tiled_length(self.out_len, out_rows, self.width, self.tile_cols, forms, chunk)
        self.tiled_len = out_rows * self.row_tiles * chunk if self.row_tiles else self.out_len  # as the forward's
        self.plane_len = _geometry.round_up(self.out_len + shift + self.top * self.width + self.left, lanes)
        self.phase_offs = [_index([shift + t.dy * self.width + t.dx for t in taps]) for taps in phases]
        self.phase_ws = [_index([t.w_index for t in taps]) for taps in phases]
        self.phase_pos = [_tap_positions(ws, fp.kk) for ws in self.phase_ws]   # (pack_blocks)
        if interior:  # output row i, column j is input pixel (i, j)
            self.fold_rows = np.arange(p.H, dtype=np.intp).reshape(1, p.H)
            self.fold_cols = np.arange(p.W, dtype=np.intp).reshape(1, p.W)
            self.fold_interior = np.array([[0, p.W]], dtype=np.intp)
            self.fold_pad_left = 0
        else:
            self.fold_rows, self.fold_cols, self.fold_interior = fp.rows, fp.cols, fp.col_interior
            self.fold_pad_left = p.pad_left
        self.n_planes = len(phases)
        # Stride 1 with zero padding: the one phase's flat rows are the input's rows, and
        # the kernels store their real pixels straight into gx (no fold pass).
        self.direct = interior
        # The channel-vector tile reads grad_output bordered alike, in blocks of `lanes`
        # channels, pixel-major: pad_blocked's one-phase tables (rows, columns,
        # interior), its planes' length and the taps' offsets there.
        if self.cvec is not None:
            rows = _geometry.ceil_div(self.plane_len, self.width)
            self.block_plane = _geometry.round_up(rows * self.width, lanes)
            # (an image's blocks, and each one's values: as ForwardPlan.in_blocks, block_len)
            self.gy_blocks, self.gy_block_len = _geometry.ceil_div(p.OC, lanes), self.block_plane * lanes
            self.block_tables = bordered(rows)
            self.block_offs = [offs * lanes for offs in self.phase_offs]
        self.tiles_inner = fp.kk == 1 and fp.OCg > fp.Cg  # as ForwardPlan.tiles_inner, roles swapped
        # As ForwardPlan.panels: grad_output is its own flat grid (no halo, one phase).
        # (Zero padding only shifts grad_output's grid against the input's, which the panels
        # do not: a padded 1x1 layer's input gradient came out wrong.)
        self.panels = (self.cvec is not None and p.pointwise and self.tiles_inner and interior
                       and self.width == fp.OW and not self.row_tiles and not self.pack_blocks and PANELS)
        self.rblock = _reduction_block(fp.OCg, self.plane_len * itemsize, fp.kk)
        l1_passes = self.cvec is None and fp.kk == 1 and p.OC * fp.Cg * itemsize >= L1_PASS_MIN_WEIGHT_BYTES
        if l1_passes:
            self.rblock = min(self.rblock, _l1_pass(fp.OCg, self.plane_len * itemsize))
        # As the forward's bands (but for panels): output row i reads grad_output's
        # bordered rows from shift // width + i on.  (2 threads, module backward against
        # the dynamic schedule, 5 alternating rounds, channel-vector tiles: DeepLab's
        # rate-2 layer 1.13x, ResNet's 3x3 1.04x, its strided 3x3 and the reflect layer
        # 1.02x, ASPP and Inception 0.995x.  Pixel tiles, 11 rounds: the 7x7 stem 1.08x,
        # 16 -> 16 3x3 at 64x64 1.09x, 8 -> 8 at 128x128 1.06x, 3 -> 64 at 224x224 1.02x.)
        self.bands = BandSplit(not (self.panels or self.pack_blocks), out_rows, self.row_tiles, self.out_len, chunk,
                               self.width, shift // self.width, _geometry.ceil_div(self.plane_len, self.width))
        # Dense pixel tiles whose one tile of rows holds every input channel (first layers:
        # 3 channels) make the work items plain runs of pixels, which a static partition
        # keeps on one core through every pass and phase, with their partial sums and rows
        # of grad_output; handed out dynamically they move between the cores.  (2 threads:
        # the 7x7 stem's input gradient 2.35 -> 1.93 ms, 3 -> 64 3x3 at 224x224 1.95 ->
        # 1.66 ms, 8 -> 64 5x5 stride 2 0.63 -> 0.53 ms; 16 channels in two tiles of rows
        # ran 0.91x as fast.)
        # So do the L1 passes: each thread keeps the same tiles, their partial sums and
        # columns of weights, through every pass (2 threads: ResNet's 512 -> 2048 at 7x7
        # 1.05x, 2048 -> 512 and 1024 -> 2048 1.015x).
        self.static_schedule = fp.static_schedule or (self.cvec is None and p.groups == 1
                                                      and fp.Cg <= self.kernel.variants[self.tile][0]) or (
            l1_passes and self.rblock < fp.OCg)
        if self.cvec is not None:  # as the forward's
            self.rblock = fp.OCg if self.panels or self.pack_blocks else _cvec_pass(fp.OCg, self.rblock, lanes)
        if self.panels:
            self.panel_pixels = _panel_pixels(p, fp.OCg, self.cvec[1])
        # (images, groups) per block: whole images while they fit, else groups of one image.
        group_bytes = (fp.OCg * self.plane_len + fp.Cg * self.n_planes * self.out_len) * itemsize
        fit = max(1, (CACHE_BUDGET if self.cvec is None else CVEC_IMAGE_BUDGET) // group_bytes)
        self.block = (max(1, min(p.N, fit // fp.G)), fp.G) if fit >= fp.G else (1, fit)
        # Extend, the phases' tiles and fold fused, an item per (image, group) in each
        # thread's scratch (fused_len values): depthwise layers (a group: a channel), and
        # dense ones on the pixel tiles over batches of small images (as the forward's
        # DENSE_FUSED; a group: an image).
        self.fused_len = None
        dense_fused = (DENSE_FUSED_INPUT and p.groups == 1 and self.cvec is None and self.rblock >= fp.OCg
                       and p.N >= DENSE_FUSED_MIN_IMAGES and group_bytes <= CACHE_BUDGET)
        if self.kernel.fused is not None and (p.groups != 1 or dense_fused):
            self.fused_len = _geometry.round_up(group_bytes // itemsize, lanes)
        # ... and on the channel-vector tile, stored straight into the input gradient in one
        # reduction pass: each work item borders an image's grad_output into its thread's
        # blocks (the forward's cvec_fused; see _run_fused_images).
        self.cvec_fused = (DENSE_FUSED_CVEC_INPUT and self.cvec is not None and p.groups == 1 and self.direct
                           and not (self.panels or self.pack_blocks) and self.rblock >= fp.OCg
                           and p.N >= DENSE_FUSED_MIN_IMAGES
                           and self.gy_blocks * self.gy_block_len * itemsize <= CACHE_BUDGET)
        # Depthwise stride-2 layers (zero padding, one output channel per channel) run the
        # channel-block tile, over grad_output's zero-bordered pixel-major copy:
        # (its rows / columns tables, the copy's columns' interior, strips).
        self.channel_block = None
        if self.kernel.cblock is not None and p.groups == p.C == p.OC and p.mode == "zeros":
            border, k = p.KH // 2, p.KH    # as codegen's channel-block border
            hg = (p.H - 1 + p.pad_top) // 2 + border + 1
            wg = (_geometry.round_up(p.W, lanes) + p.pad_left) // 2 + border + lanes // 2 + 2
            rows = _index([u - border if 0 <= u - border < fp.OH else -1 for u in range(hg)]).reshape(1, hg)
            cols = _index([v - border if 0 <= v - border < fp.OW else -1 for v in range(wg)]).reshape(1, wg)
            interior = _index([border, min(wg, border + fp.OW)]).reshape(1, 2)

            def per_thread(strip):
                return ((strip + k) // 2 + 1) * wg * lanes + lanes * lanes

            self.channel_block = (rows, cols, interior, ChannelBlockStrips(p, p.H, per_thread))


@lru_cache(maxsize=256)
def forward_plan(p: Problem) -> ForwardPlan:
    return ForwardPlan(p)


def inference_plan(p: Problem) -> ForwardPlan:
    """The plan of a forward that keeps nothing for a backward: forward_plan(p) unless the
    channel-vector tile's rules for such forwards (CVEC_MIN_CHANNELS_INFERENCE,
    PACK_BLOCK_MIN_PIXELS_INFERENCE) or the in-place one (IN_PLACE_INFERENCE_MAX_PIXELS)
    reach it.  Kept on forward_plan(p)'s plan, so that
    clearing its cache clears both."""
    fp = forward_plan(p)
    if fp.inference_twin is None:
        pixels = p.N * fp.OH * fp.OW
        reaches = fp.kk > 1 and (CVEC_MIN_CHANNELS_INFERENCE <= fp.Cg < CVEC_MIN_CHANNELS or (
            fp.cvec is None and PACK_BLOCK_MIN_PIXELS_INFERENCE <= pixels < PACK_BLOCK_MIN_PIXELS))
        reaches = reaches or (p.pointwise and p.groups == 1 and fp.in_place is None
                              and p.H * p.W <= IN_PLACE_INFERENCE_MAX_PIXELS)
        fp.inference_twin = ForwardPlan(p, inference=True) if reaches else fp
    return fp.inference_twin


def frozen_plan(p: Problem) -> ForwardPlan:
    """The plan of an inference forward whose weights stay as they are between calls
    (Conv2d.freeze: the caller keeps them packed, see forward's `packs`): a frozen
    ForwardPlan where it runs the channel-vector tile, which then packs nothing per
    call, else inference_plan(p).  Kept on forward_plan(p)'s plan, as inference_plan's
    is."""
    fp = forward_plan(p)
    if fp.frozen_twin is None:
        frozen = ForwardPlan(p, frozen=True)
        fp.frozen_twin = frozen if frozen.cvec is not None else inference_plan(p)
    return fp.frozen_twin


@lru_cache(maxsize=256)
def backward_data_plan(p: Problem) -> BackwardDataPlan:
    return BackwardDataPlan(forward_plan(p))


@lru_cache(maxsize=256)
def patch_pointwise(p: Problem, inference=False):
    """A layer without padding whose windows do not overlap (a 1x1 layer with a stride,
    ResNet's downsampling shortcuts; a patch embedding, ViT's 16x16 at stride 16) reads
    each input pixel at most once: it is a stride-1 1x1 layer over its windows gathered
    as channels (KH * KW per input channel, tap-major within each: the weight's own
    order), whose Problem this returns (else None).  Its forward runs on the gathered
    windows, its input gradient is that layer's scattered back with zeros between, and
    its weight gradient reads their planes (a quarter of the input for a 1x1 layer at
    stride 2, one phase instead of four).  Windows of more than one pixel are taken from
    PATCH_MIN_TAPS pixels (inference: a forward keeping nothing for a weight gradient,
    PATCH_MIN_TAPS_INFERENCE), for dense layers only (a grouped or depthwise layer's
    gathered channels would make many small groups)."""
    windows = (p.KH - 1) * p.dh + 1, (p.KW - 1) * p.dw + 1
    taps = p.KH * p.KW
    if (windows[0] > p.sh or windows[1] > p.sw or (p.KH, p.KW, p.sh, p.sw) == (1, 1, 1, 1)
            or any((p.pad_top, p.pad_bottom, p.pad_left, p.pad_right))
            or (taps > 1 and (p.groups > 1 or taps < (PATCH_MIN_TAPS_INFERENCE if inference else PATCH_MIN_TAPS)))):
        return None
    OH, OW = p.output_hw
    return p._replace(C=p.C * p.KH * p.KW, H=OH, W=OW, KH=1, KW=1, sh=1, sw=1, dh=1, dw=1, mode="zeros")


def _window_geometry(p: Problem, q: Problem):
    """_layout.windows' geometry of layer p, whose 1x1 layer q is (q's maps are p's output's)."""
    return (p.H, p.W, q.H, q.W, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw)


def _gathered(x, p, q, threads):
    """x's windows that layer p reads, as the (N, C * KH * KW, OH, OW) input of its 1x1
    layer q (scratch: valid until the next call)."""
    xs = scratch("window_input", (q.N, q.C, q.H, q.W), x.dtype)
    _layout.windows(x.reshape(p.N * p.C, p.H, p.W), xs.reshape(q.N * q.C, q.H, q.W), _window_geometry(p, q), False,
                    threads)
    return xs


def _pointwise_weight(weight, q):
    """The weight (OC, C/groups, KH, KW) as 1x1 layer q's (a view: same order)."""
    return weight if weight.shape[2] == weight.shape[3] == 1 else weight.reshape(q.OC, q.C // q.groups, 1, 1)


def pad_phase(x, fp: ForwardPlan, temporary=False):
    """x (N, C, H, W) -> (padded phase planes (N, C, n_planes * plane_len), whether they
    hold an infinity or a NaN).  temporary: the planes live in scratch memory (valid
    until the next such call on this thread), for a caller that does not keep them."""
    p = fp.problem
    q = patch_pointwise(p)
    if q is not None:   # (the planes of the 1x1 layer it runs as)
        fq = forward_plan(q)
        return pad_phase(_gathered(x, p, q, threads_for(fq.work, fq.values)), fq, temporary)
    shape = (p.N * p.C, fp.x_chan)
    xin = scratch("temporary_planes", shape, x.dtype) if temporary else aligned_empty(shape, x.dtype)
    nonfinite = _layout.pad_phase(x.reshape(fp.x3_shape), xin, *fp.pad_args, threads_for(fp.work, fp.values))
    return xin, nonfinite


_ORIGIN = np.zeros(1, dtype=np.intp)   # a 1x1 layer's one tap: offset and weight index 0


def planes_in_place(x, p: Problem):
    """x (N, C, H, W) itself as its planes for the weight gradient, (N * C, H * W), where
    they would hold the same values (ForwardPlan.wgrad_reads_input), else None."""
    return x.reshape(p.N * p.C, p.H * p.W) if forward_plan(p).wgrad_reads_input else None


def _kept_planes(fp, x, recycle):
    """Memory for the padded planes a forward keeps for the weight gradient: `recycle`
    (a dead xin from an earlier call) where it has the right size, else new."""
    shape = (fp.problem.N * fp.problem.C, fp.x_chan)
    if recycle is not None and recycle.shape == shape and recycle.dtype == x.dtype:
        return recycle
    return aligned_empty(shape, x.dtype)


def forward(x, weight, bias, p: Problem, recycle=None, keep=True, share_input=False, out=None, packs=None):
    """Returns (y, xin, nonfinite): the output, the padded input planes kept for the
    weight gradient (so a caller changing x after forward cannot change the gradient),
    and whether x holds an infinity or a NaN (see backward_params).
    recycle: a dead xin from an earlier call, reused when it has the right size.
    keep=False: no backward will follow, so the planes live in reused scratch memory,
    a block of images (or, depthwise, a channel per thread) at a time, and
    (y, None, False) is returned.
    share_input: the caller guarantees x will not change before the backward, so a
    layer whose forward reads x in place (1x1 panels) and whose weight gradient can
    too (ForwardPlan.wgrad_reads_input) keeps x itself as its planes: no copy, and
    nonfinite False (those tiles multiply real pixels only).
    out: a C-contiguous array of the output's shape and dtype to write y into.
    packs: with keep=False, a dict the caller keeps for as long as weight and bias stay
    as they are (Conv2d.freeze: read-only copies): the weights packed for the
    channel-vector tile by the first call of each plan, reused by the next (frozen_plan).
    The steps depend only on the plan, the threads, keep, share_input and x's alignment,
    so they are worked out once (_forward_route) and kept on the plan: after a kernel has
    swept the caches every Python call costs microseconds, so a call runs few."""
    fp = forward_plan(p)
    if packs is not None and not keep:
        fp = fp.frozen_twin if fp.frozen_twin is not None else frozen_plan(p)
    elif not keep:
        fp = fp.inference_twin if fp.inference_twin is not None else inference_plan(p)
    threads = 1 if fp.work < SMALL_WORK and fp.values < SMALL_VALUES else get_num_threads()   # (threads_for's)
    aligned = fp.in_place_aligned is not None and (IN_PLACE_ANY_ADDRESS or _layout.address(x) % ALIGN == 0)
    key = (keep, share_input, threads, aligned)
    route = fp.routes.get(key)
    if route is None:
        route = fp.routes[key] = _forward_route(fp, keep, share_input, threads, aligned)
    return route(x, weight, bias, recycle, out, packs)


def _forward_route(fp, keep, share_input, threads, aligned):
    """forward()'s steps for plan fp on `threads` threads, as a function
    (x, weight, bias, recycle, out) -> (y, xin, nonfinite); aligned: x's data starts on
    an ALIGN boundary.  Whatever does not depend on the arrays is decided here, once:
    which kernels run, their fixed arguments and the sizes of their scratch memory.
    (So are the settings it reads, BAND_MIN_CHUNKS or PACK_COPY_BYTES, as a plan's are
    when it is made: whoever changes one clears the plans, which hold the routes.)"""
    p = fp.problem
    q = patch_pointwise(p, inference=not keep)
    if q is not None:   # (share_input does not apply: the gathered windows are a copy)
        fq = forward_plan(q)
        gather_threads = threads_for(fq.work, fq.values)

        def patches(x, weight, bias, recycle, out, packs):
            return forward(_gathered(x, p, q, gather_threads), _pointwise_weight(weight, q), bias, q, recycle, keep,
                           out=out, packs=packs)
        return patches
    y_shape = fp.y_shape
    if fp.groupwise is not None:
        def groupwise(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            return _forward_groupwise(x, weight, bias, fp, y, recycle, keep, threads)
        return groupwise
    if fp.channel_block is not None and (not keep or fp.channel_block_keeps):
        # Depthwise: the channel-block tile reads x itself; planes kept for the weight
        # gradient are a copy of their own.
        rows, cols, interior, _ = fp.channel_block
        whole_map = fp.channel_block_map is not None
        strip = (fp.OH, fp.channel_block_map) if whole_map else channel_block_strip(fp, threads)
        if strip is not None:
            cblock_args = (p.N, p.C, fp.OH, fp.OW, rows, cols, interior, *strip, threads, whole_map)
            kept = _padded_planes_route(fp, keep, False, threads)

            def channel_block(x, weight, bias, recycle, out, packs):
                y = np.empty(y_shape, dtype=x.dtype) if out is None else out
                xin, nonfinite = (None, False) if kept is None else kept(x, recycle)
                xp = scratch("fwd_pixel_major", (threads * strip[1],), x.dtype)
                fp.kernel.cblock(x, weight, bias, y, xp, *cblock_args)
                return y, xin, nonfinite
            return channel_block
    fused, cvec_fused = _runs_fused(fp.fused, p, threads), _runs_fused(fp.cvec_fused, p, threads)
    in_place = fp.in_place
    if in_place is None and fp.in_place_aligned is not None and aligned:
        in_place = fp.in_place_aligned
    shared = keep and share_input and (fp.panels or in_place) and fp.wgrad_reads_input
    # (the planes kept for the weight gradient where the kernels read none themselves)
    padded = _padded_planes_route(fp, keep, shared, threads)
    if in_place:
        def pixels_in_place(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            _run_in_place(fp, in_place, x, weight, bias, y, threads)
            xin, nonfinite = (None, False) if padded is None else padded(x, recycle)
            return y, xin, nonfinite
        return pixels_in_place
    planes = _planes_route(fp, keep, shared, (threads * fp.Cg if fused else fp.images * p.C, fp.x_chan))
    if fp.one_pass and not fused:
        # (most small layers: every image in one pass of the pixel tiles)
        bands = fp.bands(threads)
        one_pass_kw = dict(static_schedule=fp.static_schedule, banded=bands is not None)

        def one_pass(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            xin = None if planes is None else planes(x, recycle)
            # (only planes kept for the weight gradient are checked for infinities and NaNs)
            nonfinite = _layout.pad_phase(x.reshape(fp.x3_shape), xin, *fp.pad_args, threads, bands, check=keep)
            fp.kernel.run(xin, weight, bias, y, None, p.N, *fp.run_args, threads, fp.tile, **one_pass_kw)
            return (y, xin, nonfinite) if keep else (y, None, False)
        return one_pass
    if fused:
        fused_args = (p.N, p.C, fp.OCg, fp.out_len, fp.kk, fp.tap_off, fp.tap_w, fp.We, fp.OH, fp.OW, fp.rows, fp.cols,
                      fp.col_interior, fp.plane_len, threads, fp.tile, -1 if fp.row_block is None else fp.row_block,
                      keep, fp.Cg, fp.static_schedule)

        def fused_planes(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            xin = None if planes is None else planes(x, recycle)
            flags = np.zeros(p.N * p.C, dtype=np.intc)
            fp.kernel.fused(x, xin, flags, weight, bias, y, *fused_args)
            return (y, xin, bool(flags.any())) if keep else (y, None, False)
        return fused_planes
    bands = None if cvec_fused else fp.bands(threads)   # (None on the pixel tiles' passes: one pass only)
    prepare, wp_copy = _packing_route(fp, threads, bands, cvec_fused)
    if cvec_fused:   # (each work item pads its image's blocks: see _run_fused_images)
        blocks_shape = (threads, fp.in_blocks * fp.block_len)

        def cvec_fused_images(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            xin, nonfinite = (None, False) if padded is None else padded(x, recycle)
            packed, skip, _, _ = prepare(weight, bias, x.dtype, packs)
            x3 = x.reshape(fp.x3_shape)
            blocks = scratch("fwd_fused_blocks", blocks_shape, x.dtype)
            fp.kernel.run(x3, weight, bias, y, None, p.N, *fp.run_args, threads, fp.tile, *packed, skip=skip,
                          pairs=fp.row_pairs, fused=(x3, *fp.pad_args, p.pad_left, blocks))
            return (y, xin, nonfinite) if keep else (y, None, False)
        return cvec_fused_images
    if fp.panels:
        panels_shape = (threads, fp.in_blocks * LANES[p.dtype] * fp.panel_pixels)
        flat = (p.N * p.C, p.H * p.W)
        panel_args = (p.N, fp.G, fp.Cg, fp.OCg, fp.out_len, 0, fp.kk, fp.tap_off, fp.tap_w, fp.We, fp.OH, fp.OW,
                      fp.rblock, threads, fp.tile)

        def panels(x, weight, bias, recycle, out, packs):
            y = np.empty(y_shape, dtype=x.dtype) if out is None else out
            xin, nonfinite = (None, False) if padded is None else padded(x, recycle)
            packed, _, _, _ = prepare(weight, bias, x.dtype, packs)
            fp.kernel.run(x.reshape(flat), weight, bias, y, None, *panel_args, *packed,
                          panels=scratch("fwd_panels", panels_shape, x.dtype))
            return (y, xin, nonfinite) if keep else (y, None, False)
        return panels
    # A few images at a time: their padded planes are still in cache for the kernel.
    image_blocks = [(n0, min(p.N, n0 + fp.images)) for n0 in range(0, p.N, fp.images)]
    pad_blocked_tail = (p.C, *fp.pad_args, p.pad_left, threads, bands)
    run_kw = dict(static_schedule=fp.static_schedule, banded=bands is not None, wp_copy=wp_copy, pairs=fp.row_pairs,
                  pack_positions=fp.tap_pos if fp.pack_blocks else None,
                  band_sub=BAND_SUB_ROWS * fp.row_tiles)   # (used in bands and on one thread only)

    def by_images(x, weight, bias, recycle, out, packs):
        y = np.empty(y_shape, dtype=x.dtype) if out is None else out
        xin = None if planes is None else planes(x, recycle)
        packed, skip, yext, xblocks = prepare(weight, bias, x.dtype, packs)
        x3 = x.reshape(fp.x3_shape)
        nonfinite = False
        for n0, n1 in image_blocks:
            x3b, yb = (x3, y) if n1 - n0 == p.N else (x3[n0 * p.C:n1 * p.C], y[n0:n1])
            if xin is not None:
                # kept planes: each block its own; scratch planes: the same ones for every block
                first = n0 * p.C if keep else 0
                xb = xin if n1 - n0 == len(xin) // p.C else xin[first:first + (n1 - n0) * p.C]
                nonfinite |= _layout.pad_phase(x3b, xb, *fp.pad_args, threads, check=keep)
            if xblocks is not None:
                # the channel-vector tile reads its own copy: blocks of channels, pixel-major
                xb = xblocks if n1 - n0 == fp.images else xblocks[:(n1 - n0) * fp.in_blocks]
                fp.kernel.pad_blocked(x3b, xb, *pad_blocked_tail)
            fp.kernel.run(xb, weight, bias, yb, yext, n1 - n0, *fp.run_args, threads, fp.tile, *packed, skip=skip,
                          **run_kw)
        return (y, xin, nonfinite) if keep else (y, None, False)
    return by_images


def _planes_route(fp, keep, shared, scratch_shape):
    """(x, recycle) -> the padded planes a forward writes, or None where it writes none
    (keeping nothing, the channel-vector tile reads only its pixel-major blocks):
    scratch memory of scratch_shape when it keeps nothing, x itself when shared, else
    kept planes."""
    if not keep:
        if fp.cvec is not None:
            return None
        return lambda x, recycle: scratch("fwd_planes", scratch_shape, x.dtype)
    if shared:
        return lambda x, recycle: planes_in_place(x, fp.problem)
    return lambda x, recycle: _kept_planes(fp, x, recycle)


def _padded_planes_route(fp, keep, shared, threads):
    """(x, recycle) -> (the planes kept for the weight gradient, whether they hold an
    infinity or a NaN), padded whole, for the routes whose kernels read none themselves
    (the depthwise channel-block tile, the 1x1 pixel tiles in place, the channel-vector
    tile's fused images and its panels): x itself when shared; a copy of x's rows where
    they are the planes (COPY_KEPT_ROWS); None (no call) when nothing is kept."""
    if not keep:
        return None
    if shared:
        return lambda x, recycle: (planes_in_place(x, fp.problem), False)
    if COPY_KEPT_ROWS and fp.wgrad_reads_input and fp.wgrad_by_channel:
        p = fp.problem
        flat = (p.N * p.C, p.H * p.W)
        copy_threads = threads if p.N * p.C * fp.x_chan * ITEMSIZE[p.dtype] > COPY_MIN_BYTES else 1

        def copied(x, recycle):   # (see COPY_KEPT_ROWS)
            xin = _kept_planes(fp, x, recycle)
            _layout.copy_rows(x.reshape(flat), xin, copy_threads)
            return xin, False
        return copied

    def kept(x, recycle):
        xin = _kept_planes(fp, x, recycle)
        return xin, _layout.pad_phase(x.reshape(fp.x3_shape), xin, *fp.pad_args, threads)
    return kept


def _packing_route(fp, threads, bands, cvec_fused):
    """(prepare, wp_copy): prepare(weight, bias, dtype, packs) -> (run()'s trailing
    arguments wp, bp, part, tile_cols, tiles_inner; skip; yext; the blocked input's
    scratch or None), packing the weights for the channel-vector tile (a frozen plan's:
    into packs[fp], once; see forward); wp_copy as run() takes it."""
    p = fp.problem
    if fp.cvec is None:
        packed = (None, None, None, None, fp.tiles_inner)
        yext_shape = (fp.images * p.OC, fp.out_len) if fp.rblock < fp.Cg else None

        def pixel_tiles(weight, bias, dtype, packs):
            return packed, None, None if yext_shape is None else scratch("yext", yext_shape, dtype), None
        return pixel_tiles, 0
    width = fp.cvec[2]
    wp_copy = 0
    frozen = fp.frozen
    if frozen:   # (one copy, packed once: threads reading the same lines cost nothing)
        wp_shape = (fp.G * fp.blocks * fp.in_blocks * LANES[p.dtype] * len(fp.tap_w) * width,)
        copies = 1
    elif fp.pack_blocks:   # (the kernel packs one block of output channels at a time per thread)
        wp_shape = (threads * _packed_block_values(p.dtype, fp.Cg, fp.kk, width),)
        copies = 1
    else:
        wp_len = fp.G * fp.blocks * fp.in_blocks * LANES[p.dtype] * len(fp.tap_w) * width
        copies = threads if bands is not None and threads * wp_len * ITEMSIZE[p.dtype] <= PACK_COPY_BYTES else 1
        wp_copy = wp_len if copies > 1 else 0
        wp_shape = (copies * wp_len,)
    bp_shape = (fp.G * fp.blocks * width,)
    pack_args = (fp.G, fp.OCg, fp.Cg, fp.OCg * fp.Cg * fp.kk, fp.Cg * fp.kk, fp.kk, fp.tap_w, width, threads, copies)
    pack_kw = dict(weights=not fp.pack_blocks, positions=fp.tap_pos)
    # scratch memory: packed weights and bias, then the partial sums and the blocked input
    # where they are used
    memory = [("wp", wp_shape), ("bp", bp_shape)]
    with_part = fp.rblock < fp.Cg
    if with_part:
        memory.append(("part", (fp.images * fp.G * fp.blocks * fp.tiled_len * width,)))
    with_blocks = not (fp.panels or cvec_fused)
    if with_blocks:
        memory.append(("fwd_blocked", (fp.images * fp.in_blocks, fp.block_len)))

    def channel_vectors(weight, bias, dtype, packs):
        views = scratches(memory, dtype)
        wp, bp = views[0], views[1]
        nonfinite_weight = fp.kernel.pack(weight, bias, wp, bp, *pack_args, **pack_kw)
        packed = (wp, bp, views[2] if with_part else None, fp.tile_cols, fp.tiles_inner)
        return packed, None if nonfinite_weight else fp.tap_skip, None, views[-1] if with_blocks else None

    def pack_whole(weight, bias, dtype):
        wp, bp = np.empty(wp_shape, dtype), np.empty(bp_shape, dtype)
        return wp, bp, fp.kernel.pack(weight, bias, wp, bp, *pack_args, **pack_kw)

    def packed_once(weight, bias, dtype, packs):
        wp, bp, nonfinite_weight = _frozen_pack(packs, fp, pack_whole, weight, bias, dtype)
        views = scratches(memory[2:], dtype)
        packed = (wp, bp, views[0] if with_part else None, fp.tile_cols, fp.tiles_inner)
        return packed, None if nonfinite_weight else fp.tap_skip, None, views[-1] if with_blocks else None
    return packed_once if frozen else channel_vectors, wp_copy


def _frozen_pack(packs, plan, pack, *args):
    """packs[plan], made by pack(*args) if it is not there: a frozen module's packed
    weights (see forward's packs), keeping those of at most FROZEN_PACKS plans."""
    kept = packs.get(plan)
    if kept is None:
        if len(packs) >= FROZEN_PACKS:
            packs.clear()
        kept = packs[plan] = pack(*args)
    return kept


def _run_in_place(fp, plan, x, weight, bias, y, threads, weight_transposed=False, rblock=None):
    """The pixel tiles of a 1x1 layer's forward over its input x itself, as `plan` (an
    InPlacePlan: ForwardPlan.in_place's) says; weight_transposed: weight is the (C, OC)
    weight of the layer whose input gradient this forward computes; rblock: input channels
    per reduction pass (a whole number of vectors; None: one pass), the partial sums in
    scratch memory between passes.  (No rule runs passes: measured slower than one pass
    since the tiles prefetch, see IN_PLACE_TILES_INNER.)"""
    p = fp.problem
    tile, out_len, left, tiles_inner = plan
    # (each image's pixels past the chunks, copied there channels contiguous)
    leftover = scratch("fwd_leftover", (p.N, left, p.C), x.dtype) if left else None
    # Planes that all start the same way past a cache line are read from the line's start
    # (IN_PLACE_SHIFT): no load then straddles two lines.
    pixels, shift = p.H * p.W, 0
    if IN_PLACE_SHIFT and not left and pixels * x.itemsize % ALIGN == 0:
        shift = _layout.address(x) % ALIGN // x.itemsize
        out_len = _geometry.round_up(pixels + shift, fp.kernel.variants[tile][2])
    rblock = p.C if rblock is None else rblock
    sums = scratch("fwd_in_place_sums", (p.N * p.OC, out_len), x.dtype) if rblock < p.C else None
    fp.kernel.run(x.reshape(p.N * p.C, pixels), weight, bias, y, sums, p.N, 1, p.C, p.OC, out_len, pixels, 1,
                  _ORIGIN, _ORIGIN, p.W, p.H, p.W, rblock, threads, tile, tiles_inner=tiles_inner, static_schedule=True,
                  in_place=True, leftover=leftover, weight_transposed=weight_transposed, x_shift=shift)


def _group(a, g, per_group, name):
    """Group g's channels of a (N, channels, ...) array, C-contiguous: a view for one image,
    else a copy in scratch memory `name`."""
    part = a[:, g * per_group:(g + 1) * per_group]
    if len(a) == 1:
        return part
    copy = scratch(name, part.shape, a.dtype)
    np.copyto(copy, part)
    return copy


def _forward_groupwise(x, weight, bias, fp, y, recycle, keep, threads):
    """forward() of a layer with wide groups (ForwardPlan.groupwise): each group's forward
    as a dense layer's into its channels of y; the planes kept for the weight gradient
    (whose kernels take the groups as they are) padded apart."""
    p, one = fp.problem, fp.groupwise
    xin, nonfinite = None, False
    if keep:
        xin = _kept_planes(fp, x, recycle)
        nonfinite = _layout.pad_phase(x.reshape(fp.x3_shape), xin, *fp.pad_args, threads)
    for g in range(fp.G):
        o = slice(g * fp.OCg, (g + 1) * fp.OCg)
        # (one image: straight into y's channels of the group; a batch: through scratch)
        yg = y[:, o] if p.N == 1 else scratch("group_output", (p.N, fp.OCg) + fp.y_shape[2:], y.dtype)
        forward(_group(x, g, fp.Cg, "group_input"), weight[o], None if bias is None else bias[o], one, keep=False,
                out=yg)
        if p.N > 1:
            y[:, o] = yg
    return y, xin, nonfinite


def _in_place_plan(fq):
    """How forward plan fq's pixel tiles run in place over an input at any address (an input
    gradient's grad_output, whose address the route does not check): its in_place plan, or
    on AVX2 its in_place_aligned one too (IN_PLACE_ANY_ADDRESS); None where neither."""
    return fq.in_place or (fq.in_place_aligned if IN_PLACE_ANY_ADDRESS else None)


def reads_weight_transposed(p: Problem, q: Problem):
    """Whether the forward q that computes dense 1x1 layer p's input gradient reads p's
    weight as it is, transposed, rather than a transposed copy: where that forward reads
    grad_output in place (ForwardPlan.in_place, or on AVX2 in_place_aligned:
    _in_place_plan) and the weight is small (INPUT_AS_FORWARD_WEIGHT_SHARE,
    INPUT_AS_FORWARD_ALIGNED_SHARE)."""
    fq = forward_plan(q)
    plan = _in_place_plan(fq)
    if plan is None:
        return False
    share = INPUT_AS_FORWARD_WEIGHT_SHARE if plan is fq.in_place else INPUT_AS_FORWARD_ALIGNED_SHARE
    return p.OC * p.C <= share * p.N * p.H * p.W * (p.C + p.OC)


def input_gradient_as_forward(p: Problem):
    """The input gradient of a zero-padded, stride-1 depthwise layer (one output channel
    per channel) is a forward depthwise correlation of grad_output with the taps
    flipped, padded by (k - 1) * dilation - padding on each side: that forward's
    Problem when its kernel has a channel-block tile (which then computes the
    gradient with full vectors of channels), else None.  So is a dense 1x1 layer's at
    stride 1 without padding, a 1x1 layer from OC to C channels with the weight
    transposed: that forward's where it reads the weight as it is (reads_weight_transposed)
    or the weight's transposed copy is at most INPUT_AS_FORWARD_COPY_BYTES on maps whose
    planes do not alias (INPUT_AS_FORWARD_MIN_OFFSETS)."""
    if p.pointwise and p.groups == 1:
        q = p._replace(C=p.OC, OC=p.C)
        copied = (p.OC * p.C * ITEMSIZE[p.dtype] <= INPUT_AS_FORWARD_COPY_BYTES
                  and _plane_offsets(p, 4096) >= INPUT_AS_FORWARD_MIN_OFFSETS)
        return q if copied or reads_weight_transposed(p, q) else None
    if not (p.groups == p.C == p.OC and p.sh == p.sw == 1 and p.mode == "zeros"):
        return None
    OH, OW = p.output_hw
    span_h, span_w = (p.KH - 1) * p.dh, (p.KW - 1) * p.dw
    pads = (span_h - p.pad_top, span_h - p.pad_bottom, span_w - p.pad_left, span_w - p.pad_right)
    if min(pads) < 0:
        return None
    q = p._replace(H=OH, W=OW, pad_top=pads[0], pad_bottom=pads[1], pad_left=pads[2], pad_right=pads[3])
    return q if forward_plan(q).channel_block is not None else None


def backward_data(grad_y, weight, p: Problem, packs=None):
    """Gradient of the input (N, C, H, W), padding folded back into its sources.
    packs: None, or a frozen module's dict (see forward): the channel-vector tile's
    packed weights, kept by the first call and reused by the next.
    The kernels also multiply grad_output's zero border by the weights, and 0 * inf is
    NaN where PyTorch's gradient (a sum over real output pixels) is finite: with an
    infinite or NaN weight, _input_grad_exact computes it instead.  That costs one look
    at the weights or at the gradient, whichever is smaller: every term the border adds
    is 0 * w, so unless the gradient holds a NaN, no weight was infinite or NaN where it
    mattered."""
    if weight.size <= p.N * p.C * p.H * p.W:
        if _layout.has_nonfinite(weight):
            return _input_grad_exact(grad_y, weight, p)
        return _input_gradient(grad_y, weight, p, packs)
    gx = _input_gradient(grad_y, weight, p, packs)
    if _layout.has_nonfinite(gx) and _layout.has_nonfinite(weight):
        return _input_grad_exact(grad_y, weight, p)
    return gx


def _input_grad_exact(grad_y, weight, p: Problem):
    """Input gradient in plain NumPy (float64) from the products of real output pixels
    only, as PyTorch's (the path for infinite or NaN weights), padding folded back."""
    fp = forward_plan(p)
    Hp, Wp = p.H + p.pad_top + p.pad_bottom, p.W + p.pad_left + p.pad_right
    gy = grad_y.reshape(p.N, fp.G, fp.OCg, fp.OH, fp.OW).astype(np.float64)
    w = weight.reshape(fp.G, fp.OCg, fp.Cg, p.KH, p.KW).astype(np.float64)
    padded = np.zeros((p.N, fp.G, fp.Cg, Hp, Wp))
    mode = PADDING_MODES[p.mode]
    src_rows = _layout.source_indices(-p.pad_top, Hp, p.H, mode)
    src_cols = _layout.source_indices(-p.pad_left, Wp, p.W, mode)
    with np.errstate(invalid="ignore"):   # (inf - inf, 0 * inf: NaN, as in PyTorch)
        for i in range(p.KH):
            for j in range(p.KW):
                padded[(Ellipsis, *_tap_window(p, fp, i, j))] += np.einsum("ngohw,goc->ngchw", gy, w[..., i, j])
        # Each padded row, then column, onto its source (zero padding's onto a spare one).
        by_rows = np.zeros((p.N, fp.G, fp.Cg, p.H + 1, Wp))
        np.add.at(by_rows, (Ellipsis, np.where(src_rows < 0, p.H, src_rows), slice(None)), padded)
        gx = np.zeros((p.N, fp.G, fp.Cg, p.H, p.W + 1))
        np.add.at(gx, (Ellipsis, np.where(src_cols < 0, p.W, src_cols)), by_rows[..., :p.H, :])
    return np.ascontiguousarray(gx[..., :p.W].reshape(p.N, p.C, p.H, p.W), dtype=grad_y.dtype)


def _input_gradient(grad_y, weight, p: Problem, packs=None):
    """backward_data's kernels (its check for non-finite weights covers the whole layer, so
    the calls here for a patch layer's 1x1 and per group skip it).  Runs in blocks of
    images, or of groups within an image, whose bordered grad_output and phase planes fit
    in cache across the three passes.  As forward(), its steps are worked out once per
    plan and threads (_input_gradient_route).  packs: see backward_data."""
    fp = forward_plan(p)
    threads = 1 if fp.work < SMALL_WORK and fp.values < SMALL_VALUES else get_num_threads()   # (threads_for's)
    route = fp.input_gradient_routes.get(threads)
    if route is None:
        route = fp.input_gradient_routes[threads] = _input_gradient_route(fp, threads)
    return route(grad_y, weight, packs)


def _transposed_weight(weight, q, threads, out=None):
    """Weight (C, OC, 1, 1) of the 1x1 layer q from OC to C channels whose forward is the
    input gradient of the one with this weight (OC, C, 1, 1): a transposed copy, into `out`
    or a new array."""
    wq = np.empty((q.OC, q.C, 1, 1), dtype=weight.dtype) if out is None else out
    _layout.transpose(weight.reshape(q.C, q.OC), wq.reshape(q.OC, q.C), threads)
    return wq


def _input_gradient_route(fp, threads):
    """_input_gradient's steps for plan fp's layer on `threads` threads, as a function
    (grad_y, weight, packs) -> gx; decided once, as _forward_route's.  (packs reach the
    channel-vector tile's packing, and a patch layer's 1x1; not the groups of a groupwise
    layer, which share one plan.)"""
    p = fp.problem
    gx_shape = (p.N, p.C, p.H, p.W)
    q = input_gradient_as_forward(p)
    if q is not None:
        if p.groups == 1 and reads_weight_transposed(p, q):   # (a dense 1x1 layer: its weight read transposed)
            fq = forward_plan(q)
            q_threads = threads_for(fq.work, fq.values)

            def transposed(grad_y, weight, packs):
                gx = np.empty(gx_shape, dtype=grad_y.dtype)
                _run_in_place(fq, _in_place_plan(fq), grad_y, weight, None, gx, q_threads, weight_transposed=True)
                return gx
            return transposed
        if p.groups == 1:   # (... from a transposed copy of it)
            def transposed_copy(grad_y, weight, packs):
                if packs is None:
                    wq = _transposed_weight(weight, q, threads,
                                            scratch("weight_transposed", (q.OC, q.C, 1, 1), weight.dtype))
                else:   # (a frozen module's weight: copied once)
                    wq = _frozen_pack(packs, ("weight_transposed", q), _transposed_weight, weight, q, threads)
                return forward(grad_y, wq, None, q, keep=False, packs=packs)[0]
            return transposed_copy

        def flipped(grad_y, weight, packs):   # (depthwise: its taps flipped)
            return forward(grad_y, np.ascontiguousarray(weight[:, :, ::-1, ::-1]), None, q, keep=False)[0]
        return flipped
    q = patch_pointwise(p)
    if q is not None:
        fq = forward_plan(q)
        geometry, q_threads = _window_geometry(p, q), threads_for(fq.work, fq.values)

        def patches(grad_y, weight, packs):
            gq = _input_gradient(grad_y, _pointwise_weight(weight, q), q, packs)
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            _layout.windows(gq.reshape(q.N * q.C, q.H, q.W), gx.reshape(p.N * p.C, p.H, p.W), geometry, True,
                            q_threads)
            return gx
        return patches
    if fp.groupwise_input is not None:   # (wide groups: each group's as a dense layer's)
        def groupwise(grad_y, weight, packs):
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            for g in range(fp.G):
                gx[:, g * fp.Cg:(g + 1) * fp.Cg] = _input_gradient(_group(grad_y, g, fp.OCg, "group_grad_output"),
                                                                   weight[g * fp.OCg:(g + 1) * fp.OCg],
                                                                   fp.groupwise_input)
            return gx
        return groupwise
    bp = backward_data_plan(p)
    strip = channel_block_strip(bp, threads)
    if strip is not None:
        rows, cols, interior, _ = bp.channel_block
        cblock_args = (p.N, p.C, rows, cols, interior, p.pad_top, p.pad_left, *strip, threads)

        def channel_block(grad_y, weight, packs):
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            bp.kernel.cblock(grad_y, weight, gx, scratch("bwd_pixel_major", (threads * strip[1],), grad_y.dtype),
                             *cblock_args)
            return gx
        return channel_block
    if _runs_fused(bp.fused_len is not None, p, threads):
        # Extend, the phases' tiles and fold, per (image, channel) of a depthwise layer or
        # per image of a dense one, in cache.
        fused_args = (p.N, p.C, fp.OCg, bp.out_len, bp.plane_len, fp.kk, bp.phase_offs, bp.width, bp.top, bp.left,
                      bp.fold_rows, bp.fold_cols, bp.fold_interior, bp.fold_pad_left, threads, p.mode == "zeros")
        fused_kw = dict(dense=p.groups == 1, tile=bp.tile)

        def fused(grad_y, weight, packs):
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            bp.kernel.fused(grad_y, weight, gx, scratch("bwd_fused", (threads, bp.fused_len), grad_y.dtype),
                            *fused_args, **fused_kw)
            return gx
        return fused
    images, groups = bp.block
    pack = _input_gradient_packing(fp, bp, threads) if bp.cvec is not None else lambda weight, dtype, packs: {}
    gx3_shape, gy3_shape = (p.N * p.C, p.H, p.W), (p.N * p.OC, fp.OH, fp.OW)
    if _runs_fused(bp.cvec_fused, p, threads):
        # Each work item borders its image's grad_output into its thread's blocks and stores
        # straight into gx (see _run_fused_images): no gyp, and gxph (here gx) goes unused.
        blocks_shape = (threads, bp.gy_blocks * bp.gy_block_len)
        run_args = (p.N, 1, fp.Cg, fp.OCg, bp.out_len, bp.gy_block_len, fp.kk, bp.block_offs, bp.phase_ws, bp.rblock,
                    threads, bp.tile, bp.tiles_inner)

        def cvec_fused(grad_y, weight, packs):
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            packed = pack(weight, grad_y.dtype, packs)
            blocks = scratch("bwd_fused_blocks", blocks_shape, grad_y.dtype)
            gx3 = gx.reshape(gx3_shape)
            bp.kernel.run(grad_y, weight, gx3, *run_args, **packed, gx=gx3, static_schedule=bp.static_schedule,
                          fused=(grad_y.reshape(gy3_shape), *bp.block_tables, bp.block_plane, bp.left, blocks))
            return gx
        return cvec_fused
    if bp.panels:  # each thread's panel
        gyp_memory = ("gyp_panels", (threads, _geometry.ceil_div(p.OC, LANES[p.dtype]) * LANES[p.dtype]
                                     * bp.panel_pixels))
    elif bp.cvec is None:
        gyp_memory = ("gyp", (images * groups * fp.OCg, bp.plane_len))
    else:  # dense: one group
        gyp_memory = ("gyp_blocked", (images * bp.gy_blocks, bp.gy_block_len))
    memory = (gyp_memory, ("gxph", (images * groups * fp.Cg, bp.n_planes * bp.out_len)))
    block = _input_gradient_block_route(p, fp, bp, threads)
    if images >= p.N and groups >= fp.G:  # one block (small layers: no slicing)
        def one_block(grad_y, weight, packs):
            gx = np.empty(gx_shape, dtype=grad_y.dtype)
            gyp, gxph = scratches(memory, grad_y.dtype)
            block(grad_y.reshape(gy3_shape), weight, gyp, gxph, gx.reshape(gx3_shape), p.N, fp.G,
                  pack(weight, grad_y.dtype, packs))
            return gx
        return one_block

    def by_blocks(grad_y, weight, packs):
        gx = np.empty(gx_shape, dtype=grad_y.dtype)
        packed = pack(weight, grad_y.dtype, packs)
        gyp, gxph = scratches(memory, grad_y.dtype)
        gy2 = grad_y.reshape(p.N * p.OC, fp.OH * fp.OW)
        gx2 = gx.reshape(p.N * p.C, p.H * p.W)
        for n0 in range(0, p.N, images):
            n1 = min(p.N, n0 + images)
            for g0 in range(0, fp.G, groups):
                g1 = min(fp.G, g0 + groups)
                # rows of (image, channel) in this block: contiguous, as the block is whole
                # images or groups of one image
                oc0, oc1 = n0 * p.OC + g0 * fp.OCg, (n1 - 1) * p.OC + g1 * fp.OCg
                c0, c1 = n0 * p.C + g0 * fp.Cg, (n1 - 1) * p.C + g1 * fp.Cg
                # (grad_output's extended rows, or its blocks, or the threads' panels)
                gyp_rows = (len(gyp) if bp.panels else (n1 - n0) * len(gyp) // images if bp.cvec is not None
                            else oc1 - oc0)
                block(gy2[oc0:oc1].reshape(oc1 - oc0, fp.OH, fp.OW), weight[g0 * fp.OCg:g1 * fp.OCg], gyp[:gyp_rows],
                      gxph[:c1 - c0], gx2[c0:c1].reshape(c1 - c0, p.H, p.W), n1 - n0, g1 - g0, packed)
        return gx
    return by_blocks


def _input_gradient_packing(fp, bp, threads):
    """(weight, dtype, packs) -> the channel-vector tile's keyword arguments for its
    run(): each stride phase's weights packed (or, with bp.pack_blocks, packed by the
    tiles a block at a time), the scratch memory for them and for partial sums.  packs:
    None, or a frozen module's dict (see forward), where the phases' packed weights are
    kept by the first call and reused by the next."""
    p = fp.problem
    width = bp.cvec[2]
    memory = [("bwd_bp", (bp.blocks * width,))]
    if bp.pack_blocks:   # (each thread packs one block at a time, every phase into the same array)
        memory.append(("bwd_wp", (threads * _packed_block_values(p.dtype, fp.OCg, fp.kk, width),)))
    else:
        for i, ws in enumerate(bp.phase_ws):
            wp_len = bp.blocks * _geometry.round_up(fp.OCg, LANES[p.dtype]) * len(ws) * width
            memory.append((f"bwd_wp{i}", (max(1, wp_len),)))
    with_part = bp.rblock < fp.OCg
    if with_part:
        memory.append(("bwd_part", (bp.block[0] * bp.blocks * bp.tiled_len * width,)))
    phases = len(bp.phase_ws)
    pack_args = (1, fp.Cg, fp.OCg, fp.OCg * fp.Cg * fp.kk, fp.kk, fp.Cg * fp.kk)
    fixed = dict(tile_cols=bp.tile_cols, out_rows=bp.out_rows, out_cols=bp.out_cols, width=bp.width,
                 pack_positions=bp.phase_pos if bp.pack_blocks else None)

    def pack_phases(weight, wps, zeros):   # -> whether a weight is an infinity or a NaN
        nonfinite_weight = False
        for wp, ws in zip(wps, bp.phase_ws):
            if len(ws):
                nonfinite_weight |= bp.kernel.pack(weight, None, wp, zeros, *pack_args, ws, width, threads)
        return nonfinite_weight

    def pack_whole(weight, dtype):
        zeros = np.zeros(memory[0][1], dtype)
        wps = [np.empty(shape, dtype) for _, shape in memory[1:1 + phases]]
        return wps, zeros, pack_phases(weight, wps, zeros)

    def packed(weight, dtype, packs):
        if packs is not None and not bp.pack_blocks:
            wps, zeros, nonfinite_weight = _frozen_pack(packs, bp, pack_whole, weight, dtype)
            part = scratches(memory[-1:], dtype)[0] if with_part else None
            return dict(fixed, wps=wps, bp=zeros, part=part, skips=None if nonfinite_weight else bp.tap_skips)
        zeros, *views = scratches(memory, dtype)
        nonfinite_weight = False
        if bp.pack_blocks:
            zeros.fill(0)   # (the input gradient has no bias)
            wps = [views[0]] * phases
        else:
            wps = views[:phases]
            nonfinite_weight = pack_phases(weight, wps, zeros)
        return dict(fixed, wps=wps, bp=zeros, part=views[-1] if with_part else None,
                    skips=None if nonfinite_weight else bp.tap_skips)
    return packed


def _input_gradient_block_route(p, fp, bp, threads):
    """(gy, weight, gyp, gxph, gx, images, groups, packed) -> None: one block of images x
    groups of the input gradient: grad_output's rows gy extended into gyp (pixel-major
    blocks for the channel-vector tile), the phases' tiles into gxph, folded into gx's
    rows; packed: the channel-vector tile's arguments (_input_gradient_packing's)."""
    fold_args = (bp.fold_rows, bp.fold_cols, bp.fold_interior, bp.width, bp.out_len, bp.fold_pad_left,
                 p.mode == "zeros", threads)
    bands = None if bp.panels else bp.bands(threads)
    if bp.panels:
        x_chan, offs = 0, bp.phase_offs
    elif bp.cvec is None:
        x_chan, offs = bp.plane_len, bp.phase_offs
    else:
        x_chan, offs = bp.gy_block_len, bp.block_offs
    run_tail = (fp.Cg, fp.OCg, bp.out_len, x_chan, fp.kk, offs, bp.phase_ws, bp.rblock, threads, bp.tile,
                bp.tiles_inner)
    run_kw = dict(static_schedule=bp.static_schedule)
    if not bp.panels:
        run_kw["banded"] = bands is not None

    def block(gy, weight, gyp, gxph, gx, images, groups, packed):
        # (gx where the kernels store straight into it)
        kwargs = {**packed, **(dict(gx=gx, width=bp.width) if bp.direct else {}), **run_kw}
        if bp.panels:
            bp.kernel.run(gy.reshape(len(gy), -1), weight, gxph, images, groups, *run_tail, **kwargs, panels=gyp)
        else:
            if bp.cvec is None:
                _layout.extend(gy, gyp, bp.width, bp.top, bp.left, threads, bands)
            else:
                bp.kernel.pad_blocked(gy, gyp, p.OC, *bp.block_tables, bp.block_plane, bp.left, threads, bands)
            bp.kernel.run(gyp, weight, gxph, images, groups, *run_tail, **kwargs)
        if not bp.direct:
            _layout.fold_phases(gxph, gx, *fold_args)
    return block


def _tap_window(p: Problem, fp, i, j):
    """(rows, cols) slices of the padded input that tap (i, j) reads for each output
    pixel (the exact NumPy paths' windows)."""
    return (slice(i * p.dh, i * p.dh + p.sh * (fp.OH - 1) + 1, p.sh),
            slice(j * p.dw, j * p.dw + p.sw * (fp.OW - 1) + 1, p.sw))


def _weight_grad_exact(grad_y, xin, p: Problem):
    """Weight gradient in plain NumPy from the padded phase planes, summed over real
    output pixels only (the path for inputs with infinities or NaNs)."""
    fp = forward_plan(p)
    nc, sh, sw = p.N * p.C, p.sh, p.sw
    planes = xin.reshape(nc, sh, sw, fp.plane_len)[..., :fp.Hq * fp.We].reshape(nc, sh, sw, fp.Hq, fp.We)
    xpad = planes.transpose(0, 3, 1, 4, 2).reshape(p.N, fp.G, fp.Cg, fp.Hq * sh, fp.We * sw)
    gy = grad_y.reshape(p.N, fp.G, fp.OCg, fp.OH, fp.OW).astype(np.float64)
    gw = np.empty((fp.G, fp.OCg, fp.Cg, p.KH, p.KW))
    for i in range(p.KH):
        for j in range(p.KW):
            window = xpad[(Ellipsis, *_tap_window(p, fp, i, j))]
            gw[..., i, j] = np.einsum("ngohw,ngchw->goc", gy, window.astype(np.float64))
    return gw.reshape(p.OC, fp.Cg, p.KH, p.KW).astype(grad_y.dtype)


def backward_params(grad_y, xin, p: Problem, need_weight=True, need_bias=True, weight_grad=None,
                    bias_grad=None, weight_accumulate=True, bias_accumulate=True, nonfinite=False):
    """Gradients of the weight (OC, C/groups, KH, KW), from the forward's padded
    planes, and of the bias (OC,); None for those not asked for.  weight_grad /
    bias_grad: C-contiguous arrays to write the gradients into (and return) instead of
    new ones, adding to their contents if *_accumulate (as .grad accumulates).
    nonfinite: the planes hold an infinity or a NaN (from forward / pad_phase)."""
    q = patch_pointwise(p)   # (its planes are those of the 1x1 layer it runs as)
    if q is not None and p.KH * p.KW > 1:   # a patch embedding: the weight's shape differs
        gw, gb = backward_params(grad_y, xin, q, need_weight, need_bias,
                                 None if weight_grad is None else _pointwise_weight(weight_grad, q), bias_grad,
                                 weight_accumulate, bias_accumulate, nonfinite)
        if gw is not None:   # (weight_grad itself where given: its view took the gradient)
            gw = weight_grad if weight_grad is not None else gw.reshape(p.OC, p.C // p.groups, p.KH, p.KW)
        return gw, gb
    p = q or p
    fp = forward_plan(p)
    threads = 1 if fp.work < SMALL_WORK and fp.values < SMALL_VALUES else get_num_threads()   # (threads_for's)
    gw = gb = None
    if need_weight and fp.wgrad_transposed is not None and xin.shape[1] == p.H * p.W:
        # (xin: the input itself, grad_output the planes of the layer q; a module's training
        # forward keeps padded planes instead, for the kernel below)
        gq, _ = backward_params(xin.reshape(p.N, p.C, p.H, p.W), grad_y.reshape(p.N * p.OC, p.H * p.W),
                                fp.wgrad_transposed, need_bias=False)
        gw = weight_grad if weight_grad is not None else np.empty((p.OC, p.C, 1, 1), dtype=grad_y.dtype)
        if weight_grad is not None and weight_accumulate:
            gw.reshape(p.OC, p.C)[...] += gq.reshape(p.C, p.OC).T
        else:
            gw.reshape(p.OC, p.C)[...] = gq.reshape(p.C, p.OC).T
        need_weight = False
    if need_weight:
        into = weight_grad is not None and weight_accumulate
        gw = weight_grad if weight_grad is not None else np.empty((p.OC, fp.Cg, p.KH, p.KW), dtype=grad_y.dtype)
        if nonfinite:
            # The kernels also multiply the zero gradient of the flat grid's scratch
            # columns with input pixels, and 0 * inf is NaN: with an infinite or NaN
            # input, take the exact (slow) path that visits only real output pixels.
            exact = _weight_grad_exact(grad_y, xin, p)
            if into:
                gw += exact
            else:
                gw[...] = exact
        else:
            # (its steps worked out once per plan and threads, as forward()'s)
            route = fp.weight_gradient_routes.get(threads)
            if route is None:
                route = fp.weight_gradient_routes[threads] = _weight_gradient_route(fp, threads)
            run, sums_bias = route
            if need_bias and sums_bias:   # (the kernel sums the bias gradient as it reads grad_output)
                gb = bias_grad if bias_grad is not None else np.empty(p.OC, dtype=grad_y.dtype)
                run(xin, grad_y, gw, into, gb, bias_grad is not None and bias_accumulate)
                need_bias = False
            else:
                run(xin, grad_y, gw, into)
    if need_bias:
        # (straight into bias_grad where it is overwritten)
        overwrite = bias_grad is not None and not bias_accumulate
        gb = bias_grad if overwrite else np.empty(p.OC, dtype=grad_y.dtype)
        _layout.channel_sums(grad_y.reshape(p.N * p.OC, fp.OH * fp.OW), gb, p.N, p.OC, threads)
        if bias_grad is not None and not overwrite:
            bias_grad += gb
            gb = bias_grad
    return gw, gb


def _weight_gradient_route(fp, threads):
    """backward_params' kernels for plan fp's layer on `threads` threads (finite planes):
    (run, sums_bias), run(xin, grad_y, gw, into) writing the weight gradient into gw,
    adding to it if `into`; decided once, as _forward_route's.  sums_bias: run also takes
    (gb, gb_into) and writes the bias gradient into gb (adding if gb_into), summed as its
    kernel reads grad_output (Kernel.bias_sums: the depthwise kernels' pixel tiles)."""
    p = fp.problem
    lanes = LANES[p.dtype]
    if fp.wgrad_channel_block:
        memory = ("wgrad_pixel_major", (threads, (fp.x_chan + fp.OH * fp.OW) * lanes))
        cblock_args = (p.N, p.C, fp.x_chan, fp.OH, fp.OW, fp.We, fp.tap_off, threads)

        def channel_block(xin, grad_y, gw, into):
            fp.wgrad_kernel.cblock(xin, grad_y, gw, scratch(*memory, grad_y.dtype), *cblock_args, into)
        return channel_block, False
    if fp.wgrad_by_channel:
        # (tap-major tiles sum into (OC, kk, C), then turned into the weight's layout)
        tap_major = fp.wgrad_tap_major
        if fp.wgrad_chunks is not None:
            rows, images = fp.wgrad_chunks
            chunks = _geometry.ceil_div(p.N, images) * _geometry.ceil_div(fp.OH, rows)
            memory = [("wgrad_panels", (threads, _geometry.round_up(p.OC, 2 * lanes) // lanes, rows * fp.We * lanes)),
                      ("wgrad_partial", (chunks, p.OC * fp.Cg * fp.kk))]
            chunk_args = (p.N, p.C, p.OC, fp.kk)
            chunk_tail = (fp.OH, fp.OW, fp.We, fp.tap_off, fp.wgrad_tiles, rows, images, threads)

            def sum_by_channel(xin, grad_y, out, into):
                panels, partial = scratches(memory, grad_y.dtype)
                # (x_chan: the planes', or the input's own: see planes_in_place)
                fp.wgrad_ocvec.ocvec_chunks(xin, grad_y, out, partial, panels, *chunk_args, xin.shape[1], *chunk_tail,
                                            into)
        else:
            block = 2 * lanes   # output channels per tile (KernelSpec.ocvec_tile)
            group_blocks = _geometry.ceil_div(fp.OCg, block)
            gT_shape = (p.N, fp.G * group_blocks, fp.grad_len, block)
            # Bands where the blocks of output channels split evenly over the threads:
            # each thread transposes the blocks of grad_output its tiles then read.
            banded = WGRAD_BANDS and threads > 1 and fp.G == 1 and group_blocks % threads == 0

            def sum_by_channel(xin, grad_y, out, into):
                gT = scratch("gT", gT_shape, grad_y.dtype)
                _layout.extend_transposed(grad_y, gT, fp.We, threads, fp.G, banded)
                x_chan = xin.shape[1]   # (the planes', or the input's own: see planes_in_place)
                for g in range(fp.G):   # (a group's rows of the gradient, channels of the planes, blocks of gT)
                    fp.wgrad_ocvec.ocvec(xin[g * fp.Cg:], gT, out[g * fp.OCg:(g + 1) * fp.OCg], p.N, fp.Cg, fp.OCg,
                                         fp.kk, x_chan, fp.grad_len, fp.tap_off, fp.wgrad_tiles, threads, into,
                                         fp.ocvec_images, fp.ocvec_pixels, fp.We, fp.static_schedule, banded,
                                         p.C * x_chan, g * group_blocks)
        if not tap_major:
            return sum_by_channel, False

        def by_channel_tap_major(xin, grad_y, gw, into):
            out = scratch("wgrad_tap_major", gw.shape, gw.dtype)
            sum_by_channel(xin, grad_y, out, False)
            _layout.taps_last(out, gw, fp.kk, into, threads)
        return by_channel_tap_major, False
    if fp.wgrad_by_input:
        memory = [("wgrad_partial", fp.icvec_partial), ("wgrad_windows", (threads, fp.icvec_window))]
        icvec_args = (p.N, p.C, p.OC, fp.kk, fp.x_chan, fp.OH, fp.OW, fp.We, fp.icvec_shape, fp.icvec_table,
                      *fp.icvec_chunking, threads)

        def by_input(xin, grad_y, gw, into):
            partial, windows = scratches(memory, grad_y.dtype)
            fp.wgrad_kernel.icvec(xin, grad_y, gw, partial, windows, *icvec_args, into)
        return by_input, False
    run_args = (p.N, fp.G, fp.Cg, fp.OCg, fp.kk, fp.x_chan, *fp.wgrad_shape, fp.tap_off, *fp.wgrad_segments, threads)
    if fp.wgrad_flat:
        gext_shape, gy3_shape = (p.N * p.OC, fp.grad_len), (p.N * p.OC, fp.OH, fp.OW)

        def flat(xin, grad_y, gw, into):
            gy = scratch("gext", gext_shape, grad_y.dtype)
            _layout.extend(grad_y.reshape(gy3_shape), gy, fp.We, 0, 0, threads)
            fp.wgrad_kernel.run(xin, gy, gw, *run_args, into)
        return flat, False

    def pixels(xin, grad_y, gw, into, gb=None, gb_into=False):
        fp.wgrad_kernel.run(xin, grad_y, gw, *run_args, into, bias_grad=gb, bias_accumulate=gb_into)
    return pixels, fp.wgrad_kernel.bias_sums

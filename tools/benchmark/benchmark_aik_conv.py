"""CPU benchmark: the AIK layer against nn.Conv2d and its dynamic-conv peers.

At ResNet-50's 3x3 residual-conv shapes (batch 2, 224x224 input), times
forward (eval, no grad) and forward+backward (train), and measures the bytes
autograd keeps for backward (unique storages seen by saved_tensors_hooks) and
the peak memory allocated during forward+backward (profiler memory events;
the compiled AIK op keeps its temporaries from one call to the next, so
after the timed runs they are not allocated again and the peak leaves them
out).
Rows: (a) nn.Conv2d, (b) the whole AIKConv2d layer (generator included,
the op on its default CPU path, the compiled extension), (b') the AIK op
alone with the attention given as a parameter (the difference to (b) is the
generator's share), (b'') the whole layer with the op on the plain torch
path, (c) the whole layer on the reference op path, (d) mmcv's DCNv2
(ModulatedDeformConv2dPack), (e) a CondConv/DyConv-style 4-expert dynamic
conv.
Ratios are to (a), measured in this one process; the rows are timed in turn
within every run (medians over runs), so a slow spell hits them alike.

Multiply-adds: every nn.Conv2d / nn.Linear call inside a layer is counted by a
forward hook (out elements * in_channels/groups * kh*kw), plus what hooks
cannot see: AIK's modulation (B*C*K*L), DCNv2's main aggregation
(B*O*L*C*K) and its bilinear sampling with mask (5*B*C*K*L), and the expert
mixing of the dynamic conv (B*E*O*C*K).

    python tools/benchmark/benchmark_aik_conv.py [--runs 10] [--batch 2]
        [--threads N] [--adaptive-heap]

glibc's heap is held (``cpu_heap.py``): without it, heap trims land on one
row or another at random, by the process.

On a machine shared with other work, ``--threads 1`` avoids OpenMP threads
waiting on a descheduled sibling (times then jump in whole scheduler slices).
"""
import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from aik_rows import SHAPES, AIKOp, aik_layer, saved_bytes
from cpu_heap import hold_heap
from mmdynconv.cnn import AIKConv2d


class DynamicConv4(nn.Module):
    """CondConv/DyConv-style: a per-sample softmax mix of 4 expert kernels."""

    def __init__(self, channels, stride, experts=4):
        super().__init__()
        self.stride = stride
        self.experts = nn.Parameter(
            torch.randn(experts, channels, channels, 3, 3) * 0.05)
        self.route = nn.Linear(channels, experts)

    def forward(self, x):
        batch, channels = x.shape[:2]
        mix = torch.softmax(self.route(x.mean((2, 3))), dim=1)
        kernels = torch.einsum('be,eocij->bocij', mix, self.experts)
        out = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]),
                       kernels.reshape(-1, channels, 3, 3), None, self.stride,
                       1, 1, batch)
        return out.view(batch, -1, *out.shape[2:])


def build_layers(channels, size, stride, batch):
    layers = {
        'nn.Conv2d': nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
        'AIK layer': AIKConv2d(channels, channels, 3, stride, 1, bias=False),
        'AIK op, A given': AIKOp(channels, stride, batch,
                                 ((size - 1) // stride + 1, ) * 2),
        'AIK layer, torch op': aik_layer('torch')(channels, channels, 3,
                                                  stride, 1, bias=False),
        'AIK reference': aik_layer('reference')(channels, channels, 3, stride,
                                                1, bias=False),
        'CondConv-4': DynamicConv4(channels, stride),
    }
    try:
        from mmcv.ops import ModulatedDeformConv2dPack
        layers['DCNv2 (mmcv)'] = ModulatedDeformConv2dPack(
            channels, channels, 3, stride, 1, bias=False)
    except ImportError:
        pass
    return layers


def count_macs(layer, x):
    """Multiply-adds of one forward of layer on x (see module docstring)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in layer.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        out = layer(x)
    for hook in hooks:
        hook.remove()
    batch, channels = x.shape[:2]
    taps, positions = 9, out.shape[2] * out.shape[3]
    if isinstance(layer, (AIKConv2d, AIKOp)):
        total += batch * channels * taps * positions
    if isinstance(layer, AIKOp):
        total += out.numel() * channels * taps  # the aggregation
    elif isinstance(layer, DynamicConv4):
        total += out.numel() * channels * taps  # the grouped conv
        total += batch * layer.experts.numel()
    elif type(layer).__name__ == 'ModulatedDeformConv2dPack':
        total += out.numel() * channels * taps
        total += 5 * batch * channels * taps * positions
    return total


def interleaved_medians(fns, runs, warmup=3):
    """Median seconds of each of fns (name -> callable), timed in turn within
    every run, so that a slow spell of the machine hits every row alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(fn):
    """Peak of the bytes allocated while fn runs, from the profiler's memory
    timeline (CPU has no allocator statistics like torch.cuda's)."""
    from torch.profiler._memory_profiler import Action
    # kineto otherwise logs every session to stderr, with a GPU-count error
    # on machines without one
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def bench_shape(channels, size, stride, batch, runs):
    torch.manual_seed(0)
    layers = build_layers(channels, size, stride, batch)
    x = torch.randn(batch, channels, size, size)
    x_grad = x.clone().requires_grad_()

    def forward(layer):
        with torch.no_grad():
            layer(x)

    def forward_backward(layer):
        layer(x_grad).sum().backward()

    for layer in layers.values():
        layer.eval()
    fwd = interleaved_medians(
        {name: partial(forward, layer)
         for name, layer in layers.items()}, runs)
    for layer in layers.values():
        layer.train()
    fwd_bwd = interleaved_medians(
        {name: partial(forward_backward, layer)
         for name, layer in layers.items()}, runs)
    rows = []
    for name, layer in layers.items():
        rows.append(
            dict(name=name,
                 fwd=fwd[name],
                 fwd_bwd=fwd_bwd[name],
                 saved=saved_bytes(lambda: layer(x_grad)),
                 peak=peak_bytes(partial(forward_backward, layer)),
                 params=sum(p.numel() for p in layer.parameters()),
                 macs=count_macs(layer.eval(), x)))
    return rows


def format_table(shape, rows):
    base = rows[0]
    lines = [
        f'\n### C={shape[0]}, {shape[1]}x{shape[1]}, stride {shape[2]}\n',
        '| layer | fwd ms | fwd+bwd ms | fwd+bwd x | saved MB | saved x '
        '| peak MB | peak x | params | params x | MMACs | MACs x |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|'
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['fwd'] * 1e3:.2f} | {r['fwd_bwd'] * 1e3:.2f}"
            f" | {r['fwd_bwd'] / base['fwd_bwd']:.2f} | {r['saved'] / 2**20:.2f}"
            f" | {r['saved'] / base['saved']:.2f} | {r['peak'] / 2**20:.1f} "
            f"| {r['peak'] / base['peak']:.2f} | {r['params']} "
            f"| {r['params'] / base['params']:.3f} | {r['macs'] / 1e6:.1f} "
            f"| {r['macs'] / base['macs']:.3f} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--adaptive-heap', action='store_true',
                        help="keep glibc's adaptive malloc thresholds")
    args = parser.parse_args()
    heap = hold_heap(args.adaptive_heap)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'batch {args.batch}, median of {args.runs} interleaved runs after '
          f'3 warm-up; {heap}')
    for shape in SHAPES:
        print(format_table(shape, bench_shape(*shape, args.batch, args.runs)),
              flush=True)


if __name__ == '__main__':
    main()

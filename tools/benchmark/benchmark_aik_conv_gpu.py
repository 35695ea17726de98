"""GPU benchmark: the AIK layer on Triton kernels against cuDNN's nn.Conv2d.

First checks correctness on the GPU (the Triton op against the float64
reference, float32 and bfloat16, forward and every gradient; the whole AIK
layer on Triton against the same layer on the torch path) and stops with exit
status 1 if anything is off. Then, at ResNet-50's 3x3 shapes (batch 32,
224x224 input), times with CUDA events (median over --runs after --warmup;
before every run the L2 is flushed and a sleep kernel keeps the GPU busy while
the host enqueues, so the events time kernels, not Python launch overhead,
which gets its own column) and measures memory, for:

  (a) nn.Conv2d (cuDNN, cudnn.benchmark on),
  (b) the AIK op alone on Triton (attention given as a parameter),
  (c) the whole AIKConv2d layer, attention generator included, on Triton,
  (d) the same layer on the memory-lean torch path,

in bfloat16 (autocast, bf16 activations) and float32 (TF32 on for cuDNN and
Triton alike unless --no-tf32). fwd = eval mode, no grad; fwd+bwd = train
mode, gradients of the input and every parameter. "saved" = bytes of the
unique storages autograd keeps for backward (saved_tensors_hooks); "peak" =
torch.cuda.max_memory_allocated during fwd+bwd above what was allocated
before. Ratios are to (a). Targets (rows c): fwd+bwd <= 1.3x, saved <= 1.2x.

Installs nothing. Rows (c) and (d) need mmcv (``mmdynconv.cnn``); without it
only (a) and (b) run.

    python tools/benchmark/benchmark_aik_conv_gpu.py            # full run
    python tools/benchmark/benchmark_aik_conv_gpu.py --quick    # smoke run
"""
import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn

from aik_rows import SHAPES, AIKOp, aik_layer, saved_bytes
from mmdynconv.ops import aik_conv2d

try:
    from mmdynconv.cnn import AIKConv2d
except ImportError as error:  # mmcv missing: op-level rows only
    AIKConv2d, LAYER_IMPORT_ERROR = None, error

TARGET_TIME, TARGET_SAVED = 1.3, 1.2
# max |error| / max |reference| allowed by the correctness check
TOLERANCE = {'fp32': 1e-5, 'tf32': 5e-3, 'bf16': 2e-2}


def build_rows(channels, size, stride, batch):
    """name -> module, (a) first."""
    out_size = ((size - 1) // stride + 1, ) * 2
    rows = {
        'nn.Conv2d (cuDNN)': nn.Conv2d(channels, channels, 3, stride, 1,
                                       bias=False),
        'AIK op, triton': AIKOp(channels, stride, batch, out_size, 'triton'),
    }
    if AIKConv2d is not None:
        for impl in ('triton', 'torch'):
            rows[f'AIK layer, {impl}'] = aik_layer(impl)(
                channels, channels, 3, stride, 1, bias=False)
    return rows


# ---------------------------------------------------------------- correctness

def max_error(actual, expected, floor=0.0):
    """max |actual - expected| / max(max |expected|, floor), in float64."""
    scale = max(expected.abs().max().item(), floor) or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


def op_outputs(impl, x, attn, weight, bias, geometry, grad_out=None):
    leaves = [t.detach().requires_grad_() for t in (x, attn, weight, bias)]
    out = aik_conv2d(*leaves, *geometry, impl=impl)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves], grad_out


# (B, C, O, size, stride, padding, dilation, groups, G, channels_last)
CHECK_CASES = [
    (4, 64, 64, 56, 1, 1, 1, 1, 1, False),
    (4, 128, 128, 28, 2, 1, 1, 1, 1, True),
    (3, 72, 80, 15, 2, 2, 2, 2, 4, False),
    (2, 512, 512, 7, 1, 1, 1, 1, 1, True),
]


def check_op(dtype, tolerance, device, cases=CHECK_CASES):
    """Triton op == float64 reference: output and all four gradients."""
    worst = 0.0
    for batch, c, o, size, s, p, d, g, attn_groups, channels_last in cases:
        x = torch.randn(batch, c, size, size, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out_size = (size + 2 * p - 2 * d - 1) // s + 1
        attn = 2 * torch.rand(batch, attn_groups, 9, out_size, out_size,
                              device=device, dtype=dtype)
        weight = torch.randn(o, c // g, 3, 3, device=device,
                             dtype=dtype) / (9 * c // g)**0.5
        bias = torch.randn(o, device=device, dtype=dtype)
        geometry = (s, p, d, g)
        got, grad_out = op_outputs('triton', x, attn, weight, bias, geometry)
        want, _ = op_outputs('reference',
                             *(t.double() for t in (x, attn, weight, bias)),
                             geometry, grad_out.double())
        errors = [max_error(a, e) for a, e in zip(got, want)]
        worst = max(worst, *errors)
        print(f'    op B={batch} C={c} O={o} {size}x{size} '
              f's={s} p={p} d={d} groups={g} G={attn_groups} '
              f'channels_last={channels_last}: max err out/dx/dattn/dw/db '
              + ' '.join(f'{e:.1e}' for e in errors))
    return worst <= tolerance


def check_layer(device):
    """AIK layer on Triton == on the torch path (float32, TF32 off), with a
    random attention head so that the attention is not uniform. Errors are
    relative to max(max |reference|, 1e-3 * the largest of those): the
    local norm's bias has a zero gradient (the fusion norm removes constant
    shifts) up to rounding noise."""
    torch.manual_seed(0)
    layers = [aik_layer(impl)(64, 64, 3, 2, 1).to(device)
              for impl in ('triton', 'torch')]
    nn.init.normal_(layers[0].generator.head.weight, std=0.5)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 64, 28, 28, device=device)
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.ones_like(out))
        results.append([out, xi.grad] +
                       [p.grad for p in layer.parameters()])
    floor = 1e-3 * max(e.abs().max().item() for e in results[1])
    errors = [max_error(a, e, floor) for a, e in zip(*results)]
    print(f'  layer fp32, triton vs torch path, C=64 28x28 stride 2: max '
          f'err over output and {len(errors) - 1} gradients '
          f'{max(errors):.1e}')
    return max(errors) <= TOLERANCE['fp32'] * 10


def check_correctness(device, tf32):
    """fp32 with TF32 off (and on, when timing uses it), bf16, layer."""
    print('## correctness on', torch.cuda.get_device_name(device))
    torch.manual_seed(0)
    ok = True
    for precision in ['fp32', 'tf32', 'bf16'] if tf32 else ['fp32', 'bf16']:
        torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
        dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
        print(f'  {precision}, tolerance {TOLERANCE[precision]:g}')
        ok &= check_op(dtype, TOLERANCE[precision], device)
    torch.backends.cuda.matmul.allow_tf32 = False
    if AIKConv2d is not None:
        ok &= check_layer(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"  correctness: {'PASS' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------ timing

class Timer:
    """Median GPU milliseconds of fn between CUDA events.

    Before each run the L2 cache is flushed and the GPU is kept busy (a
    sleep kernel) for longer than the host takes to enqueue fn, so the
    events time the kernels, not Python's launch overhead; that host time
    is returned too.
    """

    def __init__(self, device, warmup, runs):
        self.warmup, self.runs = warmup, runs
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8,
                                 device=device)
        self.cycles_per_ms = self._calibrate_sleep()

    @staticmethod
    def _calibrate_sleep(cycles=10**7):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / start.elapsed_time(end)

    def __call__(self, fn):
        """(median GPU ms, median host ms) of fn."""
        host = []
        for _ in range(self.warmup):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            fn()
            host.append(time.perf_counter() - begin)
        head_start = 2 * statistics.median(host) * 1e3 + 0.2
        events = []
        host = []
        for _ in range(self.runs):
            self.flush.zero_()
            torch.cuda._sleep(int(head_start * self.cycles_per_ms))
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin = time.perf_counter()
            start.record()
            fn()
            end.record()
            host.append(time.perf_counter() - begin)
            torch.cuda.synchronize()
            events.append((start, end))
        return (statistics.median(s.elapsed_time(e) for s, e in events),
                statistics.median(host) * 1e3)


def peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _forward_under(autocast, module, x):
    with autocast():
        return module(x)


def measure(module, x, grad_out, autocast, timer):
    x_grad = x.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad(), autocast():
            module(x)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        x_grad.grad = None
        with autocast():
            out = module(x_grad)
        out.backward(grad_out)

    module.eval()
    fwd, _ = timer(forward)
    module.train()
    fwd_bwd, host = timer(forward_backward)
    module.zero_grad(set_to_none=True)
    x_grad.grad = None
    return dict(fwd=fwd, fwd_bwd=fwd_bwd, host=host,
                saved=saved_bytes(lambda: _forward_under(autocast, module, x_grad)),
                peak=peak_bytes(forward_backward))


def bench_shape(shape, precision, args, timer, device):
    channels, size, stride = shape
    torch.manual_seed(0)
    rows = build_rows(channels, size, stride, args.batch)
    act_dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    memory_format = (torch.channels_last if args.memory_format ==
                     'channels_last' else torch.contiguous_format)
    x = torch.randn(args.batch, channels, size, size, device=device,
                    dtype=act_dtype).contiguous(memory_format=memory_format)
    out_size = (size - 1) // stride + 1
    grad_out = torch.randn(args.batch, channels, out_size, out_size,
                           device=device, dtype=act_dtype).contiguous(
                               memory_format=memory_format)

    def autocast():
        if precision != 'bf16':
            return nullcontext()
        return torch.autocast('cuda', dtype=torch.bfloat16)

    results = {}
    for name, module in rows.items():
        module.to(device)
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                conv.to(memory_format=memory_format)
        results[name] = measure(module, x, grad_out, autocast, timer)
        del module
        torch.cuda.empty_cache()
    return results


def format_table(shape, precision, results, args, device_name):
    channels, size, stride = shape
    base = next(iter(results.values()))
    lines = [
        f'\n### {device_name} | {precision} | C={channels}, {size}x{size}, '
        f'stride {stride}, batch {args.batch}, {args.memory_format}\n',
        '| row | fwd ms | fwd x | fwd+bwd ms | fwd+bwd x | saved MB '
        '| saved x | peak MB | peak x | host ms fwd+bwd |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['fwd']:.3f} | {r['fwd'] / base['fwd']:.2f} "
            f"| {r['fwd_bwd']:.3f} | {r['fwd_bwd'] / base['fwd_bwd']:.2f} "
            f"| {r['saved'] / 2**20:.1f} | {r['saved'] / base['saved']:.2f} "
            f"| {r['peak'] / 2**20:.1f} | {r['peak'] / base['peak']:.2f} "
            f"| {r['host']:.2f} |")
    return '\n'.join(lines)


def target_row(shape, precision, results):
    """Summary line for row (c), or (b) without mmcv."""
    base = next(iter(results.values()))
    name = 'AIK layer, triton' if 'AIK layer, triton' in results \
        else 'AIK op, triton'
    r = results[name]
    time_x = r['fwd_bwd'] / base['fwd_bwd']
    saved_x = r['saved'] / base['saved']
    ok = time_x <= TARGET_TIME and saved_x <= TARGET_SAVED
    return (f'| C={shape[0]} {shape[1]}x{shape[1]} s{shape[2]} | {precision} '
            f'| {name} | {time_x:.2f} | {saved_x:.2f} '
            f"| {'ok' if ok else 'MISS'} |"), ok


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--runs', type=int, default=50)
    parser.add_argument('--precisions', nargs='+', default=['bf16', 'fp32'],
                        choices=['bf16', 'fp32'])
    parser.add_argument('--shapes', nargs='+', type=int,
                        default=list(range(len(SHAPES))),
                        help=f'indices into {SHAPES}')
    parser.add_argument('--memory-format', default='channels_last',
                        choices=['channels_last', 'nchw'])
    parser.add_argument('--no-tf32', action='store_true',
                        help='IEEE float32 in cuDNN and Triton alike')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: batch 8, 2 shapes, 3 warm-up, '
                        '10 runs')
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.runs, args.shapes = 8, 3, 10, [0, 4]
    return args


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit('needs a CUDA GPU')
    device = torch.device('cuda')
    device_name = torch.cuda.get_device_name(device)
    tf32 = not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    import triton
    print(f'{device_name}, torch {torch.__version__}, triton '
          f'{triton.__version__}, cuDNN {torch.backends.cudnn.version()}, '
          f'TF32 {"on" if tf32 else "off"} (matmul and cuDNN), '
          f'cudnn.benchmark on; median of {args.runs} runs after '
          f'{args.warmup} warm-up, L2 flushed before each')
    if AIKConv2d is None:
        print(f'mmdynconv.cnn unavailable ({LAYER_IMPORT_ERROR}): '
              'op-level rows only')
    if not check_correctness(device, tf32):
        sys.exit(1)
    timer = Timer(device, args.warmup, args.runs)
    summary, all_ok = [], True
    for precision in args.precisions:
        for index in args.shapes:
            shape = SHAPES[index]
            results = bench_shape(shape, precision, args, timer, device)
            print(format_table(shape, precision, results, args, device_name),
                  flush=True)
            line, ok = target_row(shape, precision, results)
            summary.append(line)
            all_ok &= ok
    print(f'\n### targets on {device_name}: fwd+bwd <= {TARGET_TIME}x and '
          f'saved <= {TARGET_SAVED}x of nn.Conv2d ({args.memory_format})\n')
    print('| shape | precision | row | fwd+bwd x | saved x | target |')
    print('|---|---|---|---|---|---|')
    print('\n'.join(summary))
    print(f"\nall targets met: {'yes' if all_ok else 'no'}")


if __name__ == '__main__':
    main()

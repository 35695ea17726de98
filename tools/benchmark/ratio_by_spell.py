"""CPU: the AIK layer's and op's time ratios to nn.Conv2d, fast steps to fast
steps.

On a shared machine every row's step time swings (the convolution's at
C = 64, 56x56 here between about 6 and 12 ms), so one median ratio depends on
when it was taken. This script times nn.Conv2d, the op alone (attention
given) and the whole layer forward+backward in turn for many rounds in one
process, sorts each row's times on their own and prints the medians over all
rounds, then per quarter (fastest first) the row's median within it: the
fastest quarters compare the rows as a quiet machine runs them. (Sorting the rounds by the convolution's time
alone would pick rounds where the convolution was lucky, not where the
machine was quiet, and inflate the other rows' ratios.)

    python tools/benchmark/ratio_by_spell.py [--rounds 200] [--shape C SIZE STRIDE]
        [--adaptive-heap]

glibc's heap is held as in benchmark_aik_conv.py (``cpu_heap.py``).
"""
import argparse
import statistics
import time

import torch

from aik_rows import SHAPES
from benchmark_aik_conv import build_layers
from cpu_heap import hold_heap


def timed_rounds(channels, size, stride, batch, rounds, warmup=10):
    """[{row: seconds}] of forward+backward steps, the rows in turn (built
    as the benchmark builds them)."""
    torch.manual_seed(0)
    layers = build_layers(channels, size, stride, batch)
    rows = {
        'conv': layers['nn.Conv2d'],
        'op': layers['AIK op, A given'],
        'layer': layers['AIK layer'],
    }
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    times = []
    for i in range(warmup + rounds):
        round_times = {}
        for name, layer in rows.items():
            start = time.perf_counter()
            layer(x).sum().backward()
            round_times[name] = time.perf_counter() - start
        if i >= warmup:
            times.append(round_times)
    return times


def medians(times):
    """Over all rounds, then per quarter of each row's own sorted times
    (fastest first): the convolution's median (ms) and the op's and layer's
    medians as ratios to it."""
    size = len(times) // 4
    ordered = {row: sorted(t[row] for t in times) for row in times[0]}
    for first, last in [(0, len(times))] + [(q * size, (q + 1) * size)
                                             for q in range(4)]:
        median = {
            row: statistics.median(values[first:last])
            for row, values in ordered.items()
        }
        yield (median['conv'] * 1e3, median['op'] / median['conv'],
               median['layer'] / median['conv'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=200)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--shape', type=int, nargs=3, default=None,
                        metavar=('C', 'SIZE', 'STRIDE'))
    parser.add_argument('--adaptive-heap', action='store_true',
                        help="keep glibc's adaptive malloc thresholds")
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error(f'--rounds must be at least 4, got {args.rounds}')
    heap = hold_heap(args.adaptive_heap)
    shapes = [tuple(args.shape)] if args.shape else SHAPES
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'batch {args.batch}, {args.rounds} rounds; medians of all rounds, '
          'then per quarter of each row\'s sorted times, fastest first: '
          f'conv ms, op / conv, layer / conv; {heap}')
    for shape in shapes:
        all_rounds, *by_quarter = [
            f'{conv:.2f} ms {op:.2f} {layer:.2f}' for conv, op, layer in
            medians(timed_rounds(*shape, args.batch, args.rounds))
        ]
        print(f'C={shape[0]}, {shape[1]}x{shape[1]}, stride {shape[2]}: '
              f'{all_rounds} || ' + ' | '.join(by_quarter), flush=True)


if __name__ == '__main__':
    main()

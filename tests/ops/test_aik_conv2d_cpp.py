"""The compiled CPU path against the float64 loop reference, on both of its
schedules (parallel cache-sized tiles, and the whole batch as one tile)."""
import contextlib
import itertools

import pytest
import torch

import mmdynconv.ops.aik_conv2d_cpp as cpp
from mmdynconv.ops import aik_conv2d
from mmdynconv.ops.aik_conv2d import _default_impl
from test_aik_conv2d import loop_reference, make_case


def test_extension_is_built_and_default_on_cpu():
    assert cpp.AVAILABLE, 'setup.py did not build mmdynconv.ops._cpu'
    assert _default_impl(torch.zeros(1)) == 'cpp'


@contextlib.contextmanager
def torch_threads(threads):
    """Runs the block with torch on ``threads`` threads, then restores."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


def grads_of(case, args, impl):
    inputs = [t.clone().requires_grad_() for t in case]
    out = aik_conv2d(*inputs, *args, impl=impl)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype))
                 .view_as(out))
    return [out] + [t.grad for t in inputs]


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('tile_elements', [1, 300, 1 << 17])
def test_schedules_match_reference(monkeypatch, threads, tile_elements):
    """Tiny tile budgets force many parallel tiles (and, with two threads,
    concurrent input-gradient bands); the default budget runs the whole
    batch as one tile at these sizes. Every pass may start threads, however
    small."""
    monkeypatch.setattr(cpp, 'TILE_ELEMENTS', tile_elements)
    monkeypatch.setattr(cpp, 'THREAD_ELEMENTS', 1)
    with torch_threads(threads):
        for (kernel, stride, pad, dilation, attn_groups,
             size) in itertools.product([(3, 3), (1, 1), (5, 3)], [1, 2, 3],
                                        [0, 1, 2], [1, 2], [1, 2],
                                        [(16, 16), (11, 7)]):
            padding = (pad, pad if kernel[1] > 1 else 0)
            case = make_case(3, 4, 5, size, kernel, stride, padding, dilation,
                             1, attn_groups)
            if case is None:
                continue
            args = (stride, stride), padding, (dilation, dilation), 1
            expected = loop_reference(*case, *args)
            cpp_out, *cpp_grads = grads_of(case, args, 'cpp')
            torch.testing.assert_close(cpp_out, expected, rtol=1e-10,
                                       atol=1e-10)
            for actual, reference in zip(cpp_grads,
                                         grads_of(case, args,
                                                  'reference')[1:]):
                torch.testing.assert_close(actual, reference, rtol=1e-10,
                                           atol=1e-10)


@pytest.mark.parametrize('tile_elements', [1, 1 << 17])
@pytest.mark.parametrize('width', [1, 2, 3])
def test_taps_wider_than_the_input(monkeypatch, tile_elements, width):
    """A 5x5 kernel with padding 2 on inputs 1-3 pixels wide: taps shift
    columns by up to two pixels, more than a row's width at width 1, which
    the passes' flat runs over whole rows cannot take. With tiny tiles the
    bands run concurrently on two threads."""
    monkeypatch.setattr(cpp, 'TILE_ELEMENTS', tile_elements)
    monkeypatch.setattr(cpp, 'THREAD_ELEMENTS', 1)
    with torch_threads(2):
        case = make_case(2, 3, 4, (40, width), (5, 5), 1, (2, 2), 1, 1, 1)
        args = (1, 1), (2, 2), (1, 1), 1
        cpp_out, *cpp_grads = grads_of(case, args, 'cpp')
        ref_out, *ref_grads = grads_of(case, args, 'reference')
        torch.testing.assert_close(cpp_out, ref_out, rtol=1e-10, atol=1e-10)
        for actual, expected in zip(cpp_grads, ref_grads):
            torch.testing.assert_close(actual, expected, rtol=1e-10,
                                       atol=1e-10)


@pytest.mark.parametrize('tile_elements', [300, 1 << 17])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('wanted', [(True, False, False), (False, True, False),
                                    (False, False, True),
                                    (False, True, True)])
def test_each_subset_of_gradients(monkeypatch, tile_elements, stride, wanted):
    """The backward skips the passes a gradient alone does not need (the
    weight's alone builds the patches without the patch gradient)."""
    monkeypatch.setattr(cpp, 'TILE_ELEMENTS', tile_elements)
    case = make_case(2, 4, 3, (9, 8), (3, 3), stride, (1, 1), 1, 1, 2)
    grad_out = torch.randn(2, 3, *[(n - 1) // stride + 1 for n in (9, 8)],
                           dtype=torch.float64)
    grads = {}
    for impl in ('cpp', 'reference'):
        inputs = [t.clone().requires_grad_(want)
                  for t, want in zip(case[:3], wanted)]
        aik_conv2d(*inputs, stride=stride, padding=1,
                   impl=impl).backward(grad_out)
        grads[impl] = [t.grad for t in inputs]
    for actual, expected, want in zip(grads['cpp'], grads['reference'],
                                      wanted):
        if want:
            torch.testing.assert_close(actual, expected, rtol=1e-10,
                                       atol=1e-10)
        else:
            assert actual is None


def test_partial_gradients_and_layouts():
    x, attn, weight, bias = make_case(2, 6, 4, (10, 8), (3, 3), 1, (1, 1),
                                      1, 1, 3)
    expected = loop_reference(x, attn, weight, bias, (1, 1), (1, 1), (1, 1),
                              1)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    out = aik_conv2d(channels_last, attn.transpose(3, 4).contiguous()
                     .transpose(3, 4), weight, bias, padding=1, impl='cpp')
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)
    attn.requires_grad_()
    aik_conv2d(x, attn, weight, padding=1, impl='cpp').sum().backward()
    reference = attn.grad.clone()
    attn.grad = None
    aik_conv2d(x, attn, weight, padding=1, impl='reference').sum().backward()
    torch.testing.assert_close(reference, attn.grad)


def test_unbuilt_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpp, 'AVAILABLE', False)
    x, attn, weight, _ = make_case(1, 4, 4, (5, 5), (3, 3), 1, (1, 1), 1, 1,
                                   1)
    with pytest.raises(RuntimeError, match='not built'):
        aik_conv2d(x, attn, weight, padding=1, impl='cpp')


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('tile_elements', [300, 1 << 17])
def test_results_outlive_the_next_call(monkeypatch, threads, tile_elements):
    """The extension keeps its temporaries from one call to the next: what
    a call returned must not change when the next call (other values, then
    another dtype) reuses them."""
    monkeypatch.setattr(cpp, 'TILE_ELEMENTS', tile_elements)
    with torch_threads(threads):
        args = (2, 2), (1, 1), (1, 1), 1
        first = make_case(2, 4, 5, (9, 8), (3, 3), 2, (1, 1), 1, 1, 1)
        results = grads_of(first, args, 'cpp')
        kept = [t.clone() for t in results]
        torch.manual_seed(1)
        second = [torch.randn_like(t) if t is not None else None
                  for t in first]
        grads_of(second, args, 'cpp')
        grads_of([t.float() for t in second], args, 'cpp')
        for result, copy in zip(results, kept):
            assert torch.equal(result, copy)
        for result, expected in zip(results, grads_of(first, args, 'cpp')):
            assert torch.equal(result, expected)

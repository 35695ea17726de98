import itertools

import pytest
import torch
import torch.nn.functional as F

from mmdynconv.ops import aik_conv2d

IMPLS = ('cpp', 'torch', 'reference')


def loop_reference(x, attn, weight, bias, stride, padding, dilation, groups):
    """The AIK formula tap by tap and group by group, in float64."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    batch, channels = x.shape[:2]
    out_channels, group_channels, kh, kw = weight.shape
    out_h, out_w = attn.shape[3:]
    per_channel = attn.repeat_interleave(channels // attn.shape[1], dim=1)
    padded = F.pad(x, (pw, pw, ph, ph))
    out = x.new_zeros(batch, out_channels, out_h, out_w)
    group_out = out_channels // groups
    for i, j in itertools.product(range(kh), range(kw)):
        window = padded[:, :, i * dh:i * dh + sh * (out_h - 1) + 1:sh,
                        j * dw:j * dw + sw * (out_w - 1) + 1:sw]
        modulated = window * per_channel[:, :, i * kw + j]
        for g in range(groups):
            out[:, g * group_out:(g + 1) * group_out] += torch.einsum(
                'oc,bchw->bohw',
                weight[g * group_out:(g + 1) * group_out, :, i, j],
                modulated[:, g * group_channels:(g + 1) * group_channels])
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_case(batch, channels, out_channels, size, kernel, stride, padding,
              dilation, groups, attn_groups, dtype=torch.float64):
    kh, kw = kernel
    h_out = out_size(size[0], kh, stride, padding[0], dilation)
    w_out = out_size(size[1], kw, stride, padding[1], dilation)
    if h_out < 1 or w_out < 1:
        return None
    x = torch.randn(batch, channels, *size, dtype=dtype)
    attn = torch.rand(batch, attn_groups, kh * kw, h_out, w_out,
                      dtype=dtype) * 2
    weight = torch.randn(out_channels, channels // groups, kh, kw,
                         dtype=dtype)
    bias = torch.randn(out_channels, dtype=dtype)
    return x, attn, weight, bias


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('kernel', [(1, 1), (3, 3), (5, 5), (3, 1)])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilation', [1, 2])
def test_matches_loop_reference_over_grid(impl, kernel, stride, dilation):
    checked = 0
    for pad, groups, attn_groups, batch, size in itertools.product(
            [0, 1, 2], ['one', 'two', 'depthwise'], [1, 2], [1, 3],
        [(7, 9), (1, 1)]):
        channels = 4
        groups = {'one': 1, 'two': 2, 'depthwise': channels}[groups]
        padding = (pad, pad if kernel[1] > 1 else 0)
        case = make_case(batch, channels, 6 if groups != channels else 8,
                         size, kernel, stride, padding, dilation, groups,
                         attn_groups)
        if case is None:
            continue
        args = (stride, stride), padding, (dilation, dilation), groups
        expected = loop_reference(*case, *args)
        actual = aik_conv2d(*case, *args, impl=impl)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
        checked += 1
    assert checked >= 24


@pytest.mark.parametrize('groups,attn_groups', [(1, 1), (2, 2), (1, 2),
                                                (6, 1), (2, 3)])
def test_gradcheck_fast_path(groups, attn_groups):
    x, attn, weight, bias = make_case(2, 6, 6, (5, 6), (3, 3), 2, (1, 1), 1,
                                      groups, attn_groups)
    inputs = [t.requires_grad_() for t in (x, attn, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *t: aik_conv2d(*t, stride=2, padding=1, groups=groups),
        inputs)


def test_gradients_match_reference_with_dilation_and_rect_kernel():
    case = make_case(3, 4, 6, (7, 9), (3, 1), 1, (2, 0), 2, 2, 2)
    grads = {}
    for impl in IMPLS:
        inputs = [t.clone().requires_grad_() for t in case]
        out = aik_conv2d(*inputs, padding=(2, 0), dilation=2, groups=2,
                         impl=impl)
        out.backward(torch.linspace(-1, 1, out.numel(),
                                    dtype=out.dtype).view_as(out))
        grads[impl] = [t.grad for t in inputs]
    for impl in ('cpp', 'torch'):
        for fast, ref in zip(grads[impl], grads['reference']):
            torch.testing.assert_close(fast, ref)


def test_float32_close_to_float64():
    case = make_case(2, 8, 8, (9, 9), (3, 3), 1, (1, 1), 1, 1, 1)
    expected = loop_reference(*case, (1, 1), (1, 1), (1, 1), 1)
    actual = aik_conv2d(*(t.float() for t in case), padding=1)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_runs_in_low_precision_and_backprops(dtype):
    x, attn, weight, bias = (t.float().requires_grad_()
                             for t in make_case(2, 8, 8, (9, 9), (3, 3), 1,
                                                (1, 1), 1, 1, 1))
    expected = aik_conv2d(x, attn, weight, bias, padding=1)
    with torch.autocast('cpu', dtype=dtype):
        actual = aik_conv2d(x, attn, weight, bias, padding=1)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, rtol=0.05,
                               atol=0.3)
    actual.float().sum().backward()
    for t in (x, attn, weight, bias):
        assert t.grad is not None and t.grad.dtype == torch.float32
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize('impl', IMPLS)
def test_memory_layouts(impl):
    x, attn, weight, bias = make_case(2, 8, 6, (9, 7), (3, 3), 1, (1, 1), 1,
                                      2, 2)
    expected = loop_reference(x, attn, weight, bias, (1, 1), (1, 1), (1, 1),
                              2)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    for variant in (channels_last, transposed):
        out = aik_conv2d(variant, attn, weight, bias, padding=1, groups=2,
                         impl=impl)
        torch.testing.assert_close(out, expected)
    out = aik_conv2d(channels_last, attn, weight, bias, padding=1, groups=2,
                     impl=impl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    strided_attn = attn.transpose(3, 4).contiguous().transpose(3, 4)
    torch.testing.assert_close(
        aik_conv2d(x, strided_attn, weight, bias, padding=1, groups=2,
                   impl=impl), expected)


def saved_bytes(fn):
    """Bytes autograd keeps for backward while building fn's graph."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_fast_path_saves_only_inputs():
    x, attn, weight, _ = (t.float().requires_grad_()
                          for t in make_case(2, 16, 16, (14, 14), (3, 3), 1,
                                             (1, 1), 1, 1, 1))
    operands = sum(t.numel() * 4 for t in (x, attn, weight))
    fast = saved_bytes(lambda: aik_conv2d(x, attn, weight, padding=1))
    ref = saved_bytes(
        lambda: aik_conv2d(x, attn, weight, padding=1, impl='reference'))
    assert fast <= operands
    assert ref >= 9 * x.numel() * 4  # the unfolded input, kept by autograd


@pytest.mark.parametrize('kwargs,match', [
    (dict(x=(2, 4, 8)), r'input must have shape \(B, C, H, W\), got shape '
     r'\(2, 4, 8\)'),
    (dict(attn=(2, 1, 9, 8)), r'attn must have shape .*got shape '
     r'\(2, 1, 9, 8\)'),
    (dict(attn=(2, 1, 9, 7, 8)), r'attn must have shape \(B, G, K, H_out, '
     r'W_out\) = \(2, 1, 9, 8, 8\), got shape \(2, 1, 9, 7, 8\)'),
    (dict(attn=(2, 1, 4, 8, 8)), r'= \(2, 1, 9, 8, 8\), got shape '
     r'\(2, 1, 4, 8, 8\)'),
    (dict(attn=(2, 3, 9, 8, 8)), r'attn groups G=3 .* must divide the '
     r'input channels C=4'),
    (dict(weight=(6, 3, 3, 3)), r'weight must have shape \(O, C/groups, kh, '
     r'kw\) = \(6, 4, 3, 3\), got shape \(6, 3, 3, 3\)'),
    (dict(weight=(6, 4, 3)), r'weight must have shape .*got shape '
     r'\(6, 4, 3\)'),
    (dict(groups=3), r'groups=3 must divide the input channels C=4'),
    (dict(bias=(5, )), r'bias must have shape \(6,\), got shape \(5,\)'),
    (dict(stride=(1, 2, 3)), r'stride must be an int or a pair'),
    (dict(impl='cuda'), r"impl must be one of \('triton', 'cpp', 'torch', 'reference'\)"),
])
def test_errors_name_the_argument(kwargs, match):
    shapes = dict(x=(2, 4, 8, 8), attn=(2, 1, 9, 8, 8), weight=(6, 4, 3, 3),
                  bias=(6, ))
    shapes.update({k: v for k, v in kwargs.items() if k in shapes})
    options = dict(stride=1, padding=1, groups=1, impl=None)
    options.update({k: v for k, v in kwargs.items() if k in options})
    tensors = [torch.randn(*shapes[k]) for k in ('x', 'attn', 'weight',
                                                 'bias')]
    with pytest.raises(ValueError, match=match):
        aik_conv2d(*tensors, **options)

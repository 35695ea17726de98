"""The generator's depthwise pass, compiled and torch paths, against
autograd through F.conv2d written out here."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from mmdynconv.ops import depthwise_context as dc

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

GEOMETRIES = [
    # (H, W), (kh, kw), stride, padding, dilation
    *itertools.product([(7, 9)], [(3, 3), (1, 1), (3, 1), (5, 5)], [1, 2],
                       [0, 1, 2], [1, 2]),
    ((1, 1), (3, 3), 1, 1, 1),
    ((1, 1), (3, 3), 2, 1, 1),
    ((12, 13), (3, 3), 3, 1, 2),
    ((8, 8), (2, 4), (2, 1), (0, 2), (1, 3)),
    # no tap reads the last column and row: the pooled mean's gradient
    # reaches them apart from the conv's
    ((5, 5), (2, 2), 2, 0, 1),
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def valid(size, kernel, stride, padding, dilation):
    return all(s + 2 * p - d * (k - 1) - 1 >= 0 for s, k, p, d in zip(
        size, kernel, pair(padding), pair(dilation)))


CASES = [g for g in GEOMETRIES if valid(*g)]


def inputs(size, kernel, channels=5):
    torch.manual_seed(0)
    x = torch.randn(3, channels, *size, dtype=DTYPE) + 0.3
    weight = torch.randn(channels, 1, *kernel, dtype=DTYPE)
    return x, weight


@pytest.mark.parametrize('size,kernel,stride,padding,dilation', CASES)
@pytest.mark.parametrize('given_mean', [False, True])
@pytest.mark.parametrize('maps', [3, 11])  # the compiled pass: 8 at a time
def test_forward_and_backward_match_autograd(generator_path, size, kernel,
                                             stride, padding, dilation,
                                             given_mean, maps):
    geo = pair(stride), pair(padding), pair(dilation)
    x, weight = inputs(size, kernel)
    mean = torch.randn(5, dtype=DTYPE) if given_mean else None
    out = dc.depthwise_context(x, weight, *geo, mean)

    x_ref = x.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    z = F.conv2d(x_ref, w_ref, None, *geo, groups=5)
    mean_ref = z.mean((0, 2, 3)) if mean is None else mean
    centred = z - mean_ref[:, None, None]
    pooled = x_ref.mean((2, 3))
    torch.testing.assert_close(out.centred, centred, **TOL)
    torch.testing.assert_close(out.mean, mean_ref, **TOL)
    torch.testing.assert_close(out.pooled, pooled, **TOL)
    if mean is None:
        torch.testing.assert_close(out.var, (centred**2).mean((0, 2, 3)),
                                   **TOL)
    else:
        assert out.var is None

    # the backward takes z's centring as constant (stat carries a norm's
    # terms through its statistics), so the reference differentiates the
    # uncentred conv with the gradient written out
    grad_local, proj = local_gradient(z, maps)
    u = torch.einsum('mc,bmhw->bchw', proj, grad_local)
    grad_pooled = torch.randn_like(pooled)
    scale, stat = torch.randn(5, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    fixed = z.detach() - mean_ref.detach()[:, None, None]
    g = (scale[:, None, None] * u +
         (stat[:, 0] * (u * fixed).sum((0, 2, 3)))[:, None, None] * fixed +
         (stat[:, 1] * u.sum((0, 2, 3)))[:, None, None])
    torch.autograd.backward([z, pooled], [g, grad_pooled])
    grad_x, grad_w, cross = dc.depthwise_context_backward(
        grad_local.flatten(2), proj, x, weight, *geo, mean_ref.detach(),
        scale, stat, grad_pooled, (True, True))
    torch.testing.assert_close(grad_x, x_ref.grad, **TOL)
    torch.testing.assert_close(grad_w, w_ref.grad, **TOL)
    torch.testing.assert_close(
        cross, torch.einsum('bmhw,bchw->mc', grad_local, fixed), **TOL)


def local_gradient(z, maps=3):
    """A gradient of ``maps`` local maps of z's size and the projection
    (maps, C) from z's channels to them."""
    grad_local = torch.randn(z.shape[0], maps, *z.shape[2:], dtype=DTYPE)
    return grad_local, torch.randn(maps, z.shape[1], dtype=DTYPE)


@pytest.mark.parametrize('needs', [(True, False), (False, True)])
def test_backward_without_statistics_terms_or_pooled_gradient(
        generator_path, needs):
    geo = (2, 2), (1, 1), (1, 1)
    x, weight = inputs((9, 8), (3, 3))
    x_ref = x.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    z = F.conv2d(x_ref, w_ref, None, *geo, groups=5)
    grad_local, proj = local_gradient(z, maps=1)
    scale = torch.randn(5, dtype=DTYPE)
    z.backward(scale[:, None, None] * proj.t()[None, :, :, None] * grad_local)
    *grads, cross = dc.depthwise_context_backward(
        grad_local.flatten(2), proj, x, weight, *geo,
        torch.zeros(5, dtype=DTYPE), scale, None, None, needs)
    for grad, need, expected in zip(grads, needs, (x_ref.grad, w_ref.grad)):
        if need:
            torch.testing.assert_close(grad, expected, **TOL)
        else:
            assert grad is None
    torch.testing.assert_close(
        cross, torch.einsum('bmhw,bchw->mc', grad_local, z.detach()), **TOL)


@pytest.mark.parametrize('kernel,stride,padding', [(3, 1, 1), (3, 2, 1),
                                                    (2, 2, 0)])
def test_backward_adds_into_a_given_gradient(generator_path, kernel, stride,
                                             padding):
    geo = (stride, stride), (padding, padding), (1, 1)
    x, weight = inputs((9, 9), (kernel, kernel))
    z = F.conv2d(x, weight, None, *geo, groups=5)
    grad_local, proj = local_gradient(z)
    args = (grad_local.flatten(2), proj, x, weight, *geo,
            torch.randn(5, dtype=DTYPE), torch.randn(5, dtype=DTYPE),
            torch.randn(5, 2, dtype=DTYPE), torch.randn(3, 5,
                                                        dtype=DTYPE))
    alone, grad_w, cross = dc.depthwise_context_backward(*args, (True, True))
    existing = torch.randn_like(x)
    into = existing.clone()
    summed, grad_w2, cross2 = dc.depthwise_context_backward(
        *args, (True, True), into)
    assert summed is into
    torch.testing.assert_close(summed, existing + alone, **TOL)
    torch.testing.assert_close(grad_w2, grad_w, **TOL)
    torch.testing.assert_close(cross2, cross, **TOL)


def test_float32_and_non_contiguous_input(generator_path):
    geo = (1, 1), (1, 1), (1, 1)
    x, weight = inputs((10, 11), (3, 3), channels=6)
    x32 = x.float().transpose(2, 3)  # (3, 6, 11, 10), not contiguous
    out = dc.depthwise_context(x32, weight.float(), *geo)
    z = F.conv2d(x.transpose(2, 3), weight, None, *geo, groups=6)
    torch.testing.assert_close(out.centred.double(),
                               z - z.mean((0, 2, 3))[:, None, None],
                               rtol=1e-5, atol=1e-5)


def test_compiled_path_rejects_mismatched_shapes():
    if not dc.AVAILABLE:
        pytest.fail('the CPU extension is not built')
    geo = (1, 1), (1, 1), (1, 1)
    x, weight = inputs((6, 6), (3, 3))
    with pytest.raises(RuntimeError, match='weight must be'):
        dc.depthwise_context(x, weight[:4], *geo)
    vector = torch.zeros(5, dtype=DTYPE)
    proj = torch.zeros(2, 5, dtype=DTYPE)
    grad_local = torch.zeros(3, 2, 36, dtype=DTYPE)
    with pytest.raises(RuntimeError, match='grad_local must be'):
        dc.depthwise_context_backward(grad_local[:, :, :30], proj, x, weight,
                                      *geo, vector, vector, None, None,
                                      (True, True))
    with pytest.raises(RuntimeError, match='proj must be'):
        dc.depthwise_context_backward(grad_local, proj[:, :4], x, weight,
                                      *geo, vector, vector, None, None,
                                      (True, True))
    with pytest.raises(RuntimeError, match='stat must be'):
        dc.depthwise_context_backward(grad_local, proj, x, weight, *geo,
                                      vector, vector,
                                      torch.zeros(5, 3, dtype=DTYPE), None,
                                      (True, True))
    with pytest.raises(RuntimeError, match='grad_x_into must be'):
        dc.depthwise_context_backward(grad_local, proj, x, weight, *geo,
                                      vector, vector, None, None,
                                      (True, True), x[:, :, :5])
    with pytest.raises(RuntimeError, match='mean must be'):
        dc.depthwise_context(x, weight, *geo, torch.zeros(4, dtype=DTYPE))

"""The whole AIK layer as one autograd node against the same layer run as
two (the generator's node and the op's)."""
import copy

import pytest
import torch

from mmdynconv.cnn import AIKConv2d, fused_layer

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def make_layer(channels=8, **kwargs):
    layer = AIKConv2d(channels, 6, 3, padding=1, reduction=2,
                      **kwargs).to(DTYPE)
    with torch.no_grad():
        for p in layer.generator.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def node_name(out):
    return out.grad_fn.name() if out.grad_fn is not None else None


def step(layer, x, two_nodes, monkeypatch):
    """One training step's output, gradients (x, then every parameter) and
    buffers; two_nodes runs the generator and the op as separate nodes."""
    layer = copy.deepcopy(layer)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with monkeypatch.context() as patch:
        if two_nodes:
            patch.setattr(fused_layer, 'applies', lambda *args: False)
        out = layer(x)
    assert (node_name(out) == 'AIKLayerFunctionBackward') != two_nodes
    out.backward(torch.cos(torch.arange(out.numel(), dtype=DTYPE))
                 .view_as(out))
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out, grads, list(layer.buffers())


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(stride=2, bias=False),
    dict(attn_groups=2, fusion='mul', attn_act='softmax'),
    dict(context='local'),
])
@pytest.mark.parametrize('channels_last', [False, True])
def test_one_node_matches_two(kwargs, channels_last, monkeypatch):
    layer = make_layer(**kwargs)
    x = torch.randn(2, 8, 9, 11, dtype=DTYPE) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    fused = step(layer, x, False, monkeypatch)
    plain = step(layer, x, True, monkeypatch)
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == \
        channels_last
    torch.testing.assert_close(fused[0], plain[0], **TOL)
    for ours, theirs in zip(fused[1] + fused[2], plain[1] + plain[2]):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_only_the_needed_gradients(monkeypatch):
    layer = make_layer()
    layer.generator.requires_grad_(False)
    x = torch.randn(2, 8, 9, 11, dtype=DTYPE)  # no gradient wanted
    fused = step(layer, x, False, monkeypatch)
    plain = step(layer, x, True, monkeypatch)
    assert fused[1][0] is None
    assert all(g is None for g in fused[1][3:])  # the generator's
    for ours, theirs in zip(fused[1][1:3], plain[1][1:3]):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_other_cases_take_two_nodes():
    x = torch.randn(2, 8, 9, 11, dtype=DTYPE, requires_grad=True)
    grouped = AIKConv2d(8, 8, 3, padding=1, groups=2).to(DTYPE)
    assert node_name(grouped(x)) != 'AIKLayerFunctionBackward'
    layer = make_layer()
    with torch.no_grad():
        assert node_name(layer(x)) is None
    layer.eval()  # gradients on, running statistics: still one node
    assert node_name(layer(x)) == 'AIKLayerFunctionBackward'
    group_norm = make_layer(norm_cfg=dict(type='GN', num_groups=2))
    assert node_name(group_norm(x)) != 'AIKLayerFunctionBackward'


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cpu_steps_run_the_compiled_generator(dtype, monkeypatch):
    """On CPU the layer's generator is one compiled call each way, with the
    forward's arguments reused by the backward (a silent fall back to the
    torch ops would pass the comparisons above)."""
    from mmdynconv.ops import attention_generator
    calls = []

    def counted(name):
        original = getattr(attention_generator, name)

        def call(x, *args):
            calls.append((name, args[-3] if name == 'generator_backward'
                          else args[0]))
            return original(x, *args)

        return call

    for name in ('generator_forward', 'generator_backward'):
        monkeypatch.setattr(attention_generator, name, counted(name))
    layer = make_layer().to(dtype)
    x = torch.randn(2, 8, 9, 11, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()
    assert [name for name, _ in calls] == ['generator_forward',
                                           'generator_backward']
    assert calls[0][1] is calls[1][1]

import pytest
import torch
from mmengine.registry import DefaultScope
from torch import nn

from mmdynconv.cnn import AIKConv2d
from mmdynconv.ops import aik_conv2d

CONV_ARGS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=1),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=5, stride=2, padding=2, groups=4),
    dict(kernel_size=3, stride=1, padding=1, groups=8),
    dict(kernel_size=(3, 1), stride=1, padding=(1, 0), bias=False),
    dict(kernel_size=1, stride=1, padding=0),
]


def twin_conv(layer: AIKConv2d) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                     layer.stride, layer.padding, layer.dilation, layer.groups,
                     layer.bias is not None)
    conv.load_state_dict(layer.state_dict(), strict=False)
    return conv


@pytest.mark.parametrize('args', CONV_ARGS)
@pytest.mark.parametrize('train', [True, False])
def test_fresh_layer_is_its_static_convolution(args, train):
    layer = AIKConv2d(8, 8, **args).train(train)
    x = torch.randn(3, 8, 11, 10)
    expected = twin_conv(layer)(x)
    assert (layer(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize('options', [
    dict(context='local'),
    dict(context='global'),
    dict(fusion='mul'),
    dict(fusion='cat'),
    dict(attn_act='softmax'),
    dict(attn_groups=4),
])
def test_identity_at_init_for_every_option(options):
    layer = AIKConv2d(8, 16, 3, padding=1, **options)
    x = torch.randn(2, 8, 9, 9)
    assert (layer(x) - twin_conv(layer)(x)).abs().max() <= 1e-5
    assert torch.all(layer.attention(x) == 1)


def test_plain_sigmoid_halves_the_kernel_at_init():
    layer = AIKConv2d(8, 8, 3, padding=1, bias=False, attn_act='sigmoid')
    x = torch.randn(2, 8, 9, 9)
    assert torch.all(layer.attention(x) == 0.5)
    torch.testing.assert_close(layer(x), 0.5 * twin_conv(layer)(x))


def test_attention_shape():
    layer = AIKConv2d(16, 8, (3, 5), stride=2, padding=(1, 2),
                      attn_groups=2)
    assert layer.attention(torch.randn(3, 16, 13, 12)).shape == (3, 2, 15, 7,
                                                                 6)


def test_state_dict_compatible_with_conv2d():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = AIKConv2d(16, 32, 3, padding=1)
    # nn.Conv2d's default initialisation, same RNG draws
    torch.manual_seed(1)
    reference = nn.Conv2d(16, 32, 3, padding=1)
    torch.manual_seed(1)
    fresh = AIKConv2d(16, 32, 3, padding=1)
    torch.testing.assert_close(fresh.weight, reference.weight)
    torch.testing.assert_close(fresh.bias, reference.bias)

    result = layer.load_state_dict(conv.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(k.startswith('generator.') for k in result.missing_keys)
    assert {k for k in layer.state_dict() if not k.startswith('generator.')
            } == {'weight', 'bias'}
    torch.testing.assert_close(layer.weight, conv.weight)


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_build_conv_layer_in_each_scope(scope):
    from mmcv.cnn import build_conv_layer
    with DefaultScope.overwrite_default_scope(scope):
        DefaultScope.get_instance(f'test-{scope}', scope_name=scope)
        layer = build_conv_layer(
            dict(type='AIKConv', reduction=4, fusion='mul'), 16, 32, 3,
            stride=2, padding=1, bias=False)
    assert isinstance(layer, AIKConv2d)
    assert layer.stride == (2, 2) and layer.bias is None
    assert layer.generator.fusion == 'mul'
    assert layer.generator.local_proj.out_channels == 8  # max(16//4, 8)


def test_inside_mmdet_resnet_via_dcn():
    import mmdet.models  # noqa: F401  (registers mmdet's modules)
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        DefaultScope.get_instance('test-mmdet-resnet', scope_name='mmdet')
        cfg = dict(type='ResNet', depth=50, out_indices=(0, 1, 2, 3))
        plain = MODELS.build(cfg)
        aik = MODELS.build(
            dict(cfg, dcn=dict(type='AIKConv'),
                 stage_with_dcn=(False, True, True, True)))
    aik.init_weights()
    aik_layers = [m for m in aik.modules() if isinstance(m, AIKConv2d)]
    assert len(aik_layers) == 4 + 6 + 3
    assert not any(isinstance(m, AIKConv2d) for m in aik.layer1.modules())
    # Kaiming init_cfg of the parent must not un-zero the attention head.
    assert all(torch.all(m.generator.head.weight == 0) for m in aik_layers)
    result = aik.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all('.generator.' in k for k in result.missing_keys)
    plain.eval(), aik.eval()
    x = torch.randn(1, 3, 64, 64)
    for out, ref in zip(aik(x), plain(x)):
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize('options,match', [
    (dict(context='both'), r"context must be one of \('local', 'global', "
     r"'local_global'\), got 'both'"),
    (dict(fusion='concat'), r"fusion must be one of \('add', 'mul', 'cat'\)"),
    (dict(attn_act='relu'), r"attn_act must be one of \('2sigmoid', "
     r"'sigmoid', 'softmax'\)"),
    (dict(reduction=0), r'reduction must be an int >= 1, got 0'),
    (dict(attn_groups=3), r'attn_groups must be a positive int dividing '
     r'in_channels=8, got 3'),
])
def test_invalid_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        AIKConv2d(8, 8, 3, padding=1, **options)


def test_string_padding_is_refused():
    with pytest.raises(ValueError, match='padding must be an int'):
        AIKConv2d(8, 8, 3, padding='same')


def test_attention_varies_over_samples_positions_and_taps():
    """After a few steps the attention depends on the sample (through the
    global branch), the output position (local branch) and the tap (head)."""
    layer = AIKConv2d(8, 8, 3, padding=1, reduction=1)
    target = nn.Conv2d(8, 8, 5, padding=2)
    optimizer = torch.optim.Adam(layer.generator.parameters(), lr=0.05)
    for _ in range(10):
        x = torch.randn(4, 8, 16, 16)
        loss = (layer(x) - target(x).detach() * x.abs()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        x = torch.randn(1, 8, 16, 16)
        far = x.clone()
        far[..., 8:, 8:] += 3  # changes the mean, not the window at (0, 0)
        attn = layer.attention(torch.cat([x, far]))
    a0, a1 = attn[0, 0], attn[1, 0]  # (K, H_out, W_out)
    assert (a0[:, 0, 0] - a1[:, 0, 0]).abs().max() > 1e-3  # across samples
    assert (a0[:, 0, 0] - a0[:, 5, 3]).abs().max() > 1e-3  # across positions
    assert (a0[:, 2, 2].max() - a0[:, 2, 2].min()) > 1e-3  # across taps


def test_recomputed_generator_gives_exact_gradients_and_counts_once():
    torch.manual_seed(3)
    layer = AIKConv2d(8, 8, 3, padding=1)
    torch.nn.init.normal_(layer.generator.head.weight, std=0.5)
    twin = AIKConv2d(8, 8, 3, padding=1)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 10, 10)
    layer(x).square().sum().backward()
    # the same computation without recomputation
    attn = twin.generator.attention_map(x)
    aik_conv2d(x, attn, twin.weight, twin.bias,
               padding=1).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for norm in ('local_norm', 'fuse_norm'):
        ours, theirs = (getattr(m.generator, norm) for m in (layer, twin))
        assert ours.num_batches_tracked.item() == 1
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_generator_keeps_the_attention_and_its_local_maps_for_backward():
    layer = AIKConv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    attn_bytes = 2 * 9 * 16 * 16 * 4
    local_maps_bytes = 2 * 8 * 16 * 16 * 4  # M = 8 channels
    small = 64 * 64 * 9 * 4 + 2 * 64 * 4 * 4  # weight; pooled vectors etc.
    assert sum(storages.values()) <= (x.numel() * 4 + attn_bytes +
                                      local_maps_bytes + small)

"""AIKResNet, AIKResNet_CIFAR and AIKMobileNetV2 against their plain twins
(MMDetection's ResNet, MMPretrain's ResNet_CIFAR and MobileNetV2)."""
import logging
import re
from contextlib import contextmanager

import mmdet.registry
import mmpretrain.registry
import pytest
import torch
import torch.nn.functional as F
import torchvision
from mmdet.models.backbones import ResNet
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmpretrain.models.backbones import MobileNetV2, ResNet_CIFAR
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdynconv.cnn import AIKConv2d
from mmdynconv.models.backbones import (AIKMobileNetV2, AIKResNet,
                                        AIKResNet_CIFAR)

CHANNELS = {18: 64, 34: 64, 50: 256, 101: 256, 152: 256}  # of stage 0


def aik_layers(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, AIKConv2d)]


def static_state(model: nn.Module) -> dict:
    """The state dict without the attention generators."""
    return {
        k: v
        for k, v in model.state_dict().items() if '.generator.' not in k
    }


def randomize_norms_(model: nn.Module) -> nn.Module:
    """Random batch-norm affines and statistics, so that no residual branch
    is zeroed (zero_init_residual) and eval mode is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def randomize_heads_(model: nn.Module) -> nn.Module:
    """Non-zero attention heads: A is no longer 1."""
    with torch.no_grad():
        for m in aik_layers(model):
            m.generator.head.weight.normal_(0, 0.5)
            m.generator.head.bias.normal_(0, 0.5)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_outputs(outs, ref_outs, tol=1e-5):
    assert len(outs) == len(ref_outs)
    for out, ref in zip(outs, ref_outs):
        assert out.shape == ref.shape
        assert rel_diff(out, ref) <= tol


@contextmanager
def captured_log():
    """Messages logged to mmengine's current logger (where weight
    initialisers report)."""
    messages = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def missing_keys(messages) -> list:
    found = [
        re.search(r'missing keys in source state_dict: (.*)', m)
        for m in messages
    ]
    return [k for f in found if f for k in f.group(1).strip().split(', ')]


# ---------------------------------------------------------------- AIKResNet
@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_every_depth_output_shapes(depth):
    model = AIKResNet(depth=depth)
    model.eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (1, CHANNELS[depth] * 2**i, 8 // 2**i, 8 // 2**i) for i in range(4)
    ]
    per_block = 2 if depth < 50 else 1
    assert len(aik_layers(model)) == per_block * sum(model.stage_blocks)


@pytest.mark.parametrize('kwargs, shapes', [
    (dict(depth=18, out_indices=(0, )), [(64, 16)]),
    (dict(depth=18, out_indices=(1, 3)), [(128, 8), (512, 2)]),
    (dict(depth=50, out_indices=(3, )), [(2048, 2)]),
    (dict(
        depth=18,
        num_stages=3,
        strides=(1, 2, 2),
        dilations=(1, 1, 1),
        out_indices=(2, ),
        stage_with_aik=(False, True, True)), [(256, 4)]),
    (dict(
        depth=50,
        strides=(1, 2, 2, 1),
        dilations=(1, 1, 1, 2),
        out_indices=(2, 3)), [(1024, 4), (2048, 4)]),
    (dict(depth=50, style='caffe', out_indices=(3, )), [(2048, 2)]),
])
def test_out_indices_and_stage_options(kwargs, shapes):
    model = AIKResNet(**kwargs)
    model.eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [(o.shape[1], o.shape[2]) for o in outs] == shapes


def test_stage_with_aik_selects_the_3x3_convs():
    basic = AIKResNet(depth=18, stage_with_aik=(False, True, False, True))
    assert [
        len(aik_layers(basic.layer1)),
        len(aik_layers(basic.layer2)),
        len(aik_layers(basic.layer3)),
        len(aik_layers(basic.layer4))
    ] == [0, 4, 0, 4]
    assert isinstance(basic.layer2[0].conv1, AIKConv2d)
    assert isinstance(basic.layer2[0].conv2, AIKConv2d)

    bottleneck = AIKResNet(
        depth=50,
        stage_with_aik=(True, False, False, True),
        dilations=(1, 1, 1, 2),
        strides=(1, 2, 2, 1))
    assert [
        len(aik_layers(getattr(bottleneck, f'layer{i}'))) for i in range(1, 5)
    ] == [3, 0, 0, 3]
    block = bottleneck.layer4[0]
    assert isinstance(block.conv2, AIKConv2d)
    assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
    for conv in (block.conv1, block.conv3, block.downsample[0],
                 bottleneck.conv1):
        assert not isinstance(conv, AIKConv2d)
    assert type(bottleneck.layer2[0].conv2) is nn.Conv2d


@pytest.mark.parametrize('kwargs', [
    dict(depth=18),
    dict(depth=50),
    dict(depth=50, deep_stem=True),
    dict(depth=50, deep_stem=True, avg_down=True),
    dict(depth=18, deep_stem=True, avg_down=True, style='caffe'),
])
def test_fresh_model_computes_its_plain_twin(kwargs):
    model = AIKResNet(**kwargs)
    model.init_weights()  # Kaiming over all convs; heads must end at zero
    for layer in aik_layers(model):
        assert layer.generator.head.weight.abs().sum() == 0
        assert layer.generator.local_conv.weight.abs().sum() > 0
    randomize_norms_(model)
    plain = ResNet(norm_eval=False, **kwargs)
    plain.load_state_dict(static_state(model))  # strict: the same keys
    # in float64, so that only a real difference could exceed the tolerance
    model.double()
    plain.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        plain.train(train)
        with torch.no_grad():
            assert_same_outputs(model(x), plain(x), tol=1e-10)


def test_v1c_v1d_stems():
    v1c = AIKResNet(depth=50, deep_stem=True, stem_channels=32)
    assert not hasattr(v1c, 'conv1')
    assert [m.out_channels for m in v1c.stem
            if isinstance(m, nn.Conv2d)] == [16, 16, 32]
    assert type(v1c.layer2[0].downsample[0]) is nn.Conv2d
    v1d = AIKResNet(depth=50, deep_stem=True, avg_down=True)
    assert isinstance(v1d.layer2[0].downsample[0], nn.AvgPool2d)
    assert v1d.layer2[0].downsample[1].stride == (1, 1)
    v1d.eval()
    with torch.no_grad():
        outs = v1d(torch.rand(1, 3, 64, 64))
    assert outs[3].shape == (1, 2048, 2, 2)


def test_frozen_stages_have_no_grads_and_stay_in_eval():
    model = AIKResNet(depth=18, frozen_stages=2)
    model.train()
    frozen = [model.conv1, model.norm1, model.layer1, model.layer2]
    for part in frozen:
        assert all(not p.requires_grad for p in part.parameters())
    for part in frozen[1:]:  # (conv1 has no mode to freeze)
        assert all(not m.training for m in part.modules())
    assert all(m.training for m in model.layer3.modules())
    assert aik_layers(model.layer2)  # generators are frozen with their stage
    randomize_heads_(model)
    sum(o.sum() for o in model(torch.rand(2, 3, 32, 32))).backward()
    for part in frozen:
        assert all(p.grad is None for p in part.parameters())
    assert all(p.grad is not None for p in model.layer3.parameters())


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval(norm_eval):
    model = AIKResNet(depth=18, norm_eval=norm_eval)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    generator_norms = [
        m for layer in aik_layers(model) for m in layer.generator.modules()
        if isinstance(m, _BatchNorm)
    ]
    assert generator_norms
    assert all(m.training != norm_eval for m in norms
               if all(m is not g for g in generator_norms))
    # no pretrained statistics to keep: the generators' norms train
    assert all(m.training for m in generator_norms)
    assert model.layer1.training


def test_norm_eval_keeps_generators_of_frozen_stages_frozen():
    model = AIKResNet(depth=18, norm_eval=True, frozen_stages=2)
    model.train()
    for stage, frozen in (('layer1', True), ('layer2', True),
                          ('layer3', False), ('layer4', False)):
        generators = [m.generator for m in getattr(model, stage).modules()
                      if hasattr(m, 'generator')]
        assert generators
        assert all(g.local_norm.training != frozen for g in generators)


@pytest.mark.parametrize('depth', [18, 50])
def test_with_cp_gives_identical_outputs_and_gradients(depth):
    ref = randomize_heads_(AIKResNet(depth=depth))
    ckpt = AIKResNet(depth=depth, with_cp=True)
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (ref, ckpt):
        model.train()
        inputs = x.clone().requires_grad_()
        outs = model(inputs)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
            for o in outs).backward()
        grads = [p.grad for p in model.parameters()]
        results.append((outs, grads, inputs.grad))
    (outs, grads, x_grad), (cp_outs, cp_grads, cp_x_grad) = results
    assert_same_outputs(cp_outs, outs, tol=1e-6)
    assert all(g is not None for g in grads)
    # Recomputation sums the gradients in another order; gradients that are
    # zero in exact arithmetic (a bias before a training-mode batch norm) are
    # rounding noise, hence a floor relative to the largest gradient.
    floor = 1e-6 * max(g.abs().max() for g in grads)
    for g, cp_g in zip(grads + [x_grad], cp_grads + [cp_x_grad]):
        assert (cp_g - g).abs().max() <= 1e-5 * g.abs().max() + floor


def test_aik_cfg_reaches_every_aik_layer():
    model = AIKResNet(
        depth=18, aik_cfg=dict(reduction=4, attn_groups=2, attn_act='softmax'))
    for layer in aik_layers(model):
        assert layer.generator.attn_groups == 2
        assert layer.generator.act == 'softmax'
        assert layer.generator.local_proj.out_channels == max(
            layer.in_channels // 4, 8)


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match='invalid depth 20'):
        AIKResNet(depth=20)
    with pytest.raises(ValueError, match=r'stage_with_aik.*num_stages=4'):
        AIKResNet(depth=18, stage_with_aik=(True, True, True))
    with pytest.raises(ValueError, match=r'stage_with_aik.*num_stages=3'):
        AIKResNet(depth=18, num_stages=3, stage_with_aik=(True, ) * 4)
    with pytest.raises(ValueError, match='stage_with_aik'):
        AIKResNet(depth=18, stage_with_aik=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='conv_cfg'):
        AIKResNet(depth=50, conv_cfg=dict(type='Conv2d'))
    with pytest.raises(ValueError, match=r'stage_with_aik.*num_stages=7'):
        AIKMobileNetV2(stage_with_aik=(True, ) * 4)
    with pytest.raises(ValueError, match='deep_stem'):
        AIKResNet_CIFAR(depth=18, deep_stem=True)


@pytest.mark.parametrize('scope, registry', [
    ('mmdet', mmdet.registry.MODELS),
    ('mmpretrain', mmpretrain.registry.MODELS),
])
@pytest.mark.parametrize('cfg, cls', [
    (dict(type='AIKResNet', depth=18), AIKResNet),
    (dict(type='AIKResNet_CIFAR', depth=18), AIKResNet_CIFAR),
    (dict(type='AIKMobileNetV2', widen_factor=0.25), AIKMobileNetV2),
])
def test_builds_from_both_scopes(scope, registry, cfg, cls):
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg)
    assert type(model) is cls
    assert aik_layers(model)


# --------------------------------------------------------- checkpoint loading
def test_loads_torchvision_checkpoint(tmp_path):
    torchvision_model = randomize_norms_(
        torchvision.models.resnet50(weights=None)).eval()
    checkpoint = tmp_path / 'resnet50.pth'
    torch.save(torchvision_model.state_dict(), checkpoint)
    init_cfg = dict(type='Pretrained', checkpoint=str(checkpoint))
    model = AIKResNet(depth=50, init_cfg=init_cfg)
    with captured_log() as messages:
        model.init_weights()
    plain = ResNet(depth=50, init_cfg=init_cfg)
    plain.init_weights()

    generator_keys = {
        k
        for k in model.state_dict()
        if '.generator.' in k and 'num_batches_tracked' not in k
    }
    assert generator_keys and set(missing_keys(messages)) == generator_keys
    source = torchvision_model.state_dict()
    for key, value in static_state(model).items():
        assert torch.equal(value, source[key]), key

    model.eval()
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        assert_same_outputs(outs, plain(x))
        features = nn.Sequential(*list(torchvision_model.children())[:-2])
        assert rel_diff(outs[3], features(x)) <= 1e-5


def test_loads_mmpretrain_classifier_checkpoint(tmp_path):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = mmpretrain.registry.MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='ResNet', depth=18, out_indices=(3, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead', num_classes=10, in_channels=512)))
    classifier.init_weights()
    randomize_norms_(classifier).eval()
    checkpoint = tmp_path / 'classifier.pth'
    torch.save(
        dict(meta=dict(epoch=1), state_dict=classifier.state_dict()),
        checkpoint)
    model = AIKResNet(
        depth=18,
        out_indices=(3, ),
        init_cfg=dict(
            type='Pretrained', checkpoint=str(checkpoint), prefix='backbone.'))
    with captured_log() as messages:
        model.init_weights()

    missing = missing_keys(messages)
    assert missing and all('.generator.' in k for k in missing)
    assert len(missing) == len([
        k for k in model.state_dict()
        if '.generator.' in k and 'num_batches_tracked' not in k
    ])
    source = classifier.backbone.state_dict()
    assert static_state(model).keys() == source.keys()
    for key, value in static_state(model).items():
        assert torch.equal(value, source[key]), key
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_outputs(model(x), classifier.backbone(x))


@pytest.mark.parametrize('build', [
    lambda **kw: AIKResNet(depth=18, **kw),
    lambda **kw: AIKMobileNetV2(widen_factor=0.25, **kw),
])
def test_init_weights_keeps_trained_heads_of_an_aik_checkpoint(
        build, tmp_path):
    trained = randomize_heads_(build())
    checkpoint = tmp_path / 'aik.pth'
    torch.save(trained.state_dict(), checkpoint)
    model = build(init_cfg=[
        dict(type='Kaiming', layer='Conv2d'),
        dict(type='Pretrained', checkpoint=str(checkpoint))
    ])
    model.init_weights()
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------- AIKResNet_CIFAR
def test_cifar_variant_computes_mmpretrain_resnet_cifar():
    model = AIKResNet_CIFAR(depth=18)
    model.init_weights()
    randomize_norms_(model).eval()
    plain = ResNet_CIFAR(depth=18, out_indices=(0, 1, 2, 3))
    plain.eval()
    plain.load_state_dict(static_state(model))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = model.double()(x)
        assert_same_outputs(outs, plain.double()(x), tol=1e-10)
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 16, 16), (128, 8, 8),
                                                  (256, 4, 4), (512, 2, 2)]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


# ------------------------------------------------------------ AIKMobileNetV2
def test_mobilenet_v2_depthwise_convs_are_aik():
    model = AIKMobileNetV2(out_indices=(1, 4, 7))
    layers = aik_layers(model)
    assert len(layers) == 17  # one per inverted-residual block
    for layer in layers:
        assert layer.kernel_size == (3, 3)
        assert layer.groups == layer.in_channels == layer.out_channels
    model.init_weights()
    randomize_norms_(model).eval()
    plain = MobileNetV2(out_indices=(1, 4, 7))
    plain.eval()
    plain.load_state_dict(static_state(model))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        outs = model.double()(x)
        assert_same_outputs(outs, plain.double()(x), tol=1e-10)
    assert [tuple(o.shape[1:]) for o in outs] == [(24, 16, 16), (96, 4, 4),
                                                  (1280, 2, 2)]


def test_mobilenet_v2_stage_with_aik():
    model = AIKMobileNetV2(
        stage_with_aik=(True, False, False, False, False, False, True))
    assert len(aik_layers(model.layer1)) == len(aik_layers(model.layer7)) == 1
    assert len(aik_layers(model)) == 2


def test_depthwise_attention_is_sane():
    """Per-sample, per-position, per-tap attention in (0, 2) that modulates
    each channel's own kernel."""
    model = AIKMobileNetV2(widen_factor=0.5)
    model.eval()
    layer = model.layer3[0].conv[1].conv  # 3x3 depthwise, stride 2
    assert layer.stride == (2, 2)
    x = torch.randn(2, layer.in_channels, 9, 9)
    with torch.no_grad():
        assert torch.equal(layer.attention(x), torch.ones(2, 1, 9, 5, 5))
        randomize_heads_(model)
        attn = layer.attention(x)
        out = layer(x)
    assert attn.shape == (2, 1, 9, 5, 5)
    assert 0 < attn.min() and attn.max() < 2
    assert attn[0].std(dim=(2, 3)).min() > 0  # varies over positions
    assert (attn[0] - attn[1]).abs().max() > 1e-3  # and over samples
    # y[b, c, u] = sum_t W[c, t] * A[b, t, u] * x[b, c, window_t(u)]
    cols = F.unfold(x, 3, padding=1, stride=2).view(2, -1, 9, 25)
    expected = torch.einsum('ct,btu,bctu->bcu', layer.weight.flatten(1),
                            attn.flatten(3)[:, 0], cols).view(2, -1, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

"""The fused attention generator against its modules run with autograd."""
import copy

import pytest
import torch
from torch import nn

from mmdynconv.cnn import AIKAttention, AIKConv2d
from mmdynconv.cnn.fused_attention import can_fuse
from mmdynconv.ops import attention_generator

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


def reference(gen: AIKAttention, x):
    """The generator composed from its modules, differentiated by autograd
    (no recomputation, no fused path)."""
    glob = None
    if gen.global_proj is not None:
        glob = gen.global_proj(x.mean((2, 3), keepdim=True))
    if gen.local_conv is None:
        hidden = torch.relu(glob)
    else:
        local = gen.local_proj(gen.local_norm(gen.local_conv(x)))
        if glob is None:
            fused = local
        elif gen.fusion == 'add':
            fused = local + glob
        elif gen.fusion == 'mul':
            fused = local * torch.sigmoid(glob)
        else:
            fused = torch.cat([local, glob.expand_as(local)], dim=1)
        hidden = torch.relu(gen.fuse_norm(fused))
    logits = gen.head(hidden)
    logits = logits.view(logits.shape[0], gen.attn_groups, -1,
                         *logits.shape[2:])
    if gen.act == 'softmax':
        return logits.shape[2] * torch.softmax(logits, dim=2)
    scale = 2 if gen.act == '2sigmoid' else 1
    return scale * torch.sigmoid(logits)


def make_generator(channels=16, stride=1, dilation=1, **options):
    """A generator in float64 with every parameter and running statistic
    away from its initial value (the head is zero at init)."""
    gen = AIKAttention(channels, (3, 3), (stride, ) * 2, (dilation, ) * 2,
                       (dilation, ) * 2, reduction=4, **options).to(DTYPE)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
        for name, b in gen.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn_like(b))
            elif name.endswith('running_var'):
                b.copy_(torch.rand_like(b) + 0.5)
    return gen


def is_fused(attn) -> bool:
    """Whether attn came out of FusedAttention (behind the expand)."""
    node = attn.grad_fn
    while node is not None and 'Expand' in node.name():
        node = node.next_functions[0][0]
    return node is not None and node.name() == 'FusedAttentionBackward'


def run_both(gen, x, steps=1):
    """Train steps of gen (fused) and of a copy through :func:`reference`,
    with the same weighted loss. Returns both generators, the inputs with
    their gradients, and the last attention of each."""
    ref = copy.deepcopy(gen)
    x_fused = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    for _ in range(steps):
        expected = reference(ref, x_ref)
        attn = gen(x_fused, expected.shape[-2:])
        assert is_fused(attn)
        weight = torch.randn_like(expected)
        (expected * weight).sum().backward()
        (attn * weight).sum().backward()
    return gen, ref, x_fused, x_ref, attn, expected


def assert_same_state(gen, ref, x_fused, x_ref, attn, expected):
    torch.testing.assert_close(attn, expected, **TOL)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, **TOL)
    for (name, p), q in zip(gen.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    for (name, b), c in zip(gen.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)


OPTIONS = [
    dict(),
    dict(context='local'),
    dict(fusion='mul'),
    dict(fusion='cat'),
    dict(act='sigmoid'),
    dict(act='softmax'),
    dict(act='softmax', attn_groups=4),
    dict(stride=2),
    dict(dilation=2),
]


@pytest.mark.parametrize('options', OPTIONS)
@pytest.mark.parametrize('train', [True, False])
def test_values_gradients_and_statistics_match_the_modules(
        options, train, generator_path):
    gen = make_generator(**options).train(train)
    x = torch.randn(2, 16, 9, 10, dtype=DTYPE) * 2 + 0.5
    assert_same_state(*run_both(gen, x))
    if train:
        assert gen.local_norm.num_batches_tracked.item() == 1
        assert gen.fuse_norm.num_batches_tracked.item() == 1


@pytest.mark.parametrize('options', [
    dict(),
    dict(fusion='mul'),
    dict(act='softmax', attn_groups=2),
])
def test_maps_of_several_blocks_match_the_modules(options, generator_path):
    """23 * 25 positions: the compiled tail's passes run over blocks of 256
    positions, so these maps take two full blocks and a partial one. ('cat'
    is left to the small maps above: its global channels are constant over
    the positions, and on maps this large the fusion norm's gradient for
    them cancels down to ~1e-9 relative on both paths.)"""
    gen = make_generator(**options)
    x = torch.randn(2, 16, 23, 25, dtype=DTYPE) + 0.5
    assert_same_state(*run_both(gen, x, steps=2))


@pytest.mark.parametrize('momentum', [0.1, None])
def test_running_statistics_over_two_steps(momentum):
    gen = make_generator()
    for norm in (gen.local_norm, gen.fuse_norm):
        norm.momentum = momentum
    before = copy.deepcopy(gen)
    x = torch.randn(2, 16, 8, 8, dtype=DTYPE)
    state = run_both(gen, x, steps=2)
    assert_same_state(*state)
    for norm, old in ((gen.local_norm, before.local_norm),
                      (gen.fuse_norm, before.fuse_norm)):
        assert norm.num_batches_tracked.item() == 2
        assert not torch.allclose(norm.running_mean, old.running_mean)
        assert not torch.allclose(norm.running_var, old.running_var)


def test_batch_of_one():
    gen = make_generator()
    assert_same_state(*run_both(gen, torch.randn(1, 16, 5, 6, dtype=DTYPE)))


def test_frozen_norms_in_eval_mode():
    """MMDetection's norm_eval=True with frozen norm parameters: the norms
    use and keep their running statistics while gradients flow."""
    gen = make_generator()
    for norm in (gen.local_norm, gen.fuse_norm):
        norm.eval()
        norm.requires_grad_(False)
    buffers = [b.clone() for b in gen.buffers()]
    state = run_both(gen, torch.randn(2, 16, 7, 7, dtype=DTYPE))
    assert_same_state(*state)
    assert gen.local_norm.weight.grad is None
    assert gen.local_conv.weight.grad is not None
    for b, old in zip(gen.buffers(), buffers):
        assert torch.equal(b, old)


@pytest.mark.parametrize('norm_cfg', [
    dict(type='BN', affine=False),
    dict(type='BN', track_running_stats=False),
])
@pytest.mark.parametrize('train', [True, False])
def test_norm_variants(norm_cfg, train):
    gen = make_generator(norm_cfg=norm_cfg).train(train)
    assert_same_state(*run_both(gen, torch.randn(2, 16, 6, 7, dtype=DTYPE)))


def test_forward_without_gradients_counts_once():
    gen = make_generator()
    ref = copy.deepcopy(gen)
    x = torch.randn(2, 16, 7, 6, dtype=DTYPE)
    with torch.no_grad():
        attn = gen(x, (7, 6))
        expected = reference(ref, x)
    torch.testing.assert_close(attn, expected, **TOL)
    for (name, b), c in zip(gen.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)


@pytest.mark.parametrize('stride', [1, 2])
def test_pure_inference(generator_path, monkeypatch, stride):
    """Eval mode without gradients: the compiled generator where it applies
    (one call), the modules elsewhere; the reference's values either way and
    the running statistics untouched."""
    calls = []
    compiled_forward = attention_generator.generator_forward
    monkeypatch.setattr(
        attention_generator, 'generator_forward',
        lambda *args: calls.append(1) or compiled_forward(*args))
    gen = make_generator(stride=stride).eval()
    buffers = [b.clone() for b in gen.buffers()]
    x = torch.randn(2, 16, 9, 8, dtype=DTYPE)
    with torch.no_grad():
        expected = reference(gen, x)
        attn = gen(x, expected.shape[-2:])
    torch.testing.assert_close(attn, expected, **TOL)
    assert len(calls) == (generator_path == 'compiled')
    for b, old in zip(gen.buffers(), buffers):
        assert torch.equal(b, old)


def test_same_values_with_and_without_gradients():
    """A reentrant checkpoint's first pass (no gradients, batch statistics)
    and its recomputation must agree."""
    gen = make_generator().float()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        plain = gen.attention_map(x)
    assert torch.equal(gen(x.requires_grad_(), (9, 9)), plain)


def test_input_without_gradient():
    gen = make_generator()
    ref = copy.deepcopy(gen)
    x = torch.randn(2, 16, 6, 6, dtype=DTYPE)
    expected = reference(ref, x)
    attn = gen(x, expected.shape[-2:])
    assert is_fused(attn)
    attn.sum().backward()
    expected.sum().backward()
    for p, q in zip(gen.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_float32_channels_last_input():
    gen = make_generator().float()
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    gen, ref, x_fused, x_ref, attn, expected = run_both(gen, x)
    torch.testing.assert_close(attn, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-4,
                               atol=1e-5)
    assert x_fused.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('act', ['2sigmoid', 'sigmoid'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_sigmoids_over_the_whole_range_of_logits(act, dtype):
    """A within two ulps of torch's sigmoid for logits from -40 to 40 and
    at the ends (the compiled tail computes its own exp in float32); NaN
    logits give NaN A."""
    gen = AIKAttention(64, (3, 3), (1, 1), (1, 1), (1, 1), attn_groups=64,
                       act=act).to(dtype)
    ends = [float('nan'), float('inf'), -float('inf'), 1e30, -1e30]
    count = gen.head.bias.numel() - len(ends)
    logits = torch.cat([
        torch.tensor(ends, dtype=dtype),
        torch.linspace(-40, 40, count, dtype=dtype)
    ])
    with torch.no_grad():  # logits = the head's bias at every position
        gen.head.weight.zero_()
        gen.head.bias.copy_(logits)
    attn = gen(torch.randn(2, 64, 9, 9, dtype=dtype), (9, 9))
    assert is_fused(attn)
    scale = 2 if act == '2sigmoid' else 1
    expected = scale * torch.sigmoid(logits).view(1, 64, 9, 1, 1)
    torch.testing.assert_close(attn,
                               expected.expand_as(attn),
                               rtol=2 * torch.finfo(dtype).eps,
                               atol=0,
                               equal_nan=True)


def test_global_context_runs_the_modules():
    gen = make_generator(context='global')
    ref = copy.deepcopy(gen)
    x = torch.randn(2, 16, 6, 6, dtype=DTYPE)
    x_gen = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    attn = gen(x_gen, (6, 6))
    assert attn.shape == (2, 1, 9, 6, 6) and not is_fused(attn)
    attn.sum().backward()
    expected = reference(ref, x_ref)
    (36 * expected).sum().backward()
    torch.testing.assert_close(attn[..., :1, :1], expected, **TOL)
    torch.testing.assert_close(x_gen.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(gen.head.weight.grad, ref.head.weight.grad,
                               **TOL)


@pytest.mark.parametrize('make', [
    lambda: make_generator(norm_cfg=dict(type='GN', num_groups=4)),
    lambda: make_generator().float().to(torch.bfloat16),
])
def test_fallback_to_the_modules(make):
    gen = make()
    x = torch.randn(2, 16, 6, 6, dtype=gen.head.weight.dtype)
    assert not can_fuse(gen, x)
    ref = copy.deepcopy(gen)
    x_gen = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    attn = gen(x_gen, (6, 6))
    assert not is_fused(attn)
    expected = reference(ref, x_ref)
    attn.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(attn, expected)
    torch.testing.assert_close(x_gen.grad, x_ref.grad)


def test_sync_batch_norm_and_autocast_are_not_fused():
    gen = make_generator().float()
    x = torch.randn(2, 16, 6, 6)
    assert can_fuse(gen, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not can_fuse(gen, x)
        assert gen(x.requires_grad_(), (6, 6)).dtype == torch.bfloat16
    sync = copy.deepcopy(gen)
    sync.local_norm = nn.SyncBatchNorm(16)
    assert not can_fuse(sync, x)


@pytest.mark.parametrize('register', [
    lambda m, hook: m.local_conv.register_forward_hook(hook),
    lambda m, hook: m.local_norm.register_forward_pre_hook(hook),
    lambda m, hook: m.head.register_full_backward_hook(hook),
])
def test_module_hooks_still_run(register):
    gen = make_generator()
    calls = []
    register(gen, lambda *args: calls.append(1))
    x = torch.randn(2, 16, 6, 6, dtype=DTYPE, requires_grad=True)
    gen(x, (6, 6)).sum().backward()
    assert calls


def test_one_value_per_channel_raises_like_batch_norm():
    gen = make_generator()
    x = torch.randn(1, 16, 1, 1, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        gen(x, (1, 1))


class OnGrid(nn.Module):
    """gen(x, (6, 6)) as a module, for torch.jit.trace."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, x):
        return self.gen(x, (6, 6))


def test_tracing_sees_the_modules():
    """FLOP counting and export trace the model: with gradients on, the
    trace shows the generator's convolutions, not one opaque function."""
    x = torch.randn(2, 16, 6, 6, dtype=DTYPE, requires_grad=True)
    graph = torch.jit.trace(OnGrid(make_generator()), x).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert 'aten::_convolution' in kinds
    assert 'prim::PythonOp' not in kinds


def saved_storages(forward):
    """{storage pointer: (bytes, numel of a tensor on it)} that autograd
    keeps while forward() builds its graph."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = (storage.nbytes(), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return storages


def test_generator_keeps_x_the_attention_the_local_maps_and_vectors():
    gen = make_generator(channels=32).float()
    x = torch.randn(2, 32, 20, 20, requires_grad=True)
    outputs = []
    storages = saved_storages(lambda: outputs.append(gen(x, (20, 20))))
    attn = outputs[0]
    large = {ptr: numel for ptr, (_, numel) in storages.items()
             if numel > 2 * 32}
    assert large.pop(x.untyped_storage().data_ptr()) == x.numel()
    assert large.pop(attn.untyped_storage().data_ptr()) == attn.numel()
    # the local maps, (B, M, P), and nothing else of full resolution
    assert list(large.values()) == [2 * gen.local_proj.out_channels * 400]


def test_layer_keeps_at_most_one_and_a_half_times_a_convolution():
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    layer = AIKConv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 56, 56, requires_grad=True)

    def kept(module):
        return sum(b for b, _ in saved_storages(lambda: module(x)).values())

    assert kept(layer) <= 1.5 * kept(conv)

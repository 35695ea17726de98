"""The Triton path of aik_conv2d against the unfold reference.

CPU (CI): Triton's interpreter runs the kernels on CPU tensors, but only when
TRITON_INTERPRET=1 is set before the kernels are defined, so
``test_interpreter_suite`` re-runs this file's ``interpreted`` tests in a
subprocess with that variable set. Those tests assert that the kernels are
interpreted functions and count their launches, so a silent fall-back to the
torch path fails them. Run alone they skip unless TRITON_INTERPRET=1.
What only the compiler rejects, the interpreter misses: the kernels are also
compiled for an H100 (sm_90, PTX and cubin) on CPU, as the wrapper would
launch them.

CUDA: the same comparisons at ResNet sizes in float32 (IEEE and TF32) and
bfloat16, and a poisoned-buffer check; skipped without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Tuple

import pytest
import torch

from mmdynconv.ops import aik_conv2d, check_aik_args

pytest.importorskip('triton')
from mmdynconv.ops import aik_conv2d_triton as triton_ops  # noqa: E402

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
KERNELS = ('_fwd_kernel', '_bwd_data_kernel', '_bwd_weight_kernel')
interpreter_only = pytest.mark.skipif(
    not INTERPRETED,
    reason='needs TRITON_INTERPRET=1 at import; run by test_interpreter_suite')
cuda_only = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(),
    reason='needs a CUDA GPU (and compiled, not interpreted, kernels)')


class Case(NamedTuple):
    """One call of aik_conv2d; layout is 'nchw', 'channels_last' or
    'strided' (an NHWC view with padded rows); expanded_attn uses one
    attention vector per sample broadcast over positions (zero strides)."""
    batch: int = 2
    channels: int = 4
    out_channels: int = 6
    size: Tuple[int, int] = (7, 9)
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    attn_groups: int = 1
    layout: str = 'nchw'
    bias: bool = True
    expanded_attn: bool = False

    def out_size(self):
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, k, s, p, d in zip(self.size, self.kernel,
                                              self.stride, self.padding,
                                              self.dilation))

    def inputs(self, device='cpu', dtype=torch.float32):
        """Leaf tensors (input, attn, weight, bias-or-None)."""
        batch, channels, (h, w) = self.batch, self.channels, self.size
        if self.layout == 'strided':
            x = torch.randn(batch, h, w + 3, channels, device=device,
                            dtype=dtype).permute(0, 3, 1, 2)[..., :w]
        else:
            x = torch.randn(batch, channels, h, w, device=device, dtype=dtype)
        if self.layout == 'channels_last':
            x = x.contiguous(memory_format=torch.channels_last)
        taps = self.kernel[0] * self.kernel[1]
        attn_size = (1, 1) if self.expanded_attn else self.out_size()
        attn = 2 * torch.rand(batch, self.attn_groups, taps, *attn_size,
                              device=device, dtype=dtype)
        weight = torch.randn(self.out_channels, channels // self.groups,
                             *self.kernel, device=device, dtype=dtype)
        weight /= (weight[0].numel())**0.5
        bias = torch.randn(self.out_channels, device=device,
                           dtype=dtype) if self.bias else None
        return [t if t is None else t.requires_grad_()
                for t in (x, attn, weight, bias)]


def run(case: Case, leaves, impl: str, grad_out=None):
    """Output and the gradients of the leaves that require grad."""
    x, attn, weight, bias = leaves
    full_attn = attn.expand(*attn.shape[:3], *case.out_size())
    out = aik_conv2d(x, full_attn, weight, bias, case.stride, case.padding,
                     case.dilation, case.groups, impl=impl)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return out, grad_out, torch.autograd.grad(out, wanted, grad_out)


def check_against_reference(case: Case, leaves, rtol: float, atol: float,
                            compute_dtype=torch.float64):
    """Triton forward and gradients == the reference in compute_dtype on the
    same (rounded) operands; tolerances are relative to each tensor's
    largest reference magnitude."""
    out, grad_out, grads = run(case, leaves, 'triton')
    ref_leaves = [
        t if t is None else t.detach().to(compute_dtype).requires_grad_(
            t.requires_grad) for t in leaves
    ]
    ref_out, _, ref_grads = run(case, ref_leaves, 'reference',
                                grad_out.to(compute_dtype))
    assert out.dtype == leaves[0].dtype
    names = ['out'] + [
        name for name, t in zip(('input', 'attn', 'weight', 'bias'), leaves)
        if t is not None and t.requires_grad
    ]
    for name, actual, expected in zip(names, [out, *grads],
                                      [ref_out, *ref_grads]):
        assert actual.shape == expected.shape, name
        assert torch.isfinite(actual).all(), f'{name} has NaN/inf'
        scale = expected.abs().max().item() or 1.0
        torch.testing.assert_close(actual.to(compute_dtype), expected,
                                   rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f'{name}: {m}')
    return out


class LaunchCounter:
    """Stands in for a kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every buffer the kernels are meant to write completely."""

    def empty(like, shape, dtype):
        return like.new_full(shape, float('nan'), dtype=dtype)

    monkeypatch.setattr(triton_ops, '_empty', empty)


@pytest.fixture
def launches(monkeypatch):
    counters = {name: LaunchCounter(getattr(triton_ops, name))
                for name in KERNELS}
    for name, counter in counters.items():
        monkeypatch.setattr(triton_ops, name, counter)
    return counters


# ---------------------------------------------------------------- interpreter

INTERPRETER_CASES = {
    'base_batch3': Case(batch=3),
    'stride2_batch1': Case(batch=1, size=(9, 8), stride=(2, 2)),
    'dilation2': Case(size=(9, 7), padding=(2, 2), dilation=(2, 2)),
    'groups2': Case(groups=2),
    'attn_groups2': Case(attn_groups=2, layout='channels_last'),
    'groups2_attn_groups4': Case(channels=8, size=(5, 6), groups=2,
                                 attn_groups=4),
    'groups4_attn_groups2': Case(channels=8, out_channels=8, groups=4,
                                 attn_groups=2, stride=(2, 2)),
    'rect_kernel_rect_stride': Case(kernel=(3, 5), stride=(2, 1),
                                    padding=(1, 2), size=(8, 9)),
    'kernel3x1_no_pad_no_bias': Case(kernel=(3, 1), padding=(0, 0),
                                     bias=False),
    'channels_last_stride2_dilation2': Case(size=(11, 10), stride=(2, 2),
                                            padding=(2, 1), dilation=(2, 2),
                                            layout='channels_last'),
    'strided_view_expanded_attn': Case(batch=3, layout='strided',
                                       expanded_attn=True),
    'many_blocks': Case(channels=34, out_channels=20, size=(5, 6),
                        stride=(2, 2), attn_groups=2),
}


def test_interpreter_suite():
    """Runs the interpreted tests below in a TRITON_INTERPRET=1 subprocess."""
    if INTERPRETED:
        pytest.skip('already interpreted: the tests below run directly')
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', __file__, '-q', '-x',
         '-p', 'no:cacheprovider', '-k', 'interpreted'],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert ' skipped' not in output, output[-6000:]
    expected = len(INTERPRETER_CASES) + 6
    assert f'{expected} passed' in output, output[-6000:]


@interpreter_only
def test_interpreted_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    assert triton_ops._INTERPRETED
    for name in KERNELS:
        assert isinstance(getattr(triton_ops, name), InterpretedFunction)


@interpreter_only
@pytest.mark.parametrize('name', list(INTERPRETER_CASES))
def test_interpreted_matches_reference(name, poisoned, launches):
    case = INTERPRETER_CASES[name]
    leaves = case.inputs()
    out = check_against_reference(case, leaves, rtol=2e-6, atol=2e-6)
    assert all(counter.launches == 1 for counter in launches.values())
    channels_last = case.layout == 'channels_last'
    assert out.is_contiguous(memory_format=torch.channels_last) \
        if channels_last else out.is_contiguous()


@interpreter_only
def test_interpreted_gpu_tiles(monkeypatch, poisoned, launches):
    """The tile sizes chosen for GPUs (BLOCK_* up to 128) are correct too."""
    monkeypatch.setattr(triton_ops, '_SMALL_TILES', False)
    case = Case(channels=24, out_channels=20, size=(9, 9), stride=(2, 2),
                groups=2, attn_groups=4)
    check_against_reference(case, case.inputs(), rtol=2e-6, atol=2e-6)
    assert all(counter.launches == 1 for counter in launches.values())


@interpreter_only
@pytest.mark.parametrize('frozen', ['input', 'attn', 'weight'])
def test_interpreted_partial_grads(frozen, poisoned, launches):
    """Gradients of the other operands when one needs none (the first layer's
    input, say); the data kernel skips what is not needed."""
    case = Case(stride=(2, 2))
    leaves = case.inputs()
    index = ('input', 'attn', 'weight').index(frozen)
    leaves[index] = leaves[index].detach()
    check_against_reference(case, leaves, rtol=2e-6, atol=2e-6)
    expected = {'input': (1, 1, 1), 'attn': (1, 1, 1), 'weight': (1, 1, 0)}
    assert tuple(launches[name].launches for name in KERNELS) == \
        expected[frozen]


@interpreter_only
def test_interpreted_float16(poisoned, launches):
    """float16 operands, float32 accumulation, vs the float32 reference."""
    case = Case(channels=8, out_channels=8, groups=2)
    leaves = case.inputs(dtype=torch.float16)
    check_against_reference(case, leaves, rtol=0, atol=4e-3,
                            compute_dtype=torch.float32)
    assert all(counter.launches == 1 for counter in launches.values())


# --------------------------------------------------- compiled or not needed

@pytest.mark.parametrize('case', [
    Case(channels=4, out_channels=8, groups=4),  # depthwise
    Case(channels=6, out_channels=6, groups=2, attn_groups=3),
])
def test_unsupported_geometry_falls_back(case, launches):
    """Depthwise convolutions, and G and groups that do not divide one
    another, run on the torch path (which needs no GPU)."""
    leaves = case.inputs(dtype=torch.float64)
    check_against_reference(case, leaves, rtol=1e-10, atol=1e-10)
    assert all(counter.launches == 0 for counter in launches.values())


@pytest.mark.skipif(INTERPRETED, reason='CPU tensors are fine when '
                    'interpreted')
def test_cpu_tensors_need_the_interpreter():
    case = Case()
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
        run(case, case.inputs(), 'triton')


class LaunchRecorder:
    """Stands in for a kernel and records ``kernel[grid](*args, **kwargs)``
    without running it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_for_hopper(kernel, args, kwargs):
    """triton.compile for sm_90 with the signature and specialisation
    (unit and 16-divisible integers, 16-byte-aligned pointers) that a launch
    with these arguments gets; no GPU needed. Returns the PTX."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    kwargs = dict(kwargs)
    options = dict(num_warps=kwargs.pop('num_warps'),
                   num_stages=kwargs.pop('num_stages'))
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name]
        if name in kwargs:
            kind, spec = 'constexpr', ''
        elif isinstance(value, torch.Tensor):
            kind = '*' + {torch.float32: 'fp32', torch.bfloat16: 'bf16',
                          torch.int32: 'i32'}[value.dtype]
            spec = 'D'
        else:
            kind, spec = native_specialize_impl(BaseBackend, value, False,
                                                True, True)
        signature[name] = kind
        if kind == 'constexpr':
            constants[name] = value
        if spec == 'D':
            attrs[(index, )] = [['tt.divisibility', 16]]
    source = ASTSource(kernel, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=options)
    return compiled.asm['ptx']


@pytest.mark.skipif(INTERPRETED, reason='compiles the non-interpreted '
                    'kernels')
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_kernels_compile_for_hopper(dtype, monkeypatch):
    """The interpreter cannot catch what only the compiler rejects: compile
    every kernel as the wrapper launches it at a ResNet shape (stride 2,
    channels_last, all gradients) for an H100, to PTX and cubin, on CPU.
    Tensor-core instructions (wgmma) must appear."""
    pytest.importorskip('triton.backends.nvidia')
    recorders = {name: LaunchRecorder(getattr(triton_ops, name))
                 for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(triton_ops, name, recorder)
    monkeypatch.setattr(triton_ops, '_sm_count', lambda device: 132)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True)
    case = Case(batch=2, channels=64, out_channels=64, size=(16, 16),
                stride=(2, 2), layout='channels_last')
    x, attn, weight, _ = (t.detach() for t in case.inputs(dtype=dtype))
    geo = check_aik_args(x, attn, weight, None, case.stride, case.padding,
                         case.dilation, 1)
    grad_out = torch.randn(2, 64, 8, 8, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    triton_ops._forward(x, attn, weight, None, geo)
    triton_ops._backward_data(grad_out, x, attn, weight, geo, True, True)
    triton_ops._backward_weight(grad_out, x, attn, weight, geo)
    for name, recorder in recorders.items():
        assert len(recorder.calls) == 1, name
        ptx = compile_for_hopper(recorder.kernel, *recorder.calls[0])
        assert 'wgmma' in ptx, name


# ------------------------------------------------------------------- CUDA

# (rtol, atol relative to the largest reference magnitude) per precision
CUDA_TOLERANCES = {
    'float32': (1e-5, 1e-5),  # IEEE fp32: TF32 off
    'tf32': (0, 5e-3),
    'bfloat16': (0, 2e-2),
}


@cuda_only
@pytest.mark.parametrize('precision', list(CUDA_TOLERANCES))
@pytest.mark.parametrize('case', [
    Case(batch=8, channels=64, out_channels=64, size=(56, 56)),
    Case(batch=8, channels=128, out_channels=128, size=(56, 56),
         stride=(2, 2), layout='channels_last'),
    Case(batch=8, channels=256, out_channels=256, size=(14, 14),
         bias=False),
    Case(batch=4, channels=512, out_channels=512, size=(7, 7),
         layout='channels_last', attn_groups=4),
],
                         ids=['64@56', '128@56s2_cl', '256@14',
                              '512@7_cl_G4'])
def test_cuda_real_sizes(case, precision):
    """ResNet-50's 3x3 shapes; tolerances per precision (CUDA_TOLERANCES),
    against the float64 reference on the same rounded operands."""
    dtype = torch.bfloat16 if precision == 'bfloat16' else torch.float32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
    try:
        rtol, atol = CUDA_TOLERANCES[precision]
        check_against_reference(case, case.inputs('cuda', dtype), rtol, atol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@cuda_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cuda_poisoned_buffers(dtype, poisoned, launches):
    """Output, grad_input and the fp32 weight-gradient partials start as NaN:
    every element must be written. Odd sizes hit every tile edge."""
    case = Case(batch=3, channels=72, out_channels=80, size=(15, 17),
                stride=(2, 2), groups=2, attn_groups=4, layout='strided')
    rtol, atol = CUDA_TOLERANCES['float32' if dtype == torch.float32 else
                                 'bfloat16']
    check_against_reference(case, case.inputs('cuda', dtype), rtol, atol)
    assert all(counter.launches == 1 for counter in launches.values())

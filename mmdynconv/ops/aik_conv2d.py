"""Functional attention-inside-kernel convolution.

    y[b, o, u] = bias[o] + sum_{c in group(o)} sum_{t < K}
                 weight[o, c, t] * attn[b, a(c), t, u] * x[b, c, s*u - p + d*delta_t]

``attn`` holds one value per sample, attention group, kernel tap and output
position; the C input channels are split into G attention groups
(``a(c) = c // (C / G)``) that share it.

Two implementations in plain torch, for any device:

* ``'reference'``: unfold, multiply, contract; differentiated by autograd,
  which keeps the K-times larger unfolded input alive for backward.
* ``'torch'``: the same arithmetic inside a custom autograd function that
  saves only (input, attn, weight) and recomputes the unfolded input in
  backward, so the memory kept for backward is that of a plain convolution
  plus the attention.

and two fused ones, the defaults where they apply: ``'cpp'`` on CPU
(``aik_conv2d_cpp.py``) and ``'triton'`` on GPU (``aik_conv2d_triton.py``).
"""
from importlib.util import find_spec
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntPair = Union[int, Tuple[int, int]]

IMPLEMENTATIONS = ('triton', 'cpp', 'torch', 'reference')


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) for v in value)):
        return tuple(value)
    raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')


class ConvGeometry(NamedTuple):
    """Normalised convolution arguments and the output size they imply."""
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    attn_groups: int
    out_size: Tuple[int, int]

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


def check_aik_args(input: Tensor, attn: Tensor, weight: Tensor,
                   bias: Optional[Tensor], stride: IntPair, padding: IntPair,
                   dilation: IntPair, groups: int) -> ConvGeometry:
    """Validate the arguments of :func:`aik_conv2d` and return its geometry.

    Raises:
        ValueError: naming the offending argument with the expected and the
            actual shape or value.
    """
    stride = _pair(stride, 'stride')
    padding = _pair(padding, 'padding')
    dilation = _pair(dilation, 'dilation')
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError('stride and dilation must be >= 1 and padding >= 0, '
                         f'got stride={stride}, dilation={dilation}, '
                         f'padding={padding}')
    if input.dim() != 4:
        raise ValueError('input must have shape (B, C, H, W), got shape '
                         f'{tuple(input.shape)}')
    if weight.dim() != 4:
        raise ValueError('weight must have shape (O, C/groups, kh, kw), got '
                         f'shape {tuple(weight.shape)}')
    if attn.dim() != 5:
        raise ValueError('attn must have shape (B, G, K, H_out, W_out), got '
                         f'shape {tuple(attn.shape)}')
    # int(): under torch.jit.trace sizes are traced values, and the geometry
    # must hold plain ints (FlopAnalyzer and ONNX export trace the model).
    batch, channels, height, width = map(int, input.shape)
    out_channels, group_channels, kh, kw = map(int, weight.shape)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f'groups must be a positive int, got {groups!r}')
    if channels % groups or out_channels % groups:
        raise ValueError(
            f'groups={groups} must divide the input channels C={channels} and '
            f'the output channels O={out_channels}')
    if group_channels != channels // groups:
        raise ValueError(
            'weight must have shape (O, C/groups, kh, kw) = '
            f'({out_channels}, {channels // groups}, {kh}, {kw}), got shape '
            f'{tuple(weight.shape)}')
    if bias is not None and tuple(bias.shape) != (out_channels, ):
        raise ValueError(f'bias must have shape ({out_channels},), got shape '
                         f'{tuple(bias.shape)}')
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f'input of spatial size {(height, width)} is too small for kernel '
            f'{(kh, kw)} with padding {padding} and dilation {dilation}')
    attn_groups = int(attn.shape[1])
    if attn_groups < 1 or channels % attn_groups:
        raise ValueError(
            f'attn groups G={attn_groups} (attn.shape[1]) must divide the '
            f'input channels C={channels}')
    expected = (batch, attn_groups, kh * kw, out_h, out_w)
    if tuple(attn.shape) != expected:
        raise ValueError(
            'attn must have shape (B, G, K, H_out, W_out) = '
            f'{expected}, got shape {tuple(attn.shape)}')
    return ConvGeometry((kh, kw), stride, padding, dilation, groups,
                        attn_groups, (out_h, out_w))


def _unfold(input: Tensor, geo: ConvGeometry) -> Tensor:
    """(B, C, H, W) -> (B, C, K, L) sliding-window patches, L = H_out*W_out."""
    cols = F.unfold(input, geo.kernel_size, geo.dilation, geo.padding,
                    geo.stride)
    return cols.view(input.shape[0], input.shape[1], geo.num_taps, -1)


def _by_attn_group(cols: Tensor, geo: ConvGeometry) -> Tensor:
    """(B, C, K, L) -> (B, G, C/G, K, L)."""
    batch, channels, taps, length = cols.shape
    return cols.view(batch, geo.attn_groups, channels // geo.attn_groups,
                     taps, length)


def _by_conv_group(cols: Tensor, geo: ConvGeometry) -> Tensor:
    """(B, C, K, L) -> (B, groups, C/groups*K, L), the GEMM operand."""
    batch, channels, taps, length = cols.shape
    return cols.reshape(batch, geo.groups, channels // geo.groups * taps,
                        length)


def _flat_attn(attn: Tensor) -> Tensor:
    """(B, G, K, H_out, W_out) -> (B, G, 1, K, L), broadcastable on cols."""
    batch, attn_groups, taps = attn.shape[:3]
    return attn.reshape(batch, attn_groups, 1, taps, -1)


def _grouped_weight(weight: Tensor, groups: int) -> Tensor:
    """(O, C/groups, kh, kw) -> (groups, O/groups, C/groups*K)."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def in_layout_of(t: Tensor, input: Tensor) -> Tensor:
    """t in input's memory layout: channels_last when input is (and is not
    also plain contiguous), else contiguous; no copy when t already is."""
    channels_last = input.is_contiguous(
        memory_format=torch.channels_last) and not input.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last
                        if channels_last else torch.contiguous_format)


def _to_output(out: Tensor, input: Tensor, geo: ConvGeometry,
               bias: Optional[Tensor]) -> Tensor:
    """(B, groups, O/groups, L) -> (B, O, H_out, W_out) in input's layout."""
    out = out.reshape(out.shape[0], -1, *geo.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return in_layout_of(out, input)


def aik_conv2d_reference(input: Tensor, attn: Tensor, weight: Tensor,
                         bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    """Unfold, modulate by attn, contract with weight; plain autograd."""
    cols = _by_attn_group(_unfold(input, geo), geo) * _flat_attn(attn)
    cols = _by_conv_group(cols.flatten(1, 2), geo)
    out = torch.matmul(_grouped_weight(weight, geo.groups), cols)
    return _to_output(out, input, geo, bias)


class _PatchLayout:
    """Channels-last patch matrix of one call, for the memory-lean path.

    Patches live in a (B, H_out, W_out, groups, kh, kw, C/groups) tensor, which
    is the (B*L, groups, K*C/groups) left operand of one GEMM per conv group.
    To broadcast the attention without copying it, the channel axis c =
    (p*q + i)*(C/groups) + j*m + l is split so that every tensor involved has a
    common 9-d view (B, H_out, W_out, P, q, kh, kw, r, m) in which the
    attention varies only along P and r:

    * G divides groups: P = G, q = groups/G, r = 1, m = C/groups;
    * groups divides G: P = groups, q = 1, r = G/groups, m = C/G.

    Other (G, groups) pairs broadcast attn to one group per channel first.
    """

    def __init__(self, input: Tensor, geo: ConvGeometry):
        self.batch, self.channels = input.shape[:2]
        self.geo = geo
        self.group_channels = self.channels // geo.groups
        attn_groups = geo.attn_groups
        if geo.groups % attn_groups and attn_groups % geo.groups:
            attn_groups = self.channels
        self.attn_repeat = attn_groups // geo.attn_groups
        if geo.groups % attn_groups == 0:
            self.split = (attn_groups, geo.groups // attn_groups, 1,
                          self.group_channels)
        else:
            self.split = (geo.groups, 1, attn_groups // geo.groups,
                          self.channels // attn_groups)
        self.padded_size = (input.shape[2] + 2 * geo.padding[0],
                            input.shape[3] + 2 * geo.padding[1])

    @property
    def rows(self) -> int:
        return self.batch * self.geo.out_size[0] * self.geo.out_size[1]

    def padded(self, input: Tensor) -> Tensor:
        """(B, C, H, W) -> zero-padded (B, Hp, Wp, C), contiguous."""
        (ph, pw), (h, w) = self.geo.padding, input.shape[2:]
        out = input.new_zeros(self.batch, *self.padded_size, self.channels)
        out[:, ph:ph + h, pw:pw + w].copy_(input.permute(0, 2, 3, 1))
        return out

    def windows(self, padded: Tensor) -> Tensor:
        """(B, Hp, Wp, C) -> overlapping (B, H_out, W_out, kh, kw, C) view."""
        geo = self.geo
        s_b, s_h, s_w, _ = padded.stride()
        return padded.as_strided(
            (self.batch, *geo.out_size, *geo.kernel_size, self.channels),
            (s_b, s_h * geo.stride[0], s_w * geo.stride[1],
             s_h * geo.dilation[0], s_w * geo.dilation[1], 1))

    def window_view(self, windows: Tensor) -> Tensor:
        """(B, H_out, W_out, kh, kw, C) -> the common 9-d view."""
        shape = windows.shape[:5] + self.split
        return windows.reshape(shape).permute(0, 1, 2, 5, 6, 3, 4, 7, 8)

    def patch_view(self, patches: Tensor) -> Tensor:
        """Patch tensor -> the common 9-d view."""
        p, q, r, m = self.split
        return patches.view(self.batch, *self.geo.out_size, p, q,
                            *self.geo.kernel_size, r, m)

    def new_patches(self, like: Tensor) -> Tensor:
        return like.new_empty(self.batch, *self.geo.out_size, self.geo.groups,
                              *self.geo.kernel_size, self.group_channels)

    def attn_view(self, attn: Tensor) -> Tensor:
        """(B, G, K, H_out, W_out) -> (B, H_out, W_out, P, 1, kh, kw, r, 1)."""
        if self.attn_repeat > 1:
            attn = attn.repeat_interleave(self.attn_repeat, dim=1)
        p, _, r, _ = self.split
        attn = attn.view(self.batch, p, r, *self.geo.kernel_size,
                         *self.geo.out_size)
        return attn.permute(0, 5, 6, 1, 3, 4, 2).unsqueeze(4).unsqueeze(-1)

    def attn_from_view(self, grad: Tensor) -> Tensor:
        """Inverse of :meth:`attn_view` for a (B, H_out, W_out, P, kh, kw, r)
        gradient, summing over channels that shared one attention group."""
        geo = self.geo
        grad = grad.permute(0, 3, 6, 4, 5, 1, 2).reshape(
            self.batch, -1, geo.num_taps, *geo.out_size)
        if self.attn_repeat > 1:
            grad = grad.view(self.batch, geo.attn_groups, self.attn_repeat,
                             geo.num_taps, *geo.out_size).sum(2)
        return grad

    def gemm_weight(self, weight: Tensor) -> Tensor:
        """(O, C/groups, kh, kw) -> (groups, O/groups, K*C/groups)."""
        return weight.permute(0, 2, 3, 1).reshape(self.geo.groups, -1,
                                                   self.geo.num_taps
                                                   * self.group_channels)

    def gemm_patches(self, patches: Tensor) -> Tensor:
        """Patch tensor -> (groups, B*L, K*C/groups) view."""
        return patches.view(self.rows, self.geo.groups, -1).transpose(0, 1)

    def gemm_rows(self, grad_out: Tensor) -> Tensor:
        """(B, O, H_out, W_out) -> (groups, B*L, O/groups)."""
        rows = grad_out.permute(0, 2, 3, 1).reshape(self.rows,
                                                    self.geo.groups, -1)
        return rows.transpose(0, 1)


def _modulated_patches(layout: _PatchLayout, input: Tensor,
                       attn: Tensor) -> Tensor:
    """Patches of input multiplied by attn, in one strided pass."""
    patches = layout.new_patches(input)
    torch.mul(layout.window_view(layout.windows(layout.padded(input))),
              layout.attn_view(attn), out=layout.patch_view(patches))
    return patches


class AIKConv2dFunction(torch.autograd.Function):
    """Memory-lean autograd: a channels-last patch GEMM per conv group.

    Saves only (input, attn, weight); patches are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, input: Tensor, attn: Tensor, weight: Tensor,
                bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
        ctx.geo = geo
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, attn, weight)
        layout = _PatchLayout(input, geo)
        patches = _modulated_patches(layout, input, attn)
        out = torch.matmul(layout.gemm_patches(patches),
                           layout.gemm_weight(weight).transpose(1, 2))
        # (groups, B*L, O/groups) -> (B, O, H_out, W_out), channels-last
        out = out.transpose(0, 1).reshape(layout.batch, *geo.out_size, -1)
        if bias is not None:
            out = out + bias
        return in_layout_of(out.permute(0, 3, 1, 2), input)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, attn, weight = ctx.saved_tensors
        geo = ctx.geo
        layout = _PatchLayout(input, geo)
        need_input, need_attn, need_weight, need_bias = \
            ctx.needs_input_grad[:4]
        grad_input = grad_attn = grad_weight = grad_bias = None

        grad_rows = layout.gemm_rows(grad_out)
        attn_view = layout.attn_view(attn)
        if need_input or need_attn:
            # (groups, B*L, K*C/groups); matmul into an out= view of the
            # patch layout is about twice as slow as this plus a transpose.
            grad_patches = torch.matmul(grad_rows, layout.gemm_weight(weight))
            grad_patches = layout.patch_view(
                grad_patches.transpose(0, 1).contiguous())
        if need_attn or need_weight:
            windows = layout.window_view(layout.windows(layout.padded(input)))
            # Products with the overlapping window view are written into a
            # contiguous buffer: left to choose its own output layout, mul
            # follows the window strides and runs tens of times slower.
            patches = layout.new_patches(input)
        if need_attn:
            product = torch.mul(grad_patches, windows,
                                out=layout.patch_view(patches))
            grad_attn = layout.attn_from_view(product.sum((4, 8)))
        if need_weight:
            torch.mul(windows, attn_view, out=layout.patch_view(patches))
            grad_weight = torch.matmul(grad_rows.transpose(1, 2),
                                       layout.gemm_patches(patches))
            kh, kw = geo.kernel_size
            grad_weight = grad_weight.reshape(weight.shape[0], kh, kw, -1)
            grad_weight = grad_weight.permute(0, 3, 1, 2).contiguous()
        if need_input:
            grad_patches.mul_(attn_view)
            grad_padded = grad_out.new_zeros(layout.batch,
                                             *layout.padded_size,
                                             layout.channels)
            grad_windows = layout.window_view(layout.windows(grad_padded))
            for i in range(geo.kernel_size[0]):
                for j in range(geo.kernel_size[1]):
                    grad_windows[:, :, :, :, :, i, j].add_(
                        grad_patches[:, :, :, :, :, i, j])
            (ph, pw), (h, w) = geo.padding, input.shape[2:]
            grad_input = in_layout_of(
                grad_padded[:, ph:ph + h, pw:pw + w].permute(0, 3, 1, 2),
                input)
        if ctx.has_bias and need_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_attn, grad_weight, grad_bias, None


def aik_conv2d(input: Tensor,
               attn: Tensor,
               weight: Tensor,
               bias: Optional[Tensor] = None,
               stride: IntPair = 1,
               padding: IntPair = 0,
               dilation: IntPair = 1,
               groups: int = 1,
               impl: Optional[str] = None) -> Tensor:
    """Convolution whose kernel is modulated per sample, position and tap.

    Args:
        input: (B, C, H, W).
        attn: (B, G, K, H_out, W_out) with ``C % G == 0`` and K = kh*kw taps
            in row-major order of the kernel window.
        weight: (O, C/groups, kh, kw), the static kernel.
        bias: (O,) or None.
        stride, padding, dilation: int or (h, w) pair, as in ``F.conv2d``.
        groups: convolution groups, as in ``F.conv2d``.
        impl: ``None`` picks ``'triton'`` for CUDA tensors when Triton is
            importable, ``'cpp'`` for CPU tensors when the extension is
            built, and ``'torch'`` otherwise; ``'triton'``, ``'cpp'``,
            ``'torch'`` or ``'reference'`` forces one (``'triton'`` runs on
            CPU tensors only under ``TRITON_INTERPRET=1``). The fused paths
            hand the cases they do not cover to ``'torch'``.

    Returns:
        (B, O, H_out, W_out), channels_last when ``input`` is.

    Under autocast the operands are cast to the autocast dtype, as
    ``F.conv2d`` is.
    """
    impl = impl or _default_impl(input)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'impl must be one of {IMPLEMENTATIONS} or None, '
                         f'got {impl!r}')
    geo = check_aik_args(input, attn, weight, bias, stride, padding, dilation,
                         groups)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(
            torch.promote_types(input.dtype, attn.dtype), weight.dtype)
    input, attn, weight = (t.to(dtype) for t in (input, attn, weight))
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _run(impl, input, attn, weight, bias, geo)


def _default_impl(input: Tensor) -> str:
    if input.is_cuda:
        return 'triton' if find_spec('triton') is not None else 'torch'
    from .aik_conv2d_cpp import AVAILABLE
    return 'cpp' if AVAILABLE and input.device.type == 'cpu' else 'torch'


def _run(impl: str, input: Tensor, attn: Tensor, weight: Tensor,
         bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    if impl == 'reference':
        return aik_conv2d_reference(input, attn, weight, bias, geo)
    if impl == 'triton':
        from .aik_conv2d_triton import aik_conv2d_triton
        return aik_conv2d_triton(input, attn, weight, bias, geo)
    if impl == 'cpp':
        from .aik_conv2d_cpp import aik_conv2d_cpp
        return aik_conv2d_cpp(input, attn, weight, bias, geo)
    return AIKConv2dFunction.apply(input, attn, weight, bias, geo)

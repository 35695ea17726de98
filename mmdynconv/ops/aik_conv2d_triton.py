"""Triton kernels for :func:`aik_conv2d` on GPUs.

    y[b, o, u] = bias[o] + sum_{c in group(o)} sum_{t < K} weight[o, c, t]
                 * attn[b, a(c), t, u] * x[b, c, s*u - p + d*delta_t]

No unfolded tensor is ever built: every kernel gathers the input window,
the attention and the output gradient straight from their tensors.

* Forward: an implicit-GEMM convolution per conv group, rows B*H_out*W_out,
  columns O/groups, reduction over (tap, channel); each input tile is scaled
  by its rows' attention as it is loaded (the GEMM runs transposed, out
  channels x rows, so that the scaled tile is the shared-memory operand).
* Input and attention gradients, one kernel: a transposed implicit GEMM over
  input positions, split into the stride's s_h*s_w phases so that it visits
  only taps that reach the output grid (no wasted multiply-adds at stride
  2; one flattened, software-pipelined loop over (tap, o-block)). Per tap,
  P[u, c] = sum_o grad_out[u, o] * weight[o, c, t] is reduced over o first;
  then grad_input += attn[u, t] * P and the attention gradient
  sum_c x[c] * P[u, c] of that (u, t) is written as an fp32 partial per
  channel block (summed by torch afterwards, deterministic).
* Weight gradient: a GEMM over the B*L output rows, split over rows for
  parallelism into fp32 partials that torch sums.
* Bias gradient: ``grad_out.sum((0, 2, 3))``.

Only (input, attn, weight) are saved for backward. Kernels read and write
through strides with channels as the contiguous axis: input and grad_out
without a unit channel stride (NCHW) are copied to channels_last first, and
results are returned in the input's layout (channels_last when the input is,
else contiguous). float32 (TF32 where ``torch.backends.cuda.matmul.allow_tf32``
allows it), float16 and bfloat16, all accumulated in float32. Tile sizes come
from a fixed heuristic (``_tiles``), no autotuning.

Falls back to the memory-lean torch path (``AIKConv2dFunction``) for:
depthwise convolutions (one input channel per conv group), attention groups
G with neither G | groups nor groups | G, empty inputs, and dtypes other
than the three above. CPU tensors run only under ``TRITON_INTERPRET=1``
(Triton's interpreter, used by the tests).
"""
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .aik_conv2d import AIKConv2dFunction, ConvGeometry, in_layout_of

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _fwd_kernel(x_ptr, attn_ptr, w_ptr, bias_ptr, y_ptr,
                rows, out_l, out_w, height, width,
                group_in, group_out, seg_ch, attn_ch,
                sxb, sxc, sxh, sxw,
                sab, sag, sak, sah, saw,
                swk, swc, swo,
                syb, syc, syh, syw,
                KH: tl.constexpr, KW: tl.constexpr,
                SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr,
                DH: tl.constexpr, DW: tl.constexpr,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """y tile [BLOCK_M rows (b, oh, ow), BLOCK_N out channels] of group
    program_id(1), computed transposed (out channels x rows) so that the
    attention-scaled input tile is the right-hand operand; the reduction
    runs over (tap, segment, channel block)."""
    group = tl.program_id(1)
    n_blocks = tl.cdiv(group_out, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    offs_n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < rows
    n_ok = offs_n < group_out
    b = (offs_m // out_l).to(tl.int64)
    oh = offs_m % out_l // out_w
    ow = offs_m % out_w
    a_row = b * sab + oh * sah + ow * saw
    w_row = (group * group_out + offs_n) * swo
    c_blocks = tl.cdiv(seg_ch, BLOCK_K)
    segs = group_in // seg_ch
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(KH * KW * segs * c_blocks):
        tap = step // (segs * c_blocks)
        seg = step // c_blocks % segs
        offs_c = step % c_blocks * BLOCK_K + offs_k
        c_ok = offs_c < seg_ch
        c_local = seg * seg_ch + offs_c
        ih = oh * SH - PH + tap // KW * DH
        iw = ow * SW - PW + tap % KW * DW
        in_ok = m_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        x = tl.load(x_ptr + ((group * group_in + c_local) * sxc)[:, None] +
                    (b * sxb + ih * sxh + iw * sxw)[None, :],
                    mask=c_ok[:, None] & in_ok[None, :], other=0.)
        a_group = (group * group_in + seg * seg_ch) // attn_ch
        att = tl.load(attn_ptr + a_row + a_group * sag + tap * sak,
                      mask=m_ok, other=0.)
        w = tl.load(w_ptr + tap * swk + w_row[:, None] +
                    (c_local * swc)[None, :],
                    mask=n_ok[:, None] & c_ok[None, :], other=0.)
        acc = tl.dot(w, x * att[None, :], acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + group * group_out + offs_n, mask=n_ok,
                       other=0.)
        acc += bias.to(tl.float32)[:, None]
    y_off = ((group * group_out + offs_n) * syc)[:, None] + \
        (b * syb + oh * syh + ow * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _bwd_data_kernel(gy_ptr, attn_ptr, w_ptr, x_ptr, dx_ptr, dattn_ptr,
                     taps_ptr, rows, q_l, q_w, height, width, out_h, out_w,
                     group_in, group_out, seg_ch, attn_ch, part_numel,
                     sgb, sgc, sgh, sgw,
                     sab, sag, sak, sah, saw,
                     swk, swc, swo,
                     sxb, sxc, sxh, sxw,
                     sdb, sdc, sdh, sdw,
                     KH: tl.constexpr, KW: tl.constexpr,
                     SH: tl.constexpr, SW: tl.constexpr,
                     PH: tl.constexpr, PW: tl.constexpr,
                     DH: tl.constexpr, DW: tl.constexpr,
                     NEED_INPUT: tl.constexpr, NEED_ATTN: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_input tile [BLOCK_M input positions of stride phase
    program_id(2), BLOCK_N channels of one segment] of group program_id(1),
    and the matching attention-gradient partials (one per channel block).
    taps_ptr row ``phase``: the number of taps that reach the output grid
    from that phase, then those taps."""
    group = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // SW
    pw = phase % SW
    c_blocks = tl.cdiv(seg_ch, BLOCK_N)
    segs = group_in // seg_ch
    pid_m = tl.program_id(0) // (segs * c_blocks)
    pid_n = tl.program_id(0) % (segs * c_blocks)
    seg = pid_n // c_blocks
    offs_c = pid_n % c_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < seg_ch
    c_local = seg * seg_ch + offs_c
    c_glob = group * group_in + c_local
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.arange(0, BLOCK_K)
    b = (offs_m // q_l).to(tl.int64)
    h = offs_m % q_l // q_w * SH + ph
    w = offs_m % q_w * SW + pw
    m_ok = (offs_m < rows) & (h < height) & (w < width)
    if NEED_ATTN:
        x = tl.load(x_ptr + (b * sxb + h * sxh + w * sxw)[:, None] +
                    (c_glob * sxc)[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.)
        x = x.to(tl.float32)
    a_group = (group * group_in + seg * seg_ch) // attn_ch
    part_ptr = dattn_ptr + ((group * segs + seg) * c_blocks +
                            pid_n % c_blocks).to(tl.int64) * part_numel
    taps_ptr += phase * (KH * KW + 1)
    dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(tl.load(taps_ptr), flatten=True):
        tap = tl.load(taps_ptr + 1 + k)
        # exact divisions: the phase guarantees the tap hits the grid
        oh_num = h + PH - tap // KW * DH
        ow_num = w + PW - tap % KW * DW
        oh = oh_num // SH
        ow = ow_num // SW
        ok = m_ok & (oh_num >= 0) & (ow_num >= 0) & (oh < out_h) & \
            (ow < out_w)
        g_row = b * sgb + oh * sgh + ow * sgw
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for o0 in range(0, group_out, BLOCK_K):
            o_glob = group * group_out + o0 + offs_o
            o_ok = o0 + offs_o < group_out
            gy = tl.load(gy_ptr + g_row[:, None] + (o_glob * sgc)[None, :],
                         mask=ok[:, None] & o_ok[None, :], other=0.)
            wt = tl.load(w_ptr + tap * swk + (o_glob * swo)[:, None] +
                         (c_local * swc)[None, :],
                         mask=o_ok[:, None] & c_ok[None, :], other=0.)
            part = tl.dot(gy, wt, part, input_precision=PRECISION)
        if NEED_INPUT:
            att = tl.load(attn_ptr + b * sab + a_group * sag + tap * sak +
                          oh * sah + ow * saw, mask=ok, other=0.)
            dx += att.to(tl.float32)[:, None] * part
        if NEED_ATTN:
            da_off = ((b * KH * KW + tap) * out_h + oh) * out_w + ow
            tl.store(part_ptr + da_off, tl.sum(x * part, axis=1), mask=ok)
    if NEED_INPUT:
        tl.store(dx_ptr + (b * sdb + h * sdh + w * sdw)[:, None] +
                 (c_glob * sdc)[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _bwd_weight_kernel(gy_ptr, attn_ptr, x_ptr, part_ptr,
                       rows, out_l, out_w, height, width, out_ch,
                       group_in, group_out, seg_ch, attn_ch, split_rows,
                       sgb, sgc, sgh, sgw,
                       sab, sag, sak, sah, saw,
                       sxb, sxc, sxh, sxw,
                       KH: tl.constexpr, KW: tl.constexpr,
                       SH: tl.constexpr, SW: tl.constexpr,
                       PH: tl.constexpr, PW: tl.constexpr,
                       DH: tl.constexpr, DW: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 partial grad_weight tile [BLOCK_M out channels, BLOCK_N channels
    of one segment at one tap] of group program_id(2), summed over the rows
    of split program_id(1): partial[split, o, tap, c]."""
    split = tl.program_id(1)
    group = tl.program_id(2)
    c_blocks = tl.cdiv(seg_ch, BLOCK_N)
    segs = group_in // seg_ch
    n_blocks = KH * KW * segs * c_blocks
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    tap = pid_n // (segs * c_blocks)
    seg = pid_n // c_blocks % segs
    offs_c = pid_n % c_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < seg_ch
    c_local = seg * seg_ch + offs_c
    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = offs_o < group_out
    o_glob = group * group_out + offs_o
    a_group = (group * group_in + seg * seg_ch) // attn_ch
    row_start = split * split_rows
    row_end = tl.minimum(rows, row_start + split_rows)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_ok = offs_r < row_end
        b = (offs_r // out_l).to(tl.int64)
        oh = offs_r % out_l // out_w
        ow = offs_r % out_w
        ih = oh * SH - PH + tap // KW * DH
        iw = ow * SW - PW + tap % KW * DW
        in_ok = r_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        x = tl.load(x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] +
                    ((group * group_in + c_local) * sxc)[None, :],
                    mask=in_ok[:, None] & c_ok[None, :], other=0.)
        att = tl.load(attn_ptr + b * sab + a_group * sag + tap * sak +
                      oh * sah + ow * saw, mask=r_ok, other=0.)
        gy = tl.load(gy_ptr + (o_glob * sgc)[:, None] +
                     (b * sgb + oh * sgh + ow * sgw)[None, :],
                     mask=o_ok[:, None] & r_ok[None, :], other=0.)
        acc = tl.dot(gy, x * att[:, None], acc, input_precision=PRECISION)
    out_off = (split.to(tl.int64) * out_ch + o_glob[:, None]) * KH * KW + tap
    tl.store(part_ptr + out_off * group_in + c_local[None, :], acc,
             mask=o_ok[:, None] & c_ok[None, :])


# Triton's interpreter runs these kernels when TRITON_INTERPRET=1 was set
# before they were defined; small tiles keep it fast (tests may switch them
# off).
_INTERPRETED = type(_fwd_kernel).__name__ == 'InterpretedFunction'
_SMALL_TILES = _INTERPRETED


class _Dims(NamedTuple):
    """Sizes of one call; segments are channel ranges that share both a
    conv group and an attention group (seg_ch = min(C/groups, C/G))."""
    batch: int
    channels: int
    height: int
    width: int
    out_ch: int
    group_in: int
    group_out: int
    seg_ch: int
    attn_ch: int

    @classmethod
    def of(cls, input: Tensor, weight: Tensor, geo: ConvGeometry) -> '_Dims':
        batch, channels, height, width = input.shape
        group_in = channels // geo.groups
        attn_ch = channels // geo.attn_groups
        return cls(batch, channels, height, width, weight.shape[0], group_in,
                   weight.shape[0] // geo.groups, min(group_in, attn_ch),
                   attn_ch)


def supports(input: Tensor, geo: ConvGeometry) -> bool:
    """Whether the Triton kernels handle this call (see module docstring)."""
    groups, attn_groups = geo.groups, geo.attn_groups
    return (input.dtype in SUPPORTED_DTYPES and input.numel() > 0
            and input.shape[1] // groups > 1
            and (groups % attn_groups == 0 or attn_groups % groups == 0))


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


@lru_cache
def _sm_count(device: torch.device) -> int:
    if device.type != 'cuda':
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(kind: str, dims: _Dims, rows: int, dtype: torch.dtype,
           device: torch.device) -> dict:
    """Block sizes, warps and stages of one kernel launch.

    kind 'fwd': M = rows, N = O/groups, K = channels of a segment;
    'data': M = rows (input positions of one phase), N = a segment's
    channels, K = O/groups; 'weight': M = O/groups, N = a segment's
    channels, K = rows. For 'fwd' and 'data', M halves (down to 64) while
    the launch would not fill the GPU once.
    """
    if _SMALL_TILES:
        return dict(BLOCK_M=16 if kind == 'weight' else 64, BLOCK_N=16,
                    BLOCK_K=64 if kind == 'weight' else 16)
    wide = dtype != torch.float32
    depth = 64 if wide else 32
    if kind == 'fwd':
        n_dim, k_dim = dims.group_out, dims.seg_ch
    elif kind == 'data':
        n_dim, k_dim = dims.seg_ch, dims.group_out
    else:
        n_dim, k_dim = dims.seg_ch, rows
    block_m = 128 if kind != 'weight' else _pow2_between(dims.group_out, 16,
                                                          128)
    block_n = _pow2_between(n_dim, 16, 64 if kind == 'data' else 128)
    block_k = _pow2_between(k_dim, 16, depth)
    if kind != 'weight':
        n_tiles = triton.cdiv(n_dim, block_n) * dims.channels // (
            dims.group_in if kind == 'fwd' else dims.seg_ch)
        while block_m > 64 and n_tiles * triton.cdiv(rows, block_m) \
                < _sm_count(device):
            block_m //= 2
    warps = 4 if kind == 'weight' and block_m * block_n < 128 * 128 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=4 if wide else 3)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 'tf32'
    return 'ieee'


def _channels_last(t: Tensor) -> Tensor:
    """(B, C, H, W) with unit channel stride, copying only when needed."""
    if t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _empty(like: Tensor, shape: tuple, dtype: torch.dtype) -> Tensor:
    """Uninitialised buffer that a kernel fills completely."""
    return like.new_empty(shape, dtype=dtype)


def _new_nhwc(like: Tensor, channels: int, height: int,
              width: int) -> Tensor:
    """Uninitialised (B, channels, height, width) with NHWC storage."""
    return _empty(like, (like.shape[0], height, width, channels),
                  like.dtype).permute(0, 3, 1, 2)


def _conv_args(geo: ConvGeometry) -> dict:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (geo.kernel_size, geo.stride,
                                              geo.padding, geo.dilation)
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


@lru_cache
def _phase_taps(geo: ConvGeometry, device: torch.device) -> Tensor:
    """(s_h*s_w, K + 1) int32: per stride phase (ph, pw) of the input grid,
    the number of taps t = (i, j) whose window offset maps that phase onto
    the output grid, (ph + p_h - i*d_h) % s_h == 0 and likewise for w, then
    those taps. Cached: built once per geometry and device."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (geo.kernel_size, geo.stride,
                                              geo.padding, geo.dilation)
    table = torch.zeros(sh * sw, kh * kw + 1, dtype=torch.int32)
    for phase in range(sh * sw):
        taps = [i * kw + j for i in range(kh) for j in range(kw)
                if (phase // sw + ph - i * dh) % sh == 0
                and (phase % sw + pw - j * dw) % sw == 0]
        table[phase, 0] = len(taps)
        table[phase, 1:len(taps) + 1] = torch.tensor(taps, dtype=torch.int32)
    return table.to(device)


def _tap_weight(weight: Tensor) -> Tensor:
    """(O, C/groups, kh, kw) -> (K, C/groups, O): channels and output
    channels contiguous for both GEMM orientations."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[1],
                                              weight.shape[0]).contiguous()


def _forward(input: Tensor, attn: Tensor, weight: Tensor,
             bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    """(B, C, H, W) -> (B, O, H_out, W_out) in input's layout."""
    dims = _Dims.of(input, weight, geo)
    x = _channels_last(input)
    w_tap = _tap_weight(weight)
    out = _new_nhwc(input, dims.out_ch, *geo.out_size)
    rows = dims.batch * geo.out_size[0] * geo.out_size[1]
    tiles = _tiles('fwd', dims, rows, input.dtype, input.device)
    grid = (triton.cdiv(rows, tiles['BLOCK_M']) *
            triton.cdiv(dims.group_out, tiles['BLOCK_N']), geo.groups)
    _fwd_kernel[grid](
        x, attn, w_tap, weight if bias is None else bias, out,
        rows, geo.out_size[0] * geo.out_size[1], geo.out_size[1],
        dims.height, dims.width,
        dims.group_in, dims.group_out, dims.seg_ch, dims.attn_ch,
        *x.stride(), *attn.stride(), *w_tap.stride(), *out.stride(),
        **_conv_args(geo), HAS_BIAS=bias is not None,
        PRECISION=_precision(input.dtype), **tiles)
    return in_layout_of(out, input)


def _backward_data(grad_out: Tensor, x: Tensor, attn: Tensor,
                   weight: Tensor, geo: ConvGeometry, need_input: bool,
                   need_attn: bool):
    """grad_input (or None) with NHWC storage and grad_attn (or None) of
    attn's shape, from channels-last grad_out and input x."""
    dims = _Dims.of(x, weight, geo)
    w_tap = _tap_weight(weight)
    (sh, sw), (out_h, out_w) = geo.stride, geo.out_size
    q_h, q_w = triton.cdiv(dims.height, sh), triton.cdiv(dims.width, sw)
    rows = dims.batch * q_h * q_w
    tiles = _tiles('data', dims, rows * sh * sw, x.dtype, x.device)
    c_blocks = triton.cdiv(dims.seg_ch, tiles['BLOCK_N'])
    segments = dims.channels // dims.seg_ch
    grad_input = _new_nhwc(x, dims.channels, dims.height,
                           dims.width) if need_input else x
    part_numel = dims.batch * geo.num_taps * out_h * out_w
    # zeros: (u, t) pairs whose window lies in the padding are not visited
    parts = torch.zeros(segments * c_blocks, part_numel, device=x.device,
                        dtype=torch.float32) if need_attn else grad_out
    grid = (triton.cdiv(rows, tiles['BLOCK_M']) * c_blocks * segments //
            geo.groups, geo.groups, sh * sw)
    _bwd_data_kernel[grid](
        grad_out, attn, w_tap, x, grad_input, parts,
        _phase_taps(geo, x.device),
        rows, q_h * q_w, q_w, dims.height, dims.width, out_h, out_w,
        dims.group_in, dims.group_out, dims.seg_ch, dims.attn_ch, part_numel,
        *grad_out.stride(), *attn.stride(), *w_tap.stride(), *x.stride(),
        *grad_input.stride(), **_conv_args(geo), NEED_INPUT=need_input,
        NEED_ATTN=need_attn, PRECISION=_precision(x.dtype), **tiles)
    grad_attn = None
    if need_attn:
        grad_attn = parts.view(geo.attn_groups, -1, dims.batch,
                               geo.num_taps, out_h, out_w).sum(1)
        grad_attn = grad_attn.transpose(0, 1).to(
            attn.dtype, memory_format=torch.contiguous_format)
    return grad_input if need_input else None, grad_attn


def _backward_weight(grad_out: Tensor, x: Tensor, attn: Tensor,
                     weight: Tensor, geo: ConvGeometry) -> Tensor:
    """(O, C/groups, kh, kw) weight gradient from channels-last grad_out
    and input x."""
    dims = _Dims.of(x, weight, geo)
    out_h, out_w = geo.out_size
    rows = dims.batch * out_h * out_w
    tiles = _tiles('weight', dims, rows, x.dtype, x.device)
    tiles_per_split = (triton.cdiv(dims.group_out, tiles['BLOCK_M']) *
                       geo.num_taps * dims.channels // dims.seg_ch *
                       triton.cdiv(dims.seg_ch, tiles['BLOCK_N']))
    depth = tiles['BLOCK_K']
    splits = max(1, min(triton.cdiv(2 * _sm_count(x.device),
                                    tiles_per_split),
                        rows // (8 * depth)))
    split_rows = triton.cdiv(triton.cdiv(rows, splits), depth) * depth
    splits = triton.cdiv(rows, split_rows)
    parts = _empty(x, (splits, dims.out_ch, geo.num_taps, dims.group_in),
                   torch.float32)
    grid = (tiles_per_split // geo.groups, splits, geo.groups)
    _bwd_weight_kernel[grid](
        grad_out, attn, x, parts,
        rows, out_h * out_w, out_w, dims.height, dims.width, dims.out_ch,
        dims.group_in, dims.group_out, dims.seg_ch, dims.attn_ch, split_rows,
        *grad_out.stride(), *attn.stride(), *x.stride(), **_conv_args(geo),
        PRECISION=_precision(x.dtype), **tiles)
    grad_weight = parts.sum(0).view(dims.out_ch, *geo.kernel_size,
                                    dims.group_in)
    return grad_weight.permute(0, 3, 1, 2).to(
        weight.dtype, memory_format=torch.contiguous_format)


class AIKConv2dTriton(torch.autograd.Function):
    """Autograd over the Triton kernels; saves only (input, attn, weight)."""

    @staticmethod
    def forward(ctx, input: Tensor, attn: Tensor, weight: Tensor,
                bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
        ctx.geo = geo
        ctx.save_for_backward(input, attn, weight)
        return _forward(input, attn, weight, bias, geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        input, attn, weight = ctx.saved_tensors
        need_input, need_attn, need_weight, need_bias = \
            ctx.needs_input_grad[:4]
        grad_out_nhwc = _channels_last(grad_out)
        x = _channels_last(input) if need_attn or need_weight else input
        grad_input = grad_attn = grad_weight = grad_bias = None
        if need_input or need_attn:
            grad_input, grad_attn = _backward_data(grad_out_nhwc, x, attn,
                                                   weight, ctx.geo,
                                                   need_input, need_attn)
        if need_input:
            grad_input = in_layout_of(grad_input, input)
        if need_weight:
            grad_weight = _backward_weight(grad_out_nhwc, x, attn, weight,
                                           ctx.geo)
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_attn, grad_weight, grad_bias, None


def aik_conv2d_triton(input: Tensor, attn: Tensor, weight: Tensor,
                      bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    """:func:`aik_conv2d` on Triton kernels (torch path where unsupported).

    Args:
        input: (B, C, H, W), any strides.
        attn: (B, G, K, H_out, W_out), any strides (expanded views too).
        weight: (O, C/groups, kh, kw).
        bias: (O,) or None.
        geo: from :func:`check_aik_args`; all operands share one dtype.

    Returns:
        (B, O, H_out, W_out), channels_last when ``input`` is.
    """
    if not supports(input, geo):
        return AIKConv2dFunction.apply(input, attn, weight, bias, geo)
    if not (input.is_cuda or _INTERPRETED):
        raise RuntimeError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            'before triton kernels are defined to run CPU tensors')
    return AIKConv2dTriton.apply(input, attn, weight, bias, geo)

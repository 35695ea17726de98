"""The attention generator of an AIK convolution."""
from contextlib import contextmanager, nullcontext
from typing import Tuple

import torch
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from mmdynconv.ops import attention_generator

from .fused_attention import (FusedAttention, can_fuse, fused_attention,
                              fused_params, uses_batch_statistics)

CONTEXTS = ('local', 'global', 'local_global')
FUSIONS = ('add', 'mul', 'cat')
ACTIVATIONS = ('2sigmoid', 'sigmoid', 'softmax')


@contextmanager
def _running_stats_restored(module: nn.Module):
    """Undo what a forward pass does to the batch norms' running statistics
    (for a checkpoint's second forward pass, which must not count twice)."""
    buffers = [b for m in module.modules() if isinstance(m, _BatchNorm)
               for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


class AIKAttention(nn.Module):
    """Attention inside the kernel, from fused local and global context.

    local(x):  depthwise k*k conv on the main conv's window grid -> norm ->
               1*1 conv C->M, one vector per output position;
    global(x): global average pool -> 1*1 conv C->M, one vector per sample;
    fuse:      'add' (local + global), 'mul' (local * sigmoid(global)) or
               'cat' ([local, global]), then norm and ReLU;
    head:      zero-initialised 1*1 conv to G*K logits;
    act:       '2sigmoid' (2*sigmoid), 'sigmoid', or 'softmax' over the K
               taps scaled by K.

    With the head at zero, '2sigmoid' and 'softmax' give A == 1 and
    'sigmoid' gives A == 0.5. The global-only context has no spatial extent,
    so it skips the fusion norm (batch norm cannot normalise one value per
    sample when the batch holds one sample).

    Memory and speed: with plain batch norms (``norm_cfg`` type 'BN'), a
    local branch and float32/float64 input, :mod:`.fused_attention` computes
    A (in forward and in :meth:`attention_map`) when gradients are recorded
    or the norms use batch statistics: the local norm folds into the 1*1
    projection, and backward recomputes the depthwise conv once and
    differentiates by hand. It keeps x, A (both kept by the AIK op anyway)
    and per-channel vectors. Otherwise (pure inference; other norms such as
    GN or SyncBN, half precision, autocast, hooks on the submodules,
    ``torch.jit`` tracing) the modules compute A; when gradients are
    recorded, forward runs them under a checkpoint, which recomputes them in
    backward instead of keeping their intermediates (two of them C-channel
    maps at full resolution). The global-only context keeps nothing that
    large and runs its modules plainly. Either way batch norms update their
    running statistics once per forward.

    Args:
        in_channels: C.
        kernel_size, stride, padding, dilation: the main convolution's, as
            pairs; they fix the output grid and K = kh*kw.
        attn_groups: G, input-channel groups that share one attention map.
        reduction, min_channels: hidden width M = max(C // reduction,
            min_channels).
        context, fusion, act: see above.
        norm_cfg: mmcv norm config of the local branch and the fusion.
    """

    def __init__(self,
                 in_channels: int,
                 kernel_size: Tuple[int, int],
                 stride: Tuple[int, int],
                 padding: Tuple[int, int],
                 dilation: Tuple[int, int],
                 attn_groups: int = 1,
                 reduction: int = 16,
                 min_channels: int = 8,
                 context: str = 'local_global',
                 fusion: str = 'add',
                 act: str = '2sigmoid',
                 norm_cfg: dict = dict(type='BN')):
        super().__init__()
        _check_choice('context', context, CONTEXTS)
        _check_choice('fusion', fusion, FUSIONS)
        _check_choice('attn_act', act, ACTIVATIONS)
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f'reduction must be an int >= 1, got {reduction!r}')
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(
                f'min_channels must be an int >= 1, got {min_channels!r}')
        if (not isinstance(attn_groups, int) or attn_groups < 1
                or in_channels % attn_groups):
            raise ValueError(
                f'attn_groups must be a positive int dividing in_channels='
                f'{in_channels}, got {attn_groups!r}')
        self.kernel_size = tuple(kernel_size)
        self.attn_groups = attn_groups
        self.context = context
        self.fusion = fusion
        self.act = act
        num_taps = self.kernel_size[0] * self.kernel_size[1]
        hidden = max(in_channels // reduction, min_channels)

        self.local_conv = self.local_norm = self.local_proj = None
        self.global_proj = self.fuse_norm = None
        if context != 'global':
            self.local_conv = nn.Conv2d(
                in_channels, in_channels, self.kernel_size, stride, padding,
                dilation, groups=in_channels, bias=False)
            self.local_norm = build_norm_layer(norm_cfg, in_channels)[1]
            self.local_proj = nn.Conv2d(in_channels, hidden, 1, bias=False)
        if context != 'local':
            self.global_proj = nn.Conv2d(in_channels, hidden, 1, bias=False)
        fused = hidden * (2 if context == 'local_global'
                          and fusion == 'cat' else 1)
        if context != 'global':
            self.fuse_norm = build_norm_layer(norm_cfg, fused)[1]
        self.head = nn.Conv2d(fused, attn_groups * num_taps, 1)
        self.reset_head()

    def reset_head(self) -> None:
        """Zero the head so the attention starts uniform."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _local(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, M, H_out, W_out)."""
        return self.local_proj(self.local_norm(self.local_conv(x)))

    def _fuse(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> fused context (B, M or 2M, H_out or 1, W_out or 1)."""
        if self.global_proj is not None:
            glob = self.global_proj(x.mean((2, 3), keepdim=True))
            if self.local_conv is None:
                return torch.relu(glob)
        local = self._local(x)
        if self.global_proj is None:
            fused = local
        elif self.fusion == 'add':
            fused = local + glob
        elif self.fusion == 'mul':
            fused = local * torch.sigmoid(glob)
        else:
            fused = torch.cat([local, glob.expand_as(local)], dim=1)
        return torch.relu(self.fuse_norm(fused))

    def _modules_attention_map(self, x: Tensor) -> Tensor:
        """attention_map(x) by the modules, with plain autograd."""
        logits = self.head(self._fuse(x))
        logits = logits.view(logits.shape[0], self.attn_groups, -1,
                             *logits.shape[2:])
        if self.act == 'softmax':
            return logits.shape[2] * torch.softmax(logits, dim=2)
        attn = torch.sigmoid(logits)
        return 2 * attn if self.act == '2sigmoid' else attn

    def _fusable(self, x: Tensor) -> bool:
        """Whether :mod:`.fused_attention` computes A for x.

        Not under ``torch.jit`` tracing, which should see the modules, nor
        for pure inference (no gradients, no batch statistics) off the
        compiled CPU generator, where the modules are faster (on it, they
        took 3-6 times as long at ResNet-50's shapes). A reentrant
        checkpoint's first pass (no gradients, batch statistics) gets the
        same arithmetic as its recomputation.
        """
        if torch.jit.is_tracing():
            return False
        pure_inference = not torch.is_grad_enabled() and not any(
            isinstance(norm, _BatchNorm) and uses_batch_statistics(norm)
            for norm in (self.local_norm, self.fuse_norm))
        if pure_inference and not attention_generator.compiled(x):
            return False
        return can_fuse(self, x)

    def _fused_attention_map(self, x: Tensor) -> Tensor:
        """attention_map(x) by :mod:`.fused_attention`."""
        if torch.is_grad_enabled():
            return FusedAttention.apply(self, x, *fused_params(self))
        return fused_attention(self, x)

    def attention_map(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> A of shape (B, G, K, H_out, W_out), or
        (B, G, K, 1, 1) for the global-only context."""
        if self._fusable(x):
            return self._fused_attention_map(x)
        return self._modules_attention_map(x)

    def forward(self, x: Tensor, out_size: Tuple[int, int]) -> Tensor:
        """(B, C, H, W) -> A of shape (B, G, K, H_out, W_out)."""
        if self._fusable(x):
            attn = self._fused_attention_map(x)
        elif (torch.is_grad_enabled() and self.local_conv is not None
              and not torch.jit.is_tracing()):
            attn = checkpoint(
                self._modules_attention_map,
                x,
                use_reentrant=False,
                context_fn=lambda:
                (nullcontext(), _running_stats_restored(self)))
        else:
            attn = self._modules_attention_map(x)
        return attn.expand(-1, -1, -1, *out_size)

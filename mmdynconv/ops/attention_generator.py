"""The AIK attention generator compiled for CPU, one call each way
(``csrc/attention_generator_cpu.cpp``): the depthwise pass
(:mod:`.depthwise_context`), the local norm folded into the local
projection, the global projection, the tail (fusion, fusion norm, ReLU, head,
activation) and both batch norms' running statistics; backward, all their
gradients.

:mod:`mmdynconv.cnn.fused_attention` uses it for CPU float32/float64 input
when the extension is built and computes the same with torch ops otherwise.
These are plain functions on tensors: that module passes the generator's
parameters and differentiates by hand.
"""
from typing import List, NamedTuple, Optional, Tuple

from torch import Tensor

from . import extension

AVAILABLE = extension.cpu is not None
FUSIONS = {None: 0, 'add': 1, 'mul': 2, 'cat': 3}
ACTIVATIONS = {'2sigmoid': 0, 'sigmoid': 1, 'softmax': 2}
Pair = Tuple[int, int]


class NormArgs(NamedTuple):
    """A batch norm as the extension takes it: its tensors (None where it
    has none), momentum (None: cumulative average), eps, and whether it
    normalises by the batch's statistics (then a forward updates the running
    ones, if any, as ``nn.BatchNorm2d`` does)."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    batch_stats: bool


def compiled(x: Tensor) -> bool:
    """Whether the extension handles x."""
    return AVAILABLE and extension.takes(x)


class GeneratorArgs(NamedTuple):
    """The generator's parameters as its modules hold them, and its
    options."""
    local_conv: Tensor  # (C, 1, kh, kw)
    stride: Pair  # local_conv's, as are padding and dilation
    padding: Pair
    dilation: Pair
    local_norm: NormArgs
    local_proj: Tensor  # (M, C, 1, 1)
    global_proj: Optional[Tensor]  # (M, C, 1, 1); None: local context only
    fusion: Optional[str]  # None exactly when global_proj is
    fuse_norm: NormArgs
    head_weight: Tensor  # (G*K, M', 1, 1)
    head_bias: Tensor  # (G*K,)
    act: str  # over the K taps of each of the ``groups`` groups
    groups: int


def _extension_args(args: GeneratorArgs) -> tuple:
    return (*args[:7], FUSIONS[args.fusion], *args[8:11],
            ACTIVATIONS[args.act], args.groups)


def generator_forward(x: Tensor, args: GeneratorArgs) -> List[Optional[Tensor]]:
    """A from x (B, C, H, W).

    Returns:
        [A (B, G, K, H_out, W_out), the pooled input (B, C; None without
        global_proj), the local maps (B, M, H_out*W_out), the local norm's
        mean and invstd (C,), the fusion norm's (M',)].
    """
    return extension.cpu.generator_forward(x, *_extension_args(args))


def generator_backward(x: Tensor, attn: Tensor, grad_attn: Tensor,
                       saved: List[Optional[Tensor]], args: GeneratorArgs,
                       needs: Tuple[bool, bool],
                       grad_x_into: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The backward of :func:`generator_forward` from A and dA (B, G, K,
    H_out, W_out); saved: what it returned after A (pooled, local maps, the
    four statistics); args as given to it. x's gradient is added to
    grad_x_into (contiguous, x's shape) when given.

    Returns:
        [x's gradient, and those of local_conv, the local norm's weight and
        bias, local_proj, global_proj, the fusion norm's weight and bias, the
        head's weight and bias]: None where a parameter is None, and for x
        and local_conv where ``needs`` says not needed.
    """
    return extension.cpu.generator_backward(x, attn, grad_attn, *saved,
                                            *_extension_args(args), *needs,
                                            grad_x_into)

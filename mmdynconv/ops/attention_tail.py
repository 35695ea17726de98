"""The tail of the AIK attention generator compiled for CPU: from the local
maps (B, M, P) and the global vector (B, M), the fusion, the fusion norm,
ReLU and the head in one call (the activation is left to torch's vectorised
ops), and the backward of all of them, the activation's included, in one
call (``csrc/attention_tail_cpu.cpp``).

:mod:`mmdynconv.cnn.fused_attention` uses it for CPU float32/float64 maps
when the extension is built, and its own torch ops otherwise.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

try:
    from . import _attention_tail_cpu
except ImportError:  # not built: running from a plain source tree
    _attention_tail_cpu = None

AVAILABLE = _attention_tail_cpu is not None
FUSIONS = {None: 0, 'add': 1, 'mul': 2, 'cat': 3}
ACTIVATIONS = {'2sigmoid': 0, 'sigmoid': 1, 'softmax': 2}


def compiled(maps: Tensor) -> bool:
    """Whether the extension handles these maps."""
    return (AVAILABLE and maps.device.type == 'cpu'
            and maps.dtype in (torch.float32, torch.float64))


def tail_forward(local: Tensor, glob: Optional[Tensor], fusion: Optional[str],
                 stats: Optional[Tuple[Tensor, Tensor]],
                 gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                 weight: Tensor, bias: Tensor) -> List[Optional[Tensor]]:
    """The head's logits (B, G*K, P) from local (B, M, P) and glob (B, M;
    None, with fusion None, without a global branch): fusion, the norm with
    gamma and beta (M',; None without affine) by stats = (mean, invstd) or,
    when None, by the batch's, ReLU, the head weight (G*K, M') and bias.

    Returns:
        [logits, mean, biased variance (None when stats were given)].
    """
    mean, invstd = stats if stats is not None else (None, None)
    return _attention_tail_cpu.forward(local.contiguous(), glob,
                                       FUSIONS[fusion], mean, invstd, gamma,
                                       beta, eps, weight.contiguous(), bias)


def tail_backward(local: Tensor, glob: Optional[Tensor],
                  fusion: Optional[str], mean: Tensor, scale: Tensor,
                  stat: Optional[Tensor], beta: Optional[Tensor],
                  weight: Tensor, attn: Tensor, grad_attn: Tensor, act: str,
                  groups: int) -> List[Optional[Tensor]]:
    """The gradients of :func:`tail_forward` followed by the activation act
    (over ``groups`` groups of taps), from A and dA (B, G*K, P), with the
    norm's mean and scale (gamma * invstd) (M',) and its batch-statistics
    terms stat (M', 2) or None: the gradient at the fusion is
    dN * scale + stat[:, 0] * sum(dN * centred) * centred
    + stat[:, 1] * sum(dN), dN the gradient at the norm's output.

    Returns:
        [grad_local, grad_glob (None without), sum(dN), sum(dN * centred)
        (M',), grad_weight, grad_bias].
    """
    return _attention_tail_cpu.backward(local.contiguous(), glob,
                                        FUSIONS[fusion], mean, scale, stat,
                                        beta, weight.contiguous(),
                                        attn.contiguous(),
                                        grad_attn.contiguous(),
                                        ACTIVATIONS[act], groups)

"""The compiled CPU extension ``mmdynconv.ops._cpu`` (built by setup.py from
``csrc/``: the AIK op and the attention generator's passes), or None in a
source tree where it was not built."""
import torch
from torch import Tensor

try:
    from . import _cpu as cpu
except ImportError:  # not built: running from a plain source tree
    cpu = None

DTYPES = (torch.float32, torch.float64)


def takes(t: Tensor) -> bool:
    """Whether the extension's kernels take t: a CPU float32 or float64
    tensor (and the extension is built)."""
    return cpu is not None and t.device.type == 'cpu' and t.dtype in DTYPES

"""mmdynconv: attention-inside-kernel (AIK) convolutions for OpenMMLab.

``import mmdynconv`` (or ``custom_imports=dict(imports=['mmdynconv'])``)
registers the AIK layer and backbones in mmengine's root registries, where
MMDetection's and MMPretrain's scopes find them, and lets torch's
weights-only loader read Runner checkpoints (see ``utils/checkpoint.py``).
``mmdynconv.ops`` needs nothing but torch.
"""
from importlib.util import find_spec

from .version import __version__

if find_spec('mmengine') is not None:
    from . import cnn, models  # noqa: F401  (registers modules)
    from .utils import allow_runner_checkpoint_types
    allow_runner_checkpoint_types()

__all__ = ['__version__']

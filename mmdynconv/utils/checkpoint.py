"""Let torch >= 2.6 load the checkpoints an mmengine Runner writes.

torch.load defaults to ``weights_only=True`` since torch 2.6, and mmengine
0.10.7 calls it without the argument. Runner checkpoints carry numpy values
in ``meta`` and the message hub's ``HistoryBuffer`` objects, whose state
pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``; the
weights-only unpickler refuses all of these, so loading, ``load_from`` and
``--resume`` fail. Rather than switching the safety off, allow-list exactly
those types, and ``getattr`` only for HistoryBuffer's public methods.
"""
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# Numeric, boolean and string dtypes; object and void arrays stay refused.
_DTYPE_CODES = '?bhilqpBHILQPefdgFDGSUMm'


def _history_buffer_method(owner, name: str):
    """The only ``getattr`` a Runner checkpoint needs."""
    method = getattr(HistoryBuffer, name, None) \
        if owner is HistoryBuffer and not name.startswith('_') else None
    if not callable(method):
        raise pickle.UnpicklingError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only '
            'HistoryBuffer statistics methods are allowed')
    return method


def allow_runner_checkpoint_types() -> None:
    """Add the Runner's non-tensor checkpoint types to torch's safe globals."""
    multiarray = np.core.multiarray
    dtype_classes = {type(np.dtype(code)) for code in _DTYPE_CODES}
    torch.serialization.add_safe_globals([
        multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
        HistoryBuffer, *dtype_classes,
        (_history_buffer_method, 'builtins.getattr')
    ])

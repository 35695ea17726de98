"""Argument checks shared by the AIK backbones."""
from typing import Optional, Sequence, Tuple


def check_stage_with_aik(stage_with_aik: Optional[Sequence],
                         num_stages: int) -> Tuple[bool, ...]:
    """``stage_with_aik`` as a tuple of ``num_stages`` bools; None selects
    every stage.

    Raises:
        ValueError: if ``stage_with_aik`` is not ``num_stages`` bools.
    """
    if stage_with_aik is None:
        return (True, ) * num_stages
    if (not isinstance(stage_with_aik,
                       (tuple, list)) or len(stage_with_aik) != num_stages
            or not all(isinstance(s, bool) for s in stage_with_aik)):
        raise ValueError(
            f'stage_with_aik must hold one bool per stage (num_stages='
            f'{num_stages}), got {stage_with_aik!r}')
    return tuple(stage_with_aik)

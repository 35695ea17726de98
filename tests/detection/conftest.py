"""Fixtures of the detection tests."""
from pathlib import Path

import pytest

from detection_utils import make_toy_coco


@pytest.fixture(scope='session')
def toy_coco(tmp_path_factory) -> Path:
    """8 training and 4 validation scenes of 128x128."""
    return make_toy_coco(
        tmp_path_factory.mktemp('data') / 'toy_coco', num_train=8, num_val=4)

import pytest
import torch

from mmdynconv.ops import depthwise_context


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=['compiled', 'torch'])
def depthwise_path(request, monkeypatch):
    """Runs a test on the generator's compiled depthwise pass (which must be
    built) and on its torch path (CUDA, or no extension)."""
    if request.param == 'compiled':
        assert depthwise_context.AVAILABLE, 'the CPU extension is not built'
    else:
        monkeypatch.setattr(depthwise_context, 'AVAILABLE', False)
    return request.param

import pytest
import torch

from mmdynconv.ops import attention_generator, depthwise_context


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=['compiled', 'torch'])
def generator_path(request, monkeypatch):
    """Runs a test on the generator's compiled path (which must be built)
    and on its torch path (CUDA, or no extension)."""
    if request.param == 'compiled':
        assert attention_generator.AVAILABLE, 'the CPU extension is not built'
    else:
        monkeypatch.setattr(depthwise_context, 'AVAILABLE', False)
        monkeypatch.setattr(attention_generator, 'AVAILABLE', False)
    return request.param

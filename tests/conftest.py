import pytest
import torch

from mmdynconv.ops import attention_tail, depthwise_context


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=['compiled', 'torch'])
def generator_path(request, monkeypatch):
    """Runs a test on the generator's compiled passes, the depthwise one and
    the tail (which must be built), and on their torch paths (CUDA, or no
    extensions)."""
    if request.param == 'compiled':
        assert depthwise_context.AVAILABLE, 'the depthwise extension is not built'
        assert attention_tail.AVAILABLE, 'the tail extension is not built'
    else:
        monkeypatch.setattr(depthwise_context, 'AVAILABLE', False)
        monkeypatch.setattr(attention_tail, 'AVAILABLE', False)
    return request.param

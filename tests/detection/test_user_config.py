"""A user's own config, an upstream MMDetection config plus custom_imports
and an AIK backbone, builds and predicts; with its plain twin's weights it
computes the twin's features (the attention starts as the identity)."""
import torch
from mmdet.apis import inference_detector, init_detector
from mmengine.config import Config

from mmdynconv.cnn import AIKConv2d

UPSTREAM = "_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'\n"
USER_CONFIG = UPSTREAM + """
custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)
model = dict(backbone=dict(type='AIKResNet'))
"""


def _load(path) -> Config:
    """The config, keeping every detection and testing at 256 pixels (the
    shipped 1333x800 is slow on a CPU)."""
    cfg = Config.fromfile(path)
    cfg.model.test_cfg.rcnn.score_thr = 0
    cfg.test_dataloader.dataset.pipeline[1].scale = (256, 256)
    return cfg


def test_user_config_predicts_and_matches_its_plain_twin(tmp_path, toy_coco):
    (tmp_path / 'user.py').write_text(USER_CONFIG)
    (tmp_path / 'plain.py').write_text(UPSTREAM)
    model = init_detector(_load(tmp_path / 'user.py'), device='cpu')
    plain = init_detector(_load(tmp_path / 'plain.py'), device='cpu')
    assert type(model.backbone).__name__ == 'AIKResNet'
    assert any(isinstance(m, AIKConv2d) for m in model.backbone.modules())
    missing, unexpected = plain.load_state_dict(
        model.state_dict(), strict=False)
    assert not missing and all('.generator.' in k for k in unexpected)

    image = str(toy_coco / 'val' / '000000.png')
    pred = inference_detector(model, image).pred_instances
    assert len(pred) == 100 and pred.bboxes.shape == (100, 4)
    assert ((pred.labels >= 0) & (pred.labels < 80)).all()
    assert (pred.scores[:-1] >= pred.scores[1:]).all()

    with torch.no_grad():
        image = torch.rand(1, 3, 128, 128)
        for got, want in zip(
                model.extract_feat(image), plain.extract_feat(image)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

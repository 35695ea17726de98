"""The pinned OpenMMLab stack is real and works on this machine's CPU."""
import numpy as np
import pytest
import torch
from mmengine.hub import get_config
from mmengine.model import BaseModel
from mmengine.registry import init_default_scope


def test_mmcv_nms_known_answer():
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [20., 20., 30., 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.9, 0.7]))
    # IoU(box0, box1) = 81 / 119 = 0.68: kept apart only above that threshold
    assert nms(boxes, scores, iou_threshold=0.7)[1].tolist() == [0, 1, 2]


def test_mmcv_roi_align_known_answer_and_torchvision():
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align
    # f(y, x) = 4y + x is linear, so bilinear sampling is exact.
    feature = torch.arange(16.).view(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])
    out = RoIAlign(2, spatial_scale=1.0, sampling_ratio=1, aligned=True)(
        feature, rois)
    torch.testing.assert_close(out, torch.tensor([[[[2.5, 4.5],
                                                    [10.5, 12.5]]]]))
    feature = torch.randn(2, 3, 16, 12)
    rois = torch.tensor([[0., 1.5, 2., 9., 13.], [1., 0., 0., 11., 15.]])
    ours = RoIAlign(5, 0.5, sampling_ratio=2, aligned=True)(feature, rois)
    theirs = roi_align(feature, rois, 5, 0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize('config', [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
])
def test_mmdet_detectors_loss_and_predict(config):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    init_default_scope('mmdet')
    cfg = get_config(config)
    cfg.model.backbone.init_cfg = None  # no ImageNet download here
    model = MODELS.build(cfg.model)
    model.init_weights()
    packed = demo_mm_inputs(1, [[3, 128, 160]], num_items=[3],
                            num_classes=80)
    data = model.data_preprocessor(packed, training=True)
    losses = model(**data, mode='loss')
    total = sum(v if torch.is_tensor(v) else sum(v)
                for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total) and total > 0
    total.backward()
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(packed, training=False)
        results = model(**data, mode='predict')
    assert len(results) == 1
    pred = results[0].pred_instances
    assert pred.bboxes.shape[1] == 4
    assert len(pred.bboxes) == len(pred.scores) == len(pred.labels)


def test_mmpretrain_resnet18_classifier_forward():
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    cfg = get_config('mmpretrain::_base_/models/resnet18.py')
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'ImageClassifier'
    logits = model(torch.randn(2, 3, 64, 64), mode='tensor')
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


class _TinyRegressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=(out - labels).pow(2).mean())
        return out


def _tiny_runner(work_dir, max_epochs, **kwargs):
    from mmengine.runner import Runner
    data = [dict(inputs=torch.randn(2), labels=torch.randn(1))
            for _ in range(8)]
    return Runner(
        model=_TinyRegressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=data,
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=4,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        randomness=dict(seed=0),
        **kwargs)


def test_runner_checkpoint_loads_and_resumes(tmp_path):
    """torch >= 2.6 loads with weights_only=True; a Runner's checkpoint holds
    numpy values and HistoryBuffers. ``import mmdynconv`` allows them."""
    import mmdynconv  # noqa: F401
    from mmengine.runner.checkpoint import _load_checkpoint
    _tiny_runner(tmp_path, 1).train()
    checkpoint = _load_checkpoint(str(tmp_path / 'epoch_1.pth'), 'cpu')
    assert checkpoint['meta']['epoch'] == 1
    assert isinstance(checkpoint['meta']['seed'], (int, np.integer))
    runner = _tiny_runner(tmp_path, 2, resume=True)
    runner.train()
    assert runner.epoch == 2
    trained = _load_checkpoint(str(tmp_path / 'epoch_2.pth'), 'cpu')
    assert trained['meta']['iter'] == 4  # 2 iterations per epoch, 2 epochs
    assert not torch.equal(trained['state_dict']['linear.weight'],
                           checkpoint['state_dict']['linear.weight'])


def test_checkpoint_allowlist_refuses_other_getattr(tmp_path):
    import pickle

    import mmdynconv  # noqa: F401

    class Payload:

        def __reduce__(self):
            return getattr, (np.ndarray, '__class__')

    path = tmp_path / 'evil.pth'
    torch.save({'x': Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match='only HistoryBuffer'):
        torch.load(path)

# RetinaNet with an AIK ResNet-18 trained from scratch on the toy shapes
# (configs/demo/_base_/toy-coco_detection.py), on a CPU in a few minutes.
# A slim FPN and head, and anchors sized for 15-51 pixel objects.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    './_base_/toy-coco_detection.py'
]

custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='AIKResNet',
        depth=18,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    bbox_head=dict(
        num_classes=3,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        anchor_generator=dict(octave_base_scale=2, ratios=[1.0])),
    test_cfg=dict(nms_pre=300))

optim_wrapper = dict(optimizer=dict(lr=0.01))

# Faster R-CNN with an AIK ResNet-18 trained from scratch on the toy shapes
# (configs/demo/_base_/toy-coco_detection.py): MMDetection detection end to
# end on a CPU in a few minutes; the model of `make demo`. A slim FPN and
# heads and anchors sized for 15-51 pixel objects keep it fast.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
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
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        anchor_generator=dict(scales=[4, 6], ratios=[1.0])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=3)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))

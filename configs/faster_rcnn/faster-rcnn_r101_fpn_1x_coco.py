# Faster R-CNN with a ResNet-101-FPN, 1x schedule, COCO 2017: MMDetection's
# config as shipped; the plain twin of ./faster-rcnn_r101-aik_fpn_1x_coco.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'

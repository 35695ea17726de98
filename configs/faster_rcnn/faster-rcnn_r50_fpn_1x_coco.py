# Faster R-CNN with a ResNet-50-FPN, 1x schedule, COCO 2017: MMDetection's
# config as shipped; the plain twin of ./faster-rcnn_r50-aik_fpn_1x_coco.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

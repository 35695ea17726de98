# RetinaNet with a ResNet-101-FPN, 1x schedule, COCO 2017: MMDetection's
# config as shipped; the plain twin of ./retinanet_r101-aik_fpn_1x_coco.py.
_base_ = 'mmdet::retinanet/retinanet_r101_fpn_1x_coco.py'

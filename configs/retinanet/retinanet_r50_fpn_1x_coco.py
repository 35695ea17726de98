# RetinaNet with a ResNet-50-FPN, 1x schedule, COCO 2017: MMDetection's
# config as shipped; the plain twin of ./retinanet_r50-aik_fpn_1x_coco.py.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

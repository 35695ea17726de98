# RetinaNet with an AIK ResNet-101-FPN, 1x schedule, COCO 2017: the plain
# twin ./retinanet_r101_fpn_1x_coco.py with AIK in the 3x3 convolutions of
# stages 2-4 (stage 1 is frozen, as in the twin). The static kernels load
# torchvision's ImageNet ResNet-101; the attention starts as the identity.
_base_ = './retinanet_r101_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)

model = dict(
    backbone=dict(type='AIKResNet', stage_with_aik=(False, True, True, True)))

# MobileNetV2 1.0x on ImageNet-1k (8 GPUs x 32, 300 epochs) whose 3x3
# depthwise convolutions are AIK convolutions; all else as the plain twin.
_base_ = './mobilenet-v2_8xb32_in1k.py'

custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)

model = dict(backbone=dict(type='AIKMobileNetV2'))

# ResNet-50 on ImageNet-1k (8 GPUs x 32, 100 epochs, step LR) with AIK
# convolutions in every stage; all else as the plain twin.
_base_ = './resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)

model = dict(backbone=dict(type='AIKResNet'))

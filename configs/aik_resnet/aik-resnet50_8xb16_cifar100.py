# CIFAR-stem ResNet-50 on CIFAR-100 with AIK convolutions in every stage;
# all else as the plain twin.
_base_ = './resnet50_8xb16_cifar100.py'

custom_imports = dict(imports=['mmdynconv'], allow_failed_imports=False)

model = dict(backbone=dict(type='AIKResNet_CIFAR'))

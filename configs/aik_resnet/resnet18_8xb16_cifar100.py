# Plain twin of aik-resnet18_8xb16_cifar100.py. MMPretrain ships no
# ResNet-18 CIFAR-100 config: its ResNet-50 CIFAR-100 recipe at depth 18.
_base_ = 'mmpretrain::resnet/resnet50_8xb16_cifar100.py'

model = dict(backbone=dict(depth=18), head=dict(in_channels=512))

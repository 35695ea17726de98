# Plain twin of aik-resnet18_8xb16_cifar10.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::resnet/resnet18_8xb16_cifar10.py'

# Plain twin of aik-resnet50_8xb16_cifar10.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::resnet/resnet50_8xb16_cifar10.py'

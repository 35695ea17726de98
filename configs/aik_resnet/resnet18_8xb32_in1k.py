# Plain twin of aik-resnet18_8xb32_in1k.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

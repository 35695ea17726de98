# Plain twin of aik-resnet101_8xb32_in1k.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::resnet/resnet101_8xb32_in1k.py'

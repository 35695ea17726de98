# Plain twin of aik-mobilenet-v2_8xb32_in1k.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'

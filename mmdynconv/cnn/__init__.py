from .aik_attention import AIKAttention
from .aik_conv import AIKConv2d

__all__ = ['AIKAttention', 'AIKConv2d']

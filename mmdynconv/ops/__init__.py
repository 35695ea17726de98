from .aik_conv2d import aik_conv2d, check_aik_args

__all__ = ['aik_conv2d', 'check_aik_args']

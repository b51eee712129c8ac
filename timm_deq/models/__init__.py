"""MDEQ models; importing this registers them with timm."""
from .mdeq import MDEQ, MultiscaleCell

__all__ = ['MDEQ', 'MultiscaleCell']

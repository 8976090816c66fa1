"""Image data: synthetic sets on disk (``SyntheticSet``), real labelled images, image files."""
from .synthetic import SyntheticSet

__all__ = ["SyntheticSet"]

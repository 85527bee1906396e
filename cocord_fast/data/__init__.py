"""Data: sources, augmentation recipes and loaders, all yielding `Batch`."""
from .batch import Batch, image_layout
from .build import Loaders, build_loaders

__all__ = ["Batch", "Loaders", "build_loaders", "image_layout"]

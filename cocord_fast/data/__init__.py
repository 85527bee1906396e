"""Data: sources, augmentation recipes and loaders, all yielding `Batch`."""
from .batch import IMAGE_LAYOUT, Batch
from .build import Loaders, build_loaders

__all__ = ["IMAGE_LAYOUT", "Batch", "Loaders", "build_loaders"]

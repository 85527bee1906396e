"""CIFAR-100's python arrays: the `cifar100` data source."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from ..errors import UserError
from .sources import Source

# CIFAR-100's channel statistics, on the [0, 1] scale; its images' side.
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
SMALL_IMAGE_SIZE = 32


class CIFAR100(Source):
    """CIFAR-100 from the standard `cifar-100-python` folder (as torchvision stores it).

    `root` may be that folder or its parent. With `download=True` a missing folder is fetched
    through torchvision. Its images are held decoded.
    """

    name = "cifar100"
    image_size = SMALL_IMAGE_SIZE
    mean, std = CIFAR_MEAN, CIFAR_STD
    downloads = True
    encoded = False
    FOLDER = "cifar-100-python"
    classes = None  # numbered, not named (the names are in `meta`, not needed)

    @classmethod
    def open(cls, root: Path, train: bool, download: bool = False) -> CIFAR100:
        return cls(root, train, download)

    def __init__(self, root: str | Path, train: bool, download: bool = False):
        folder = self._find_folder(Path(root), download)
        path = folder / ("train" if train else "test")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        except FileNotFoundError:
            raise UserError(f"CIFAR-100 file {path} is missing (data.root={root})") from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} is not a CIFAR-100 python-format file ({err!r}); "
                            f"data.root must hold the 'cifar-100-python' folder") from None
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
            raise UserError(f"{path}: expected 'data' of shape (N, 3072) and N 'fine_labels', "
                            f"got {images.shape} and {len(labels)}")
        self.images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3) HWC
        self.targets = labels
        self.num_classes = 100

    @classmethod
    def _find_folder(cls, root: Path, download: bool) -> Path:
        for candidate in (root / cls.FOLDER, root):
            if (candidate / "train").is_file() and (candidate / "meta").is_file():
                return candidate
        if download:
            from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

            try:
                TorchvisionCIFAR100(str(root), train=True, download=True)
            except Exception as err:  # network errors come in many types
                raise UserError(f"could not download CIFAR-100 into {root}: {err}") from None
            return root / cls.FOLDER
        raise UserError(f"no CIFAR-100 data under data.root={root}: expected {root / cls.FOLDER}/"
                        f"{{train,test,meta}} (set data.download=true to fetch it)")

    def __len__(self) -> int:
        return len(self.targets)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]

    def fingerprint_bytes(self, start: int, end: int) -> bytes:
        """What identifies samples [start, end) (`fingerprint.py`): pixels and labels."""
        return self.images[start:end].tobytes() + self.targets[start:end].tobytes()

    def sample_names(self, start: int, end: int) -> list[str]:
        return [f"image {i} (pixels sha256:"
                f"{hashlib.sha256(self.images[i].tobytes()).hexdigest()[:12]})"
                for i in range(start, end)]

"""What the bench trains on when the user gives no data: a random CIFAR-100-format data set,
a random teacher checkpoint, and a batch made once on the device."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..data import IMAGE_LAYOUT, Batch
from ..models import build_model

CIFAR_CLASSES = 100


def write_synthetic_cifar(root: Path, num_train: int, num_test: int = 64) -> None:
    """Random images and labels in the `cifar-100-python` format (as CIFAR100 reads it)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", num_train), ("test", num_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, CIFAR_CLASSES, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": list(map(str, range(CIFAR_CLASSES)))}))


def write_random_teacher(name: str, num_classes: int, path: Path) -> None:
    """A teacher checkpoint of random weights: its speed is a trained teacher's."""
    torch.manual_seed(0)
    torch.save(build_model(name, num_classes).state_dict(), path)


def resident_batch(num_views: int, batch_size: int, image_size: int, num_classes: int,
                   num_train: int, device: torch.device) -> Batch:
    """A batch on `device` in the layout the data pipelines hand over (channels-last),
    so that the timed steps are the training step's and not the data pipeline's."""
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch_size, 3, image_size, image_size, generator=generator)
             .to(device, memory_format=IMAGE_LAYOUT) for _ in range(num_views)]
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    index = torch.randperm(num_train, generator=generator)[:batch_size]
    return Batch(views=views, labels=labels.to(device), index=index.to(device))

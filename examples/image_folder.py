"""A custom image dataset: an annotations CSV plus a folder of image files, as in "Writing Custom Datasets".

The tutorial's ``CustomImageDataset`` reads ``(file name, label)`` rows from a CSV and loads each image from
``img_dir``. Here the "images" are small 3x16x16 uint8 arrays saved as ``.npy`` files (no PIL or torchvision
needed), generated in a temporary directory. ``transform`` turns an image into a normalized float tensor and
``target_transform`` one-hot encodes the label, like the tutorial's ``Lambda``. The only change from the tutorial
is ``aloader.DataLoader``: each ``__getitem__`` (a file read) runs in a thread, many at once.
Run: ``python examples/image_folder.py``.
"""

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aloader

N_IMAGES = 60
N_CLASSES = 10


def make_image_folder(root: Path, n_images: int, rng: np.random.Generator) -> Path:
    """Write ``img_dir/*.npy`` images and return the path of their annotations CSV."""
    img_dir = root / "images"
    img_dir.mkdir()
    annotations_file = root / "annotations.csv"
    with annotations_file.open("w", newline="") as f:
        writer = csv.writer(f)
        for i in range(n_images):
            label = i % N_CLASSES
            image = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
            np.save(img_dir / f"img_{i:03d}.npy", image)
            writer.writerow([f"img_{i:03d}.npy", label])
    return annotations_file


class CustomImageDataset(aloader.Dataset[tuple[Any, Any]]):
    def __init__(
        self,
        annotations_file: Path,
        img_dir: Path,
        transform: Callable[[np.ndarray], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        with annotations_file.open(newline="") as f:
            self.img_labels = [(name, int(label)) for name, label in csv.reader(f)]
        self.img_dir = img_dir
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.img_labels)

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        name, label = self.img_labels[idx]
        image: Any = np.load(self.img_dir / name)
        target: Any = label
        if self.transform:
            image = self.transform(image)
        if self.target_transform:
            target = self.target_transform(target)
        return image, target


def to_normalized_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 CxHxW image -> float tensor in [0, 1] (like ToTensor), then normalized to [-1, 1] per channel."""
    return (torch.from_numpy(image).float() / 255 - 0.5) / 0.5


def one_hot(y: int) -> torch.Tensor:
    return torch.zeros(N_CLASSES, dtype=torch.float).scatter_(0, torch.tensor(y), value=1)


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        annotations_file = make_image_folder(Path(tmp), N_IMAGES, np.random.default_rng(0))
        training_data = CustomImageDataset(
            annotations_file, Path(tmp) / "images", transform=to_normalized_tensor, target_transform=one_hot
        )
        print(f"dataset: {len(training_data)} images in {N_CLASSES} classes")

        train_dataloader = aloader.DataLoader(training_data, batch_size=8, shuffle=True)

        # Display one batch, as the tutorial does.
        train_features, train_labels = next(iter(train_dataloader))
        print(f"Feature batch shape: {train_features.size()}")
        print(f"Labels batch shape: {train_labels.size()}")
        print(f"first label (one-hot): {train_labels[0].tolist()} -> class {int(train_labels[0].argmax())}")
        print(f"pixel range after normalization: [{train_features.min():.2f}, {train_features.max():.2f}]")

        # And a full epoch.
        seen = 0
        for batch, (features, labels) in enumerate(train_dataloader):
            seen += len(features)
            print(f"batch {batch}: features {tuple(features.shape)} labels {tuple(labels.shape)}")
        assert seen == N_IMAGES, seen
    print(f"OK image_folder: {seen} images in {len(train_dataloader)} batches")


if __name__ == "__main__":
    main()

"""Data modules: the 8×8 digits (shipped inside the package, no download) and CIFAR-10/100.

The training loaders are :class:`~lightning_nusam.data.ResumableDataLoader`, so a run resumed
mid-epoch continues with the same data order. Augmentation and normalisation are torchvision's
``transforms.v2`` on uint8 tensors; nothing here re-implements what torchvision does.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_nusam.checks import check_count
from lightning_nusam.data.label_noise import NoisyLabels, symmetric_label_noise
from lightning_nusam.data.resumable import ResumableDataLoader

#: Published per-channel mean/std of the training sets, in [0, 1].
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ImageArrayDataset(Dataset):
    """Images as an ``(N, C, H, W)`` tensor (uint8 or float) with integer labels and a transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _split(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes from a seeded permutation of ``range(n)``."""
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(permutation[: sum(sizes)].split(list(sizes)))


class _ImageDataModule(pl.LightningDataModule):
    """Shared loaders: resumable shuffled training, fixed-order evaluation, optional label noise."""

    num_classes: int
    train_set: ImageArrayDataset
    val_set: Dataset
    test_set: Dataset
    #: After ``setup``: the training labels with the flipped ones marked (``label_noise > 0``).
    noisy_labels: NoisyLabels | None = None

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        label_noise: float = 0.0,
        label_noise_seed: int = 0,
    ) -> None:
        super().__init__()
        check_count("batch_size", batch_size, 1)
        if isinstance(label_noise, bool) or not isinstance(label_noise, int | float) \
                or not 0 <= label_noise < 1:
            raise ValueError(f"`label_noise` must be a fraction in [0, 1), got {label_noise!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.label_noise = float(label_noise)
        self.label_noise_seed = int(label_noise_seed)

    def _training_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels to train on: ``labels`` with ``label_noise`` of them replaced (seeded)."""
        if self.label_noise == 0:
            self.noisy_labels = None
            return labels
        self.noisy_labels = symmetric_label_noise(labels, self.label_noise, self.num_classes,
                                                  self.label_noise_seed)
        return self.noisy_labels.labels

    def train_eval_dataloader(self) -> DataLoader:
        """The training images in a fixed order, without augmentation, with the labels trained on
        (noisy ones included): to measure how much of the training set, and of its noise, is fit."""
        dataset = ImageArrayDataset(self.train_set.images, self.train_set.labels, self.eval_transform)
        return self._eval_loader(dataset)

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
            drop_last=len(self.train_set) > self.batch_size, **self._loader_options(),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),  # never draws the global RNG
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 8×8 handwritten digits shipped in the package: ``images`` uint8 ``(1797, 8, 8)`` with
    pixel values 0..16 and ``labels`` int64 ``(1797,)`` in 0..9.

    The same arrays as scikit-learn's ``load_digits()`` (the UCI optical digits' test set, CC BY
    4.0; ``digits_source.txt`` beside the file says more), stored as a 45 KB ``.npz`` so that
    neither scikit-learn nor a download is needed.

    Example:
        >>> images, labels = load_digits()
        >>> tuple(images.shape), int(images.max()), labels.bincount().tolist()[:3]
        ((1797, 8, 8), 16, [178, 182, 177])
    """
    source = resources.files("lightning_nusam.data").joinpath("digits.npz")
    with source.open("rb") as handle, np.load(handle) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    return torch.from_numpy(images), torch.from_numpy(labels).long()


class DigitsDataModule(_ImageDataModule):
    """The 8×8 handwritten digits (1,797 images, 10 classes) shipped with the package: no
    download, no scikit-learn (see :func:`load_digits`).

    A fixed, seeded split into train/val/test; pixels (0..16) are scaled to [0, 1] and
    normalised with the training split's mean and std. Images are ``(1, 8, 8)``.
    ``label_noise`` replaces that fraction of the training labels by another class (seeded by
    ``label_noise_seed``; see :func:`~lightning_nusam.data.symmetric_label_noise`); validation
    and test labels stay clean.

    Example:
        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> tuple(images.shape), len(data.train_set), len(data.val_set), len(data.test_set)
        ((32, 1, 8, 8), 1257, 180, 360)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_size: int = 180,
        test_size: int = 360,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 0,
        label_noise: float = 0.0,
        label_noise_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, label_noise, label_noise_seed)
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed

    def setup(self, stage: str | None = None) -> None:
        pixels, labels = load_digits()
        images = pixels.to(torch.float32).unsqueeze(1) / 16.0
        train_size = len(labels) - self.val_size - self.test_size
        train, val, test = _split(len(labels), [train_size, self.val_size, self.test_size], self.split_seed)
        mean, std = images[train].mean(), images[train].std()
        normalise = v2.Normalize([float(mean)], [float(std)])
        self.eval_transform = normalise
        self.train_set = ImageArrayDataset(images[train], self._training_labels(labels[train]), normalise)
        self.val_set = ImageArrayDataset(images[val], labels[val], normalise)
        self.test_set = ImageArrayDataset(images[test], labels[test], normalise)


def load_npz(path: Path, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` uint8 ``(N, 32, 32, 3)`` and ``labels`` from an ``.npz`` → NCHW uint8, int64.

    Every problem is reported with the file's path: an unreadable or truncated file, missing
    arrays, images that are not ``N×32×32×3`` uint8, labels that are not integers in
    ``[0, num_classes)`` or whose count differs from the images'.
    """
    path = Path(path)
    try:
        with np.load(path) as arrays:
            missing = {"images", "labels"} - set(arrays.files)
            if missing:
                raise ValueError(f"{path}: no {sorted(missing)} array (it has {sorted(arrays.files)}); "
                                 "expected `images` (N, 32, 32, 3) uint8 and `labels` (N,)")
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, EOFError, zipfile.BadZipFile) as error:  # truncated or not an .npz
        raise ValueError(f"{path}: cannot read the .npz file ({type(error).__name__}: {error}); "
                         "is it complete? Re-copy or re-download it") from error
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: `images` must be uint8 of shape (N, 32, 32, 3) (HWC, RGB), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: `labels` must be {len(images)} integers (one per image), "
                         f"got {labels.dtype} {labels.shape}")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must be in [0, {num_classes}), found values from "
                         f"{labels.min()} to {labels.max()}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


class CIFARDataModule(_ImageDataModule):
    """CIFAR-10 / CIFAR-100 from torchvision (downloaded on demand) or from local ``.npz`` files.

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: where torchvision keeps (and, with ``download=True``, downloads) the dataset.
        npz_dir: a folder with ``train.npz`` and ``test.npz`` (``images`` uint8 N×32×32×3,
            ``labels``), used instead of torchvision when given.
        download: let torchvision download the dataset when it is missing.
        augment: random crop (32, 4-pixel padding) and horizontal flip for training.
        auto_augment: also AutoAugment with the CIFAR-10 policy.
        resize: resize images to this size (fine-tuning 224-pixel ImageNet models).
        val_size: hold out this many training images for validation (seeded split); 0
            validates on the test set, as the paper reports test accuracy of the best epoch.
        subset: use only this many training images (a seeded subset), for quick runs.
        eval_subset: use only this many validation/test images.
        batch_size, eval_batch_size, num_workers: loader settings.
        seed: data order of the training loader (epoch ``e`` uses ``seed + e``).
        split_seed: seed of the subset/validation split.
        label_noise: replace this fraction of the training labels by another class, uniformly
            (symmetric noise, :func:`~lightning_nusam.data.symmetric_label_noise`); validation
            and test labels stay clean.
        label_noise_seed: seed of which labels are replaced and by what.

    For example, ``CIFARDataModule(npz_dir="../shared/data/cifar10", subset=5000)`` trains on a
    seeded fifth of the local copy of CIFAR-10 and evaluates on its test set.
    """

    def __init__(
        self,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str = "data",
        npz_dir: str | None = None,
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        augment: bool = True,
        auto_augment: bool = False,
        resize: int | None = None,
        val_size: int = 0,
        subset: int | None = None,
        eval_subset: int | None = None,
        seed: int = 0,
        split_seed: int = 0,
        label_noise: float = 0.0,
        label_noise_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, label_noise, label_noise_seed)
        if dataset not in CIFAR_STATS:
            raise ValueError(f"`dataset` must be 'cifar10' or 'cifar100', got {dataset!r}")
        self.dataset = dataset
        self.num_classes = 10 if dataset == "cifar10" else 100
        self.data_dir, self.npz_dir, self.download = data_dir, npz_dir, download
        self.augment, self.auto_augment, self.resize = augment, auto_augment, resize
        for name, value, minimum in (("val_size", val_size, 0), ("subset", subset, 1),
                                     ("eval_subset", eval_subset, 1), ("num_workers", num_workers, 0)):
            if value is not None:
                check_count(name, value, minimum)
        self.val_size, self.subset, self.eval_subset = val_size, subset, eval_subset
        self.split_seed = split_seed

    def prepare_data(self) -> None:
        if self.npz_dir is None:
            self._torchvision_split(train=True)
            self._torchvision_split(train=False)

    def _torchvision_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100
        data = cls(self.data_dir, train=train, download=self.download)
        return torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(data.targets)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW images and labels of the train or test split."""
        if self.npz_dir is None:
            return self._torchvision_split(train)
        path = Path(self.npz_dir).expanduser() / ("train.npz" if train else "test.npz")
        if not path.is_file():
            raise FileNotFoundError(f"`npz_dir`: {path} does not exist")
        return load_npz(path, self.num_classes)

    def transforms(self, train: bool) -> v2.Compose:
        mean, std = CIFAR_STATS[self.dataset]
        steps: list[Callable] = []
        if train and self.augment:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        if train and self.auto_augment:
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
        if self.resize is not None:
            steps.append(v2.Resize(self.resize, antialias=True))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        images, labels = self.load_split(train=True)
        test_images, test_labels = self.load_split(train=False)
        n_train = len(labels) - self.val_size if self.subset is None else self.subset
        if n_train + self.val_size > len(labels):
            raise ValueError(
                f"`subset` ({self.subset}) + `val_size` ({self.val_size}) exceed the {len(labels)} "
                "training images"
            )
        train, val = _split(len(labels), [n_train, self.val_size], self.split_seed)
        self.eval_transform = self.transforms(train=False)
        self.train_set = ImageArrayDataset(images[train], self._training_labels(labels[train]),
                                           self.transforms(train=True))
        if self.eval_subset is not None:
            keep = _split(len(test_labels), [min(self.eval_subset, len(test_labels))], self.split_seed)[0]
            test_images, test_labels = test_images[keep], test_labels[keep]
            val = val[: self.eval_subset]
        self.test_set = ImageArrayDataset(test_images, test_labels, self.transforms(train=False))
        if self.val_size > 0:
            self.val_set = ImageArrayDataset(images[val], labels[val], self.transforms(train=False))
        else:
            self.val_set = self.test_set

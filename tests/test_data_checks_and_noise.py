"""Label noise (exact fraction, never the same class, seeded, evaluation untouched) and the checks
the data modules make when they load a file."""

import numpy as np
import pytest
import torch

from helpers import write_fake_cifar
from lightning_nusam.data import CIFARDataModule, DigitsDataModule, measure_noise_fit, symmetric_label_noise


def test_noise_flips_the_exact_fraction_to_other_classes_uniformly():
    labels = torch.arange(20_000) % 10
    noisy = symmetric_label_noise(labels, 0.4, num_classes=10, seed=3)
    assert int(noisy.flipped.sum()) == 8_000
    assert torch.equal(noisy.flipped, noisy.labels != labels)  # every chosen label changed
    assert torch.equal(noisy.clean, labels)
    # the replacement is uniform over the 9 other classes: offsets 1..9 each ≈ 1/9 of the flips
    offsets = (noisy.labels - labels)[noisy.flipped] % 10
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0
    expected = 8_000 / 9
    assert ((counts[1:] - expected).abs() < 4 * expected**0.5).all(), counts  # ±4σ
    again = symmetric_label_noise(labels, 0.4, num_classes=10, seed=3)
    other = symmetric_label_noise(labels, 0.4, num_classes=10, seed=4)
    assert torch.equal(again.labels, noisy.labels)
    assert not torch.equal(other.flipped, noisy.flipped)


def test_noise_is_independent_of_the_global_rng():
    labels = torch.arange(100) % 5
    torch.manual_seed(0)
    first = symmetric_label_noise(labels, 0.3, 5, seed=1).labels
    torch.manual_seed(123)
    assert torch.equal(symmetric_label_noise(labels, 0.3, 5, seed=1).labels, first)


def test_cifar_datamodule_corrupts_training_labels_only(tmp_path):
    folder = write_fake_cifar(tmp_path, train=200, test=50)
    clean = CIFARDataModule(npz_dir=str(folder), num_workers=0, val_size=40)
    clean.setup("fit")
    noisy = CIFARDataModule(npz_dir=str(folder), num_workers=0, val_size=40, label_noise=0.4,
                            label_noise_seed=7)
    noisy.setup("fit")
    assert clean.noisy_labels is None
    flipped = noisy.noisy_labels.flipped
    assert int(flipped.sum()) == round(0.4 * 160)
    assert torch.equal(noisy.noisy_labels.clean, clean.train_set.labels)
    assert torch.equal(noisy.train_set.labels[~flipped], clean.train_set.labels[~flipped])
    assert (noisy.train_set.labels[flipped] != clean.train_set.labels[flipped]).all()
    assert torch.equal(noisy.val_set.labels, clean.val_set.labels)
    file_labels = torch.from_numpy(np.load(folder / "test.npz")["labels"])
    assert torch.equal(noisy.test_set.labels, file_labels)
    # the training images without augmentation, with the labels trained on
    images, labels = next(iter(noisy.train_eval_dataloader()))
    assert torch.equal(labels, noisy.train_set.labels[: len(labels)])
    assert torch.allclose(images[0], noisy.eval_transform(noisy.train_set.images[0]))


def test_digits_label_noise_and_bad_fraction():
    data = DigitsDataModule(label_noise=0.25, label_noise_seed=1)
    data.setup("fit")
    assert data.noisy_labels.fraction == pytest.approx(round(0.25 * 1257) / 1257)
    for bad in (1.0, -0.1, True, "0.4"):
        with pytest.raises(ValueError, match="`label_noise`"):
            DigitsDataModule(label_noise=bad)


def test_truncated_npz_names_the_file(tmp_path):
    folder = write_fake_cifar(tmp_path / "cifar")
    path = folder / "train.npz"
    path.write_bytes(path.read_bytes()[:1000])
    data = CIFARDataModule(npz_dir=str(folder), num_workers=0)
    with pytest.raises(ValueError, match=f"{path}.*cannot read"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("images", "labels", "problem"),
    [
        (np.zeros((4, 28, 28, 3), np.uint8), np.zeros(4, np.int64), "32, 32, 3"),
        (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int64), "uint8"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 10, 2]), r"labels must be in \[0, 10\)"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, -1, 2, 3]), r"labels must be in \[0, 10\)"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3, np.int64), "one per image"),
    ],
)
def test_bad_npz_contents_are_reported_with_the_file(tmp_path, images, labels, problem):
    np.savez(tmp_path / "train.npz", images=images, labels=labels)
    np.savez(tmp_path / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=problem) as error:
        CIFARDataModule(npz_dir=str(tmp_path), num_workers=0).setup("fit")
    assert str(tmp_path / "train.npz") in str(error.value)


@pytest.mark.parametrize(("kwargs", "argument"), [({"subset": 0}, "subset"), ({"val_size": -1}, "val_size"),
                                                  ({"eval_subset": 0}, "eval_subset"),
                                                  ({"batch_size": 0}, "batch_size"),
                                                  ({"num_workers": -1}, "num_workers")])
def test_bad_cifar_datamodule_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        CIFARDataModule(npz_dir="unused", **kwargs)


class _LookupClassifier(torch.nn.Module):
    """Predicts a fixed class per example index (the inputs are the indices), in eval mode only."""

    def __init__(self, classes: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(classes, num_classes).float())
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        assert not self.training, "the training set must be classified in eval mode"
        return self.logits[indices] * self.scale


@pytest.mark.parametrize("predict", ["noisy", "clean", "half"])
def test_measure_noise_fit_counts_against_a_direct_comparison(predict):
    labels = torch.arange(60) % 6
    noisy = symmetric_label_noise(labels, 0.4, 6, seed=3)
    flipped = noisy.flipped.nonzero().squeeze(1)
    predictions = {"noisy": noisy.labels, "clean": noisy.clean,
                   "half": torch.where(torch.arange(60) % 2 == 0, noisy.labels, noisy.clean)}[predict]
    model = _LookupClassifier(predictions, 6).train()
    loader = [(torch.arange(60)[start:start + 8], None) for start in range(0, 60, 8)]  # in order
    fit = measure_noise_fit(model, loader, noisy)
    assert model.training  # left in the mode it was in
    kept = (~noisy.flipped).nonzero().squeeze(1)
    assert fit.clean == pytest.approx(sum(int(predictions[i] == noisy.labels[i]) for i in kept) / len(kept))
    assert fit.memorised == pytest.approx(
        sum(int(predictions[i] == noisy.labels[i]) for i in flipped) / len(flipped))
    assert fit.true == pytest.approx(sum(int(predictions[i] == labels[i]) for i in flipped) / len(flipped))
    expected = {"noisy": (1.0, 1.0, 0.0), "clean": (1.0, 0.0, 1.0)}.get(predict)
    if expected is not None:
        assert (fit.clean, fit.memorised, fit.true) == expected

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from helpers import load_script
from lightning_nusam.data import CIFAR_STATS, CIFARDataModule, DigitsDataModule
from lightning_nusam.models import ImageClassifier, warmup_cosine_schedule

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


def load_example(name: str):
    return load_script(f"examples/{name}.py")


def test_demo_reaches_90_percent_and_nusam_resists_label_noise(tmp_path, monkeypatch, capsys):
    """The packaged quickstart with νSAM, then AdamW vs νSAM with 40 % wrong training labels:
    the whole pipeline (data, step, callback) must deliver the method's effect."""
    from lightning_nusam.demo import main

    monkeypatch.chdir(tmp_path)
    summary = main(["--trainer.enable_progress_bar=false"])
    assert summary["test_acc1"] >= 0.90
    assert summary["sam_numel"] > 40 * summary["held_numel"] > 0
    assert summary["two_pass_ms"] > 0 and summary["one_pass_ms"] > 0
    assert summary["noise_fraction"] == pytest.approx(0.4, abs=1e-3)
    assert summary["noise_memorised_AdamW"] > 0.5 and summary["noise_memorised_νSAM"] < 0.2
    assert summary["noise_test_acc1_νSAM"] > summary["noise_test_acc1_AdamW"] + 0.1
    run = tmp_path / "runs" / "quickstart" / "version_0"  # one folder per run
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "metrics.csv").is_file() and any(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    noise = tmp_path / "runs" / "quickstart_noise"  # AdamW, then νSAM
    assert (noise / "version_1" / "comparison.png").stat().st_size > 10_000
    assert (noise / "version_0" / "metrics.csv").is_file() and (noise / "version_1" / "metrics.csv").is_file()
    output = capsys.readouterr().out
    assert "test accuracy, AdamW" in output and "wrong labels fit" in output


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"no local CIFAR-10 at {SHARED_CIFAR10}")
def test_cifar10_from_local_npz_has_the_published_statistics():
    data = CIFARDataModule(npz_dir=str(SHARED_CIFAR10), num_workers=0, batch_size=256, augment=False)
    data.setup("fit")
    assert len(data.train_set) == 50_000 and len(data.test_set) == 10_000
    assert data.train_set.images.shape == (50_000, 3, 32, 32)
    assert data.test_set.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    pixels = data.train_set.images.float().div(255)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(CIFAR_STATS["cifar10"][0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.tensor(CIFAR_STATS["cifar10"][1]), atol=1e-4, rtol=0)
    images, _labels = next(iter(data.val_dataloader()))
    assert images.dtype == torch.float32 and images.shape == (256, 3, 32, 32)
    assert abs(float(images.mean())) < 0.1 and abs(float(images.std()) - 1) < 0.1


def test_cifar_subset_split_and_augmentation_are_deterministic(tmp_path):
    generator = np.random.default_rng(0)
    for split, n in (("train", 100), ("test", 40)):
        np.savez(tmp_path / f"{split}.npz", images=generator.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    first = CIFARDataModule(npz_dir=str(tmp_path), subset=30, val_size=20, auto_augment=True,
                            num_workers=0, batch_size=10)
    again = CIFARDataModule(npz_dir=str(tmp_path), subset=30, val_size=20, auto_augment=True,
                            num_workers=0, batch_size=10)
    for data in (first, again):
        data.setup("fit")
    assert len(first.train_set) == 30 and len(first.val_set) == 20 and len(first.test_set) == 40
    assert torch.equal(first.train_set.images, again.train_set.images)
    torch.manual_seed(0)
    a = next(iter(first.train_dataloader()))[0]
    torch.manual_seed(0)
    b = next(iter(again.train_dataloader()))[0]
    assert torch.equal(a, b)
    names = [type(t).__name__ for t in first.transforms(train=True).transforms]
    assert names[:3] == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment"]
    with pytest.raises(ValueError, match="`subset`"):
        CIFARDataModule(npz_dir=str(tmp_path), subset=95, val_size=10).setup("fit")


def test_cifar_torchvision_path_reads_the_python_batches(tmp_path, monkeypatch):
    """The download path for users with internet, exercised on local files in torchvision's format."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": generator.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    data = CIFARDataModule(data_dir=str(tmp_path), download=True, num_workers=0, batch_size=4)
    data.prepare_data()
    data.setup("fit")
    assert len(data.train_set) == 20 and len(data.test_set) == 4
    assert data.train_set.images.shape == (20, 3, 32, 32) and data.train_set.images.dtype == torch.uint8


def test_packaged_digits_are_scikit_learns_bundled_digits():
    datasets = pytest.importorskip("sklearn.datasets")  # the source of the packaged file
    from lightning_nusam.data import load_digits

    reference = datasets.load_digits()
    images, labels = load_digits()
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images.double(), torch.from_numpy(reference.images))
    assert torch.equal(labels, torch.from_numpy(reference.target).long())


def test_digits_split_is_fixed_and_disjoint():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup("fit")
    b.setup("fit")
    assert torch.equal(a.test_set.images, b.test_set.images)
    train = {tuple(x.flatten().tolist()) for x in a.train_set.images}
    test = {tuple(x.flatten().tolist()) for x in a.test_set.images}
    assert len(train & test) < 5  # the digits data has a few exact duplicate images


def test_finetuning_from_a_local_weights_file_reinitialises_the_head(tmp_path):
    imagenet = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
    path = tmp_path / "vit_tiny_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    classifier = ImageClassifier("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4,
                                 model_kwargs={"depth": 2}, pretrained_file=str(path))
    model, saved = classifier.model.state_dict(), imagenet.state_dict()
    for key in saved:
        if not key.startswith("head."):
            assert torch.equal(model[key], saved[key]), key
    assert model["head.weight"].shape == (10, 192)
    assert not torch.equal(model["head.weight"], saved["head.weight"][:10])
    with pytest.raises(FileNotFoundError, match="`pretrained_file`"):
        ImageClassifier("vit_tiny_patch16_224", pretrained_file=str(tmp_path / "missing.pth"))


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 0.1 and lrs[:11] == sorted(lrs[:11]) and lrs[10] == pytest.approx(1.0)
    assert lrs[10:] == sorted(lrs[10:], reverse=True) and lrs[-1] < 0.01


def test_classifier_validates_arguments():
    with pytest.raises(ValueError, match="`warmup_fraction`"):
        ImageClassifier("vit_tiny_patch16_224", warmup_fraction=1.0)
    with pytest.raises(ValueError, match="`model_name`"):
        ImageClassifier("no.such.module.Model")


def test_figure1_quadratic_runs_and_reports_slopes(tmp_path, capsys):
    figure1 = load_example("figure1_quadratic")
    slopes = figure1.main(["--steps", "2000", "--out", str(tmp_path / "f.png")])
    assert set(slopes) == {"GD", "SAM", "νSAM", "GaussSAM"}
    assert slopes["GD"] == pytest.approx(-1.0, abs=0.05)  # Π(1 - 1/(2k)) ~ k^(-1/2): ‖∇f‖² ~ 1/k
    assert slopes["νSAM"] < slopes["GD"] - 0.5
    final = {method: figure1.run(method, 2000, rho=1.0, curvature=0.5)[-1] for method in ("GD", "SAM")}
    assert final["SAM"] < 1e-6 * final["GD"]
    assert (tmp_path / "f.png").is_file() and "fitted slopes" in capsys.readouterr().out


def test_custom_module_example_trains():
    assert load_example("custom_module").main(epochs=2) > 0.8


@pytest.mark.parametrize(("kwargs", "argument"), [({"num_classes": 1}, "num_classes"),
                                                  ({"lr": 0.0}, "lr"),
                                                  ({"weight_decay": -0.1}, "weight_decay"),
                                                  ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
                                                  ({"accumulate_grad_batches": 0},
                                                   "accumulate_grad_batches")])
def test_bad_classifier_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ImageClassifier("timm.models.mlp_mixer.MlpMixer", img_size=8, patch_size=4,
                        model_kwargs={"num_blocks": 1, "embed_dim": 8}, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_classifier_schedule_spans_the_optimizer_steps_of_the_fit(tmp_path, accumulate):
    """configure_optimizers runs before the Trainer has counted the batches: the warm-up/cosine
    schedule must still get the real number of optimizer steps (the mixin's accumulation too)."""
    import lightning as L

    from helpers import write_fake_cifar

    data = CIFARDataModule(npz_dir=str(write_fake_cifar(tmp_path, train=64, test=16)), batch_size=8,
                           num_workers=0)
    model = ImageClassifier("timm.models.mlp_mixer.MlpMixer", img_size=32, patch_size=8,
                            model_kwargs={"num_blocks": 1, "embed_dim": 16}, warmup_fraction=0.25,
                            accumulate_grad_batches=accumulate)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    steps = 2 * 8 // accumulate  # 8 batches per epoch
    assert trainer.global_step == steps
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.last_epoch == steps
    # the cosine ends at min_lr_ratio · lr = 0 exactly at the last planned step
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

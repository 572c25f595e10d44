"""Image classification with any timm model, trained by the two-pass step of SAMMixin."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import timm
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import create_optimizer_v2
from torch import nn

from lightning_nusam.checks import check_count
from lightning_nusam.lightning.mixin import SAMMixin
from lightning_nusam.usage import check_timm_model


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from ~0 to the base LR over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio × base LR`` at ``total_steps`` (the paper's Section 5.1 schedule)."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer,
        T_max=max(1, total_steps - warmup_steps),
        eta_min=min_lr_ratio * optimizer.param_groups[0]["lr"],
    )
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def load_backbone(model: nn.Module, path: Path) -> list[str]:
    """Load a checkpoint file into ``model``, skipping tensors whose shape differs (a head for
    another number of classes), which keep their fresh initialisation; returns their names."""
    state = timm.models.load_state_dict(str(path))
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(skipped):
        raise ValueError(
            f"`pretrained_file` {str(path)!r} does not fit {type(model).__name__}: "
            f"missing {sorted(set(missing) - set(skipped))[:5]}, unexpected {unexpected[:5]}"
        )
    return skipped


def _model_class(name: str) -> type[nn.Module] | None:
    """The class named by a dotted path (``package.module.Class``), or None for a timm name."""
    if "." not in name or timm.is_model(name):
        check_timm_model(name)
        return None
    module_name, _, class_name = name.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`model_name` {name!r} is neither a timm model nor an importable class") from error
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise ValueError(f"`model_name` {name!r} is not an nn.Module class")
    return model_class


class ImageClassifier(SAMMixin, pl.LightningModule):
    """A timm image classifier: cross-entropy, top-1/top-5 accuracy, AdamW + warm-up/cosine.

    Args:
        model_name: any ``timm.create_model`` name, e.g. ``"vit_small_patch16_224"``, or the
            dotted path of a model class built with the same keyword arguments (timm's Mixer
            entry points fix the patch size, so Mixer-S/4 is ``timm.models.mlp_mixer.MlpMixer``
            with ``patch_size=4, num_blocks=8, embed_dim=512``).
        num_classes: classes of the new head.
        img_size, patch_size, in_chans: architecture overrides (``img_size=32, patch_size=4``
            turns ViT-S/16 into the paper's ViT-S/4); ``None`` keeps timm's default.
        model_kwargs: further ``timm.create_model`` keyword arguments (``embed_dim``, ``depth``,
            ``num_heads``, ``num_blocks``, ``drop_rate``, ...).
        pretrained_file: fine-tune from a local checkpoint (``.pth``/``.safetensors``/``.bin``)
            through timm's loader; a head of another size is left freshly initialised.
        label_smoothing: cross-entropy label smoothing.
        lr, weight_decay: AdamW (no decay on biases and normalisation weights, as timm does).
        warmup_fraction: fraction of the optimizer steps of linear warm-up before the cosine.
        min_lr_ratio: final LR as a fraction of ``lr``.
        gradient_clip_val, gradient_clip_algorithm, accumulate_grad_batches: see
            :class:`~lightning_nusam.SAMMixin` (Lightning refuses the Trainer's flags of these
            names under manual optimization).

    LightningCLI's ``optimizer:`` and ``lr_scheduler:`` sections replace the default optimizer.

    Example:
        >>> vit = ImageClassifier("vit_small_patch16_224", num_classes=10, img_size=32, patch_size=4,
        ...                       model_kwargs={"depth": 2})
        >>> mixer = ImageClassifier("timm.models.mlp_mixer.MlpMixer", num_classes=10, img_size=32,
        ...                         patch_size=4, model_kwargs={"num_blocks": 2, "embed_dim": 64})
        >>> vit(torch.randn(2, 3, 32, 32)).shape, mixer(torch.randn(2, 3, 32, 32)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224",
        num_classes: int = 10,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_file: str | None = None,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        accumulate_grad_batches: int = 1,
    ) -> None:
        super().__init__(gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
                         accumulate_grad_batches=accumulate_grad_batches)
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
        check_count("num_classes", num_classes, 2)
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}")
        self.save_hyperparameters()
        self.model = self.create_model()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = torchmetrics.MetricCollection(
            {
                "acc1": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc5": torchmetrics.classification.MulticlassAccuracy(
                    num_classes, top_k=min(5, num_classes), average="micro"
                ),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def create_model(self) -> nn.Module:
        hp = self.hparams
        kwargs: dict[str, Any] = {"num_classes": hp.num_classes, "in_chans": hp.in_chans}
        if hp.img_size is not None:
            kwargs["img_size"] = hp.img_size
        if hp.patch_size is not None:
            kwargs["patch_size"] = hp.patch_size
        kwargs.update(hp.model_kwargs or {})
        model_class = _model_class(hp.model_name)
        path = None if hp.pretrained_file is None else Path(hp.pretrained_file).expanduser()
        if path is not None and not path.is_file():
            raise FileNotFoundError(
                f"`pretrained_file` {str(path)!r} does not exist; download the ImageNet weights of "
                f"{hp.model_name} (e.g. with timm on a machine with internet) and point to the file"
            )
        if model_class is not None:
            model = model_class(**kwargs)
            if path is not None:
                load_backbone(model, path)
            return model
        if path is None:
            return timm.create_model(hp.model_name, pretrained=False, **kwargs)
        # timm's loader adapts the checkpoint (position embeddings, input channels) and drops a
        # classifier of another size, leaving the new head freshly initialised.
        return timm.create_model(
            hp.model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` shard the model with FSDP2: each block, then the rest.

        Parameters become row-sharded DTensors; the perturbations then work on each rank's rows
        and all-reduce only vectors (see ``lightning_nusam.perturbations.sharding``).
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in getattr(self.model, "blocks", []):
            fully_shard(block, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_loss(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": self.criterion(logits, labels), "acc1": accuracy}

    def _evaluate(self, batch: Any, metrics: torchmetrics.MetricCollection, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        metrics.update(logits, labels)
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        """``val/score``: the task's main metric (top-1 accuracy here), which the method configs'
        ModelCheckpoint monitors for image and text models alike."""
        value = self.trainer.callback_metrics.get("val/acc1")
        if value is not None:
            self.log("val/score", value)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).softmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer_v2(self.model, "adamw", lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.estimated_optimizer_steps  # counts optimizer steps under the mixin's accumulation
        if not math.isfinite(total):
            rank_zero_warn(
                "ImageClassifier: the number of optimizer steps is unknown (an IterableDataset without "
                "max_steps, or max_time only), so AdamW runs at a constant learning rate without the "
                "warm-up and cosine schedule; set Trainer(max_steps=...) to get them"
            )
            return {"optimizer": optimizer}
        scheduler = warmup_cosine_schedule(
            optimizer, int(total), int(hp.warmup_fraction * total), hp.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""Sequence classification with any Hugging Face ``AutoModelForSequenceClassification``.

Install the ``text`` extra (``pip install "lightning-nusam[text]"``: transformers, tokenizers).
The model comes from a local ``save_pretrained`` directory (fine-tuning, as the paper's GLUE
experiments with BERT-base) or from a config (random initialisation); nothing is downloaded.

What νSAM perturbs in BERT by default: the weight matrices of the linear layers, i.e. per
encoder layer the query, key, value and attention-output projections and the two feed-forward
matrices, plus the pooler and the classifier (74 matrices for BERT-base). Not perturbed: the
word, position and token-type embeddings (lookup tables, not linear maps; the paper perturbs
the layers' weight matrices, Algorithm 1, and leaves the ViT's position embedding alone), the
LayerNorm parameters and the biases (not matrices). A model whose output projection is tied to
the input embedding has that matrix perturbed once, as the output layer's weight.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_nusam.checks import check_count
from lightning_nusam.data.text import GLUE_TASKS
from lightning_nusam.lightning.mixin import SAMMixin
from lightning_nusam.models.classifier import warmup_cosine_schedule

Metric = Literal["accuracy", "mcc", "f1", "pearson"]


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then linear decay to 0 at
    ``total_steps`` (the usual schedule of BERT fine-tuning)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TextClassifier(SAMMixin, pl.LightningModule):
    """A Hugging Face sequence classifier trained by the sharpness-aware step.

    Args:
        model_name_or_path: a local directory written by ``save_pretrained`` (e.g. BERT-base
            saved on a machine with internet); its classification head is re-initialised when
            ``num_labels`` differs.
        config: instead, a config to initialise randomly: a dict with ``model_type`` and any
            of its fields (``{"model_type": "bert", "num_hidden_layers": 2, ...}``), or the path
            of a ``config.json`` (or its directory).
        task: a GLUE task name (``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``,
            ``qnli``, ``rte``): sets ``num_labels`` and ``metric``.
        num_labels: classes, or 1 for regression (STS-B).
        metric: the main validation metric, logged as ``val/score`` besides its own name:
            ``accuracy`` (``val/acc1``), ``mcc`` (Matthews correlation, CoLA), ``f1`` (MRPC, QQP)
            or ``pearson`` (with ``val/spearman``; regression).
        lr, weight_decay: AdamW (no decay on biases and LayerNorm weights).
        warmup_fraction: fraction of the optimizer steps of linear warm-up.
        schedule: ``"linear"`` decay to 0 (the usual) or ``"cosine"`` (the paper's Table 12).
        gradient_clip_val, gradient_clip_algorithm, accumulate_grad_batches: see
            :class:`~lightning_nusam.SAMMixin`.

    Example (random initialisation, no files)::

        TextClassifier(config={"model_type": "bert", "vocab_size": 100, "hidden_size": 32,
                               "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64}, num_labels=2)
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | str | None = None,
        task: str | None = None,
        num_labels: int | None = None,
        metric: Metric | None = None,
        lr: float = 4e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        schedule: Literal["linear", "cosine"] = "linear",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        accumulate_grad_batches: int = 1,
    ) -> None:
        super().__init__(gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
                         accumulate_grad_batches=accumulate_grad_batches)
        if (model_name_or_path is None) == (config is None):
            raise ValueError("pass exactly one of `model_name_or_path` (a save_pretrained directory) and "
                             "`config` (random initialisation)")
        if task is not None and task not in GLUE_TASKS:
            raise ValueError(f"`task` must be one of {sorted(GLUE_TASKS)} or None, got {task!r}")
        glue = GLUE_TASKS[task] if task else None
        num_labels = num_labels if num_labels is not None else (glue.num_labels if glue else 2)
        metric = metric or (glue.metric if glue else ("pearson" if num_labels == 1 else "accuracy"))
        check_count("num_labels", num_labels, 1)
        if metric not in ("accuracy", "mcc", "f1", "pearson"):
            raise ValueError(f"`metric` must be 'accuracy', 'mcc', 'f1' or 'pearson', got {metric!r}")
        if (metric == "pearson") != (num_labels == 1):
            raise ValueError(f"`metric={metric!r}` and `num_labels={num_labels}` disagree: regression "
                             "(num_labels=1) is scored by 'pearson', classification by the others")
        if metric == "f1" and num_labels != 2:
            raise ValueError(f"`metric='f1'` scores binary tasks; got num_labels={num_labels}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction!r}")
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"`schedule` must be 'linear' or 'cosine', got {schedule!r}")
        self.save_hyperparameters()
        self.num_labels, self.metric = num_labels, metric
        self.model = self.create_model()
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")

    def create_model(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        hp = self.hparams
        if hp.model_name_or_path is not None:
            path = Path(hp.model_name_or_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"`model_name_or_path`: {path} is not a local directory. On a machine with internet: "
                    "AutoModelForSequenceClassification.from_pretrained('bert-base-uncased')"
                    f".save_pretrained('{path}') (and the same for AutoTokenizer), then copy it here"
                )
            return AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=self.num_labels, local_files_only=True, ignore_mismatched_sizes=True)
        if isinstance(hp.config, dict):
            fields = dict(hp.config)
            if "model_type" not in fields:
                raise ValueError("`config` as a dict needs its `model_type` (e.g. 'bert')")
            model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        else:
            path = str(Path(hp.config).expanduser())
            model_config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_config.num_labels = self.num_labels
        return AutoModelForSequenceClassification.from_config(model_config)

    def _metrics(self, prefix: str) -> torchmetrics.MetricCollection:
        if self.metric == "pearson":
            metrics: dict[str, torchmetrics.Metric] = {"pearson": torchmetrics.PearsonCorrCoef(),
                                                        "spearman": torchmetrics.SpearmanCorrCoef()}
        else:
            classes = max(self.num_labels, 2)
            metrics = {"acc1": torchmetrics.classification.MulticlassAccuracy(classes, average="micro")}
            if self.metric == "mcc":
                metrics["mcc"] = torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=classes)
            if self.metric == "f1":
                metrics["f1"] = torchmetrics.classification.BinaryF1Score()
        return torchmetrics.MetricCollection(metrics, prefix=prefix)

    # ----------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = self.model(**inputs).logits
        return logits.squeeze(-1) if self.num_labels == 1 else logits

    def _loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return nn.functional.mse_loss(outputs.float(), labels.float())
        return nn.functional.cross_entropy(outputs.float(), labels)

    def compute_loss(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = self(batch)
        result = {"loss": self._loss(outputs, batch["labels"])}
        if self.num_labels > 1:
            result["acc1"] = (outputs.detach().argmax(-1) == batch["labels"]).float().mean()
        return result

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: torchmetrics.MetricCollection,
                  stage: str) -> None:
        outputs = self(batch)
        labels = batch["labels"]
        self.log(f"{stage}/loss", self._loss(outputs, labels), sync_dist=True)
        predictions = outputs.float() if self.num_labels == 1 else outputs.argmax(-1)
        metrics.update(predictions, labels)
        self.log_dict(metrics, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        main = {"accuracy": "acc1", "mcc": "mcc", "f1": "f1", "pearson": "pearson"}[self.metric]
        value = self.trainer.callback_metrics.get(f"val/{main}")
        if value is not None:
            self.log("val/score", value)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        return outputs if self.num_labels == 1 else outputs.softmax(-1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.requires_grad:
                    continue
                plain = name == "bias" or isinstance(module, nn.LayerNorm)
                (no_decay if plain else decay).append(parameter)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        total = self.estimated_optimizer_steps
        if not math.isfinite(total):
            rank_zero_warn("TextClassifier: the number of optimizer steps is unknown, so AdamW runs at a "
                           "constant learning rate without warm-up and decay; set Trainer(max_steps=...)")
            return {"optimizer": optimizer}
        warmup = int(hp.warmup_fraction * total)
        scheduler = (warmup_linear_schedule(optimizer, int(total), warmup) if hp.schedule == "linear"
                     else warmup_cosine_schedule(optimizer, int(total), warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

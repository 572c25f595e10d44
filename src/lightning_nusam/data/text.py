"""Text classification from local files: CSV/TSV, JSON lines, and GLUE's own TSV layout.

No download at run time. The texts are tokenized once (a Hugging Face tokenizer saved in a
local directory) and cached next to the data, keyed by the file, the tokenizer and the
settings; batches are padded dynamically to their longest sequence.

To get GLUE and a pretrained BERT onto a machine without internet, on a machine with it::

    python -c "from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; \\
               M.from_pretrained('bert-base-uncased').save_pretrained('models/bert-base-uncased'); \\
               T.from_pretrained('bert-base-uncased').save_pretrained('models/bert-base-uncased')"
    # GLUE: the per-task folders (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/) with their
    # train.tsv and dev.tsv (dev_matched.tsv for MNLI), e.g. from https://gluebenchmark.com/tasks

then copy ``models/`` and the task folders (as ``data/glue/<TASK>``) to the training machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_nusam.checks import check_count
from lightning_nusam.data.resumable import ResumableDataLoader


@dataclass(frozen=True)
class GlueTask:
    """How a GLUE task's TSV files are laid out and scored.

    Attributes:
        folder: the task's folder name in the GLUE download.
        text_columns: one column (single sentence) or two (a pair).
        label_column: the label's column (a name, or an index for header-less files).
        labels: the label strings in class order; ``()`` for integer labels, ``None`` for
            regression (STS-B).
        header: whether the files start with a header row.
        metric: the task's main metric: ``accuracy``, ``mcc`` (Matthews correlation), ``f1``
            or ``pearson``.
        val_file: the development split's file name.
    """

    folder: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    labels: tuple[str, ...] | None
    header: bool = True
    metric: str = "accuracy"
    val_file: str = "dev.tsv"

    @property
    def num_labels(self) -> int:
        if self.labels is None:
            return 1
        return len(self.labels) if self.labels else 2


#: The GLUE tasks (all but WNLI, which is usually left out) as the official download lays them out.
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", (3,), 1, (), header=False, metric="mcc"),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ()),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", (), metric="f1"),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, metric="pearson"),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", (), metric="f1"),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("contradiction", "entailment", "neutral"), val_file="dev_matched.tsv"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
}


def read_records(path: Path, has_header: bool = True) -> list[dict[str, Any]] | list[list[str]]:
    """The rows of a CSV/TSV (by extension) or JSON-lines file; header-less files give lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        # GLUE's TSVs contain quote characters inside sentences: read them verbatim
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        if has_header:
            return list(csv.DictReader(handle, delimiter=delimiter, quoting=quoting))
        return list(csv.reader(handle, delimiter=delimiter, quoting=quoting))


class TokenizedDataset(Dataset):
    """Token ids (and segment ids) per example with its label; items are dicts of tensors."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: torch.Tensor) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {key: torch.tensor(values[index]) for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


class DynamicPadding:
    """Collate a list of items into a batch padded to its longest sequence."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {}
        for key in items[0]:
            if key == "labels":
                batch[key] = torch.stack([item[key] for item in items])
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.stack([torch.nn.functional.pad(item[key], (0, length - len(item[key])),
                                                              value=fill) for item in items])
        batch["attention_mask"] = torch.stack([
            torch.nn.functional.pad(torch.ones(len(item["input_ids"]), dtype=torch.long),
                                    (0, length - len(item["input_ids"]))) for item in items])
        return batch


class TextClassificationDataModule(pl.LightningDataModule):
    """Sentence (or sentence-pair) classification and regression from local files.

    Args:
        tokenizer: a local directory with a saved Hugging Face tokenizer (``save_pretrained``),
            usually the model's own directory.
        task: a GLUE task (``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ``qnli``,
            ``rte``): its folder layout, columns and labels are known. With ``data_dir`` the
            files are ``<data_dir>/train.tsv`` and the task's development file.
        data_dir: the folder of a GLUE task (e.g. ``data/glue/SST-2``).
        train_file, val_file, test_file: explicit files instead (``.csv``, ``.tsv``, ``.jsonl``);
            ``test_file`` needs labels too.
        text_columns: the text column(s) of explicit files (one, or two for pairs).
        label_column: their label column.
        labels: label strings in class order (omit for integer labels; ``num_labels`` then
            counts them); set ``regression=True`` for a float target.
        regression: the target is a number (one output).
        max_length: truncation length in tokens.
        batch_size, eval_batch_size, num_workers, seed: loader settings (the training order is
            resumable, as for the image data).
        cache_dir: where the tokenized splits are cached (default: ``.cache/`` beside the data).

    Example:
        ``TextClassificationDataModule(tokenizer="models/bert-base-uncased", task="sst2",
        data_dir="data/glue/SST-2")``
    """

    def __init__(
        self,
        tokenizer: str,
        task: str | None = None,
        data_dir: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_columns: Sequence[str] | str = ("text",),
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        regression: bool = False,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task is not None and task not in GLUE_TASKS:
            raise ValueError(f"`task` must be one of {sorted(GLUE_TASKS)} or None, got {task!r}")
        if task is not None and data_dir is None and train_file is None:
            raise ValueError(f"`task={task!r}` needs `data_dir` (the task's GLUE folder) or explicit files")
        if task is None and train_file is None:
            raise ValueError("pass `task` with `data_dir` (a GLUE task), or `train_file` with `text_columns` "
                             "and `label_column`")
        check_count("max_length", max_length, 8)
        check_count("batch_size", batch_size, 1)
        self.tokenizer_path = tokenizer
        self.task = task
        self.glue = GLUE_TASKS[task] if task is not None else None
        directory = Path(data_dir) if data_dir is not None else None
        self.files: dict[str, Path | None] = {
            "train": Path(train_file) if train_file else (directory / "train.tsv" if directory else None),
            "val": Path(val_file) if val_file else (directory / self.glue.val_file
                                                     if directory and self.glue else None),
            "test": Path(test_file) if test_file else None,
        }
        if self.glue is not None:
            self.text_columns: tuple[str | int, ...] = self.glue.text_columns
            self.label_column: str | int = self.glue.label_column
            self.labels = self.glue.labels
            self.header = self.glue.header
        else:
            self.text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
            self.label_column, self.header = label_column, True
            self.labels = None if regression else (tuple(labels) if labels else ())
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"`text_columns` must name one column or two (a pair), got {self.text_columns}")
        self.max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.datasets: dict[str, TokenizedDataset] = {}
        self._tokenizer: Any = None

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier (1 for regression); known after ``setup`` for integer labels."""
        if self.labels is None:
            return 1
        if self.labels:
            return len(self.labels)
        if "train" in self.datasets:
            return int(self.datasets["train"].labels.max()) + 1
        return 2

    @property
    def metric(self) -> str:
        return self.glue.metric if self.glue else ("pearson" if self.regression else "accuracy")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = Path(self.tokenizer_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"`tokenizer`: {path} is not a local directory. Save the tokenizer there on a machine "
                    "with internet (AutoTokenizer.from_pretrained(name).save_pretrained(path)); see the "
                    "docstring of lightning_nusam.data.text"
                )
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return self._tokenizer

    # ----------------------------------------------------------------------------- loading
    def _label(self, value: Any, path: Path, row: int) -> float | int:
        if self.labels is None:
            return float(value)
        if self.labels:
            if value not in self.labels:
                raise ValueError(f"{path}, row {row}: label {value!r} is not one of {list(self.labels)}")
            return self.labels.index(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}, row {row}: label {value!r} is not an integer; pass `labels` "
                             "with the label strings in class order") from None

    def _examples(self, path: Path) -> tuple[list[tuple[str, ...]], list[float | int]]:
        records = read_records(path, self.header)
        texts, targets = [], []
        for row, record in enumerate(records):
            try:
                text = tuple(str(record[column]) for column in self.text_columns)  # type: ignore[index]
                label = record[self.label_column]  # type: ignore[index]
            except (KeyError, IndexError):
                available = list(record) if isinstance(record, dict) else f"{len(record)} columns"
                raise ValueError(f"{path}, row {row}: needs columns {list(self.text_columns)} and "
                                 f"{self.label_column!r}; it has {available}") from None
            texts.append(text)
            targets.append(self._label(label, path, row))
        if not texts:
            raise ValueError(f"{path} has no examples")
        return texts, targets

    def _cache_path(self, path: Path) -> Path:
        stat = path.stat()
        vocabulary = json.dumps(sorted(self.tokenizer.get_vocab().items())[:50]) + str(len(self.tokenizer))
        key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, vocabulary, self.max_length,
                          list(map(str, self.text_columns)), str(self.label_column), self.labels])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = self.cache_dir or path.parent / ".cache"
        return folder / f"{path.stem}-{digest}.pt"

    def _tokenized(self, path: Path) -> TokenizedDataset:
        cache = self._cache_path(path)
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            return TokenizedDataset(saved["encodings"], saved["labels"])
        texts, targets = self._examples(path)
        columns = list(zip(*texts, strict=True))
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length)
        encodings = {key: list(encoded[key]) for key in ("input_ids", "token_type_ids") if key in encoded}
        dtype = torch.float32 if self.regression else torch.int64
        labels = torch.tensor(targets, dtype=dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"encodings": encodings, "labels": labels}, cache)
        return TokenizedDataset(encodings, labels)

    def setup(self, stage: str | None = None) -> None:
        for split, path in self.files.items():
            if path is not None and split not in self.datasets:
                self.datasets[split] = self._tokenized(path)
        if "val" not in self.datasets:
            raise ValueError("no validation data: pass `val_file` (or `data_dir` with a GLUE `task`)")

    # ----------------------------------------------------------------------------- loaders
    def _collate(self) -> DynamicPadding:
        return DynamicPadding(self.tokenizer.pad_token_id or 0)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self._collate(), num_workers=self.num_workers,
                                   drop_last=len(dataset) > self.batch_size)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collate(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if "test" in self.datasets else "val")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

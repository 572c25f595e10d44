"""Language models offline: a tiny randomly initialised BERT (vocabulary built from the test data),
GLUE-layout files for every task, the GLUE configs through the CLI, a user-style module with the
drop-in callback, the save_pretrained round trip, caching and dynamic padding."""

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from helpers import TINY_BERT, save_tiny_bert, trainer, write_glue
from lightning_nusam import SAM, NuSAM
from lightning_nusam.cli import cli_main
from lightning_nusam.data import GLUE_TASKS, TextClassificationDataModule
from lightning_nusam.memory import transformers_memory_report
from lightning_nusam.models import TextClassifier

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def tiny_model(directory: Path) -> list[str]:
    return [f"--model.init_args.model_name_or_path={directory}", f"--data.init_args.tokenizer={directory}"]


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_glue_config_trains_through_the_cli(task, glue, tiny_bert, tmp_path):
    folder = GLUE_TASKS[task].folder
    cli = cli_main(["-c", str(CONFIGS / "glue" / f"{task}.yaml"), "--trainer.fast_dev_run=3",
                    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
                    f"--trainer.default_root_dir={tmp_path}", *tiny_model(tiny_bert),
                    f"--data.init_args.data_dir={glue / folder}", "--data.init_args.batch_size=4",
                    f"--data.init_args.cache_dir={tmp_path / 'cache'}"], run=False)
    sam = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NuSAM))
    sam.schedule = dataclasses.replace(sam.schedule, start_fraction=None)  # perturb from the first step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 and sam.perturbation.steps == 3
    assert cli.model.num_labels == GLUE_TASKS[task].num_labels
    assert "val/score" in cli.trainer.callback_metrics


def test_glue_configs_compose_with_the_method_files(glue, tiny_bert, tmp_path):
    cli = cli_main(["-c", str(CONFIGS / "glue" / "rte.yaml"), "-c", str(CONFIGS / "methods" / "sam.yaml"),
                    "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                    f"--trainer.default_root_dir={tmp_path}", *tiny_model(tiny_bert),
                    f"--data.init_args.data_dir={glue / 'RTE'}", "--data.init_args.batch_size=4"], run=False)
    assert [type(cb).__name__ for cb in cli.trainer.callbacks if "SAM" in type(cb).__name__] == ["SAM"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


class UserTextModule(L.LightningModule):
    """What a Hugging Face user writes: their own module, automatic optimization, no mixin."""

    def __init__(self, config: dict):
        super().__init__()
        fields = {k: v for k, v in config.items() if k != "model_type"}
        model_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
        torch.manual_seed(0)
        self.model = transformers.AutoModelForSequenceClassification.from_config(model_config)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def expected_nusam_matrices(model: nn.Module) -> dict[str, torch.Size]:
    """Independently: the weights of nn.Linear layers (attention, feed-forward, pooler, classifier)."""
    return {f"{name}.weight": module.weight.shape for name, module in model.named_modules()
            if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("callback_cls", [NuSAM, SAM])
def test_a_user_style_module_with_the_dropin_callback(callback_cls, glue, tiny_bert, tmp_path):
    data = TextClassificationDataModule(tokenizer=str(tiny_bert), task="sst2",
                                        data_dir=str(glue / "SST-2"), batch_size=4, cache_dir=str(tmp_path))
    module = UserTextModule({**TINY_BERT, "vocab_size": len(data.tokenizer)})
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    sam = callback_cls(rho=0.05)
    trainer(max_steps=4, callbacks=[sam]).fit(module, datamodule=data)
    assert sam.perturbation.steps == 4
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())
    if callback_cls is NuSAM:
        expected = expected_nusam_matrices(module)
        assert set(sam.perturbation.parameter_names) == set(expected)
        assert not any("embeddings" in n or "LayerNorm" in n for n in sam.perturbation.parameter_names)
        assert sam.perturbation.held_numel() == sum(shape[0] + shape[1] for shape in expected.values())
    else:
        assert sam.perturbation.held_numel() == sum(p.numel() for p in module.parameters())


def test_save_pretrained_round_trip_as_the_pretrained_weights(tiny_bert):
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_bert))
    loaded = TextClassifier(model_name_or_path=str(tiny_bert), task="sst2")
    for (name, a), (_, b) in zip(saved.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    three_way = TextClassifier(model_name_or_path=str(tiny_bert), task="mnli")  # a new 3-class head
    assert three_way.model.classifier.weight.shape[0] == 3
    assert torch.equal(three_way.model.bert.encoder.layer[0].attention.self.query.weight,
                       saved.bert.encoder.layer[0].attention.self.query.weight)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        TextClassifier(model_name_or_path="models/not-here")


def test_tokenized_once_then_cached_and_padded_per_batch(glue, tiny_bert, tmp_path):
    options = dict(tokenizer=str(tiny_bert), task="rte", data_dir=str(glue / "RTE"), batch_size=5,
                   cache_dir=str(tmp_path))
    first = TextClassificationDataModule(**options)
    first.setup("fit")
    cached = sorted(tmp_path.glob("*.pt"))
    assert len(cached) == 2  # train and dev
    second = TextClassificationDataModule(**options)
    second.setup("fit")  # read back from the cache
    assert sorted(tmp_path.glob("*.pt")) == cached
    assert torch.equal(first.datasets["train"].labels, second.datasets["train"].labels)
    assert first.datasets["train"].encodings == second.datasets["train"].encodings
    batch = next(iter(first.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())  # padded to the longest, no further
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert int(batch["token_type_ids"].max()) == 1  # sentence pairs
    pad = first.tokenizer.pad_token_id
    rows = zip(batch["input_ids"], lengths.tolist(), strict=True)
    assert all(int((row[n:] != pad).sum()) == 0 for row, n in rows)


def test_text_files_and_their_problems(tmp_path, tiny_bert):
    (tmp_path / "train.csv").write_text("text,label\nthe good film,1\nan awful plot,0\nfun,1\n")
    (tmp_path / "val.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    files = {"val_file": str(tmp_path / "val.jsonl"), "cache_dir": str(tmp_path / "c")}
    data = TextClassificationDataModule(tokenizer=str(tiny_bert), train_file=str(tmp_path / "train.csv"),
                                        **files)
    data.setup("fit")
    assert data.num_labels == 2 and len(data.datasets["train"]) == 3
    (tmp_path / "bad.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError, match=r"bad.csv, row 0: needs columns \['text'\]"):
        TextClassificationDataModule(tokenizer=str(tiny_bert), train_file=str(tmp_path / "bad.csv"),
                                     **files).setup()
    (tmp_path / "words.csv").write_text("text,label\nx,yes\n")
    with pytest.raises(ValueError, match="not an integer; pass `labels`"):
        TextClassificationDataModule(tokenizer=str(tiny_bert), train_file=str(tmp_path / "words.csv"),
                                     **files).setup()
    with pytest.raises(ValueError, match="`task`"):
        TextClassificationDataModule(tokenizer=str(tiny_bert), task="wnli", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="`tokenizer`"):
        TextClassificationDataModule(tokenizer=str(tmp_path / "none"), train_file=str(tmp_path / "train.csv"),
                                     val_file=str(tmp_path / "val.jsonl")).setup()


def test_bert_base_memory_report_counts_74_matrices():
    report = transformers_memory_report("bert")
    per_layer = 4 * (768 + 768) + (3072 + 768) + (768 + 3072)  # q, k, v, attention output; two FFN
    assert report.perturbed_matrices == 12 * 6 + 2  # + pooler and classifier
    assert report.nusam_perturbation == 12 * per_layer + (768 + 768) + (2 + 768) == 168_194
    assert report.parameters == 109_483_778


def test_text_classifier_learns_the_sentiment_word(glue, tiny_bert, tmp_path):
    data = TextClassificationDataModule(tokenizer=str(tiny_bert), task="sst2",
                                        data_dir=str(glue / "SST-2"), batch_size=4, cache_dir=str(tmp_path))
    model = TextClassifier(config={**TINY_BERT, "vocab_size": 40}, task="sst2", lr=3e-3)
    run = trainer(max_epochs=12, callbacks=[NuSAM(rho=0.02, start_fraction=0.1)])
    run.fit(model, datamodule=data)
    assert float(run.callback_metrics["train/loss_epoch"]) < 0.5  # ln 2 = 0.69 at chance

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytorch_example_trains_with_nusam():
    spec = importlib.util.spec_from_file_location("plain_pytorch", ROOT / "examples" / "plain_pytorch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    train_accuracy, test_accuracy = example.train(epochs=4)
    assert test_accuracy > 0.85 and train_accuracy > 0.85


def test_readme_plain_pytorch_loop_runs_and_restores_the_weights():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Plain PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    nusam, model = namespace["nusam"], namespace["model"]
    assert nusam.steps == 10 and not nusam.is_perturbed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_readme_lightning_example_trains():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## PyTorch Lightning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    lightning, classifier = namespace["L"], namespace["Classifier"]()
    assert namespace["trainer"].callbacks[0].rho == 0.1
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    trainer = lightning.Trainer(max_steps=3, callbacks=[namespace["NuSAM"](rho=0.1)], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(classifier, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 3
    assert trainer.callback_metrics["sam/active_step"] == 1.0

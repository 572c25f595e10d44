import re
from pathlib import Path

import torch

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytorch_example_trains_with_nusam():
    example = load_script("examples/plain_pytorch.py")
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


def lightning_section_code() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## PyTorch Lightning", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_dropin_example_trains_an_unmodified_module():
    namespace: dict = {}
    exec(compile(lightning_section_code()[0], "README.md", "exec"), namespace)
    lightning, classifier = namespace["L"], namespace["Classifier"]()
    assert namespace["trainer"].callbacks[0].rho == 0.1
    assert namespace["trainer"].accumulate_grad_batches == 4
    assert not hasattr(classifier, "compute_loss")  # an ordinary module
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    trainer = lightning.Trainer(max_steps=3, callbacks=[namespace["NuSAM"](rho=0.1)], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=1.0)
    trainer.fit(classifier, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 3
    assert trainer.callback_metrics["sam/active_step"] == 1.0


def test_readme_mixin_example_trains():
    first, mixin = lightning_section_code()[:2]
    namespace: dict = {}
    exec(compile(first, "README.md", "exec"), namespace)
    exec(compile(mixin, "README.md", "exec"), namespace)
    classifier = namespace["Classifier"]()
    assert classifier.accumulate_grad_batches == 4 and classifier.gradient_clip_val == 1.0
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    trainer = namespace["L"].Trainer(max_steps=2, callbacks=[namespace["NuSAM"](rho=0.1)], logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(classifier, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 2 and classifier.sam_pass is None


def test_dropin_example_trains_on_the_digits():
    example = load_script("examples/dropin.py")
    assert example.main(epochs=4) > 0.85


def test_readme_manual_optimization_example_with_sam_optimizer_trains():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("In Lightning with\nmanual optimization:", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    import lightning as L
    from torch import nn

    from lightning_nusam.optim import SAMOptimizer
    from lightning_nusam.perturbations import NuclearPerturbation

    namespace = {"L": L, "nn": nn, "torch": torch, "SAMOptimizer": SAMOptimizer,
                 "NuclearPerturbation": NuclearPerturbation}
    exec(compile(code, "README.md", "exec"), namespace)
    module = namespace["Model"]()
    data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 3
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, SAMOptimizer) and optimizer.perturbation.steps == 3
    assert any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))

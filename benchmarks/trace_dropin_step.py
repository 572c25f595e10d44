"""Trace one drop-in step: the route through the package and its adapter ↔ engine crossings.

Runs a small LightningModule (automatic optimization) with ``NuSAM`` for two optimizer steps
(accumulating ``--accumulate`` micro-batches) and records, with ``sys.setprofile``, every call
between package functions during the second step: which functions run, in order, and how many
times control passes from the Lightning adapter (the callback, the drop-in driver) into the
engine and back. A "crossing" is a call whose caller and callee lie on different sides.

    python benchmarks/trace_dropin_step.py [--accumulate 1] [--route]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import lightning_nusam
from lightning_nusam import NuSAM

PACKAGE = Path(lightning_nusam.__file__).resolve().parent
ADAPTER = ("callbacks.py", "module.py", "lightning/")  # the Lightning layer, before and after 0.4.0
ENGINE = ("engine.py", "plan.py", "step_options.py")  # the step layer (StepPlan lived in engine.py)


def side(filename: str) -> str | None:
    path = Path(filename).resolve()
    if PACKAGE not in path.parents:
        return None
    relative = path.relative_to(PACKAGE).as_posix()
    if relative.startswith(ENGINE):
        return "engine"
    if relative.startswith(ADAPTER):
        return "adapter"
    return "other"


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(pl.Callback):
    """Starts the trace at the first micro-batch of the second step, stops after its last."""

    def __init__(self, accumulate: int, start: bool) -> None:
        self.accumulate, self.start = accumulate, start
        self.calls: list[tuple[str, str, str, str]] = []  # (caller side, callee side, callee, file)

    def profile(self, frame, event, arg) -> None:
        if event != "call":
            return
        callee = side(frame.f_code.co_filename)
        if callee is None:
            return
        caller_frame = frame.f_back  # a call from Lightning or torch code (a hook) counts as theirs
        caller = side(caller_frame.f_code.co_filename) if caller_frame is not None else None
        where = Path(frame.f_code.co_filename).resolve().relative_to(PACKAGE).as_posix()
        self.calls.append((caller or "lightning", callee, frame.f_code.co_qualname, where))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start and batch_idx == self.accumulate:
            sys.setprofile(self.profile)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.start and batch_idx == 2 * self.accumulate - 1:
            sys.setprofile(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--route", action="store_true", help="print every package function called")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    start, stop = Recorder(args.accumulate, True), Recorder(args.accumulate, False)
    stop.calls = start.calls  # one list
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=args.accumulate, logger=False,
                         callbacks=[start, NuSAM(rho=0.1), stop], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    calls = start.calls
    into_engine = [c for c in calls if c[0] == "adapter" and c[1] == "engine"]
    into_adapter = [c for c in calls if c[0] == "engine" and c[1] == "adapter"]
    files = sorted({c[3] for c in calls})
    functions = {(c[3], c[2]) for c in calls}
    print(f"lightning_nusam {lightning_nusam.__version__}, accumulate_grad_batches={args.accumulate}")
    print(f"adapter -> engine calls: {len(into_engine)}")
    for _, _, name, where in into_engine:
        print(f"    {where}:{name}")
    print(f"engine -> adapter calls: {len(into_adapter)}")
    for _, _, name, where in into_adapter:
        print(f"    {where}:{name}")
    print(f"package files: {len(files)} ({', '.join(files)}); functions: {len(functions)}")
    if args.route:
        for caller, callee, name, where in calls:
            if callee in ("adapter", "engine") and (caller != callee):
                print(f"{caller:>9} -> {where}:{name}")


if __name__ == "__main__":
    main()

"""The CUDA tier: what only a GPU can show. Every test here skips without CUDA (CI has none);
``make gpu-check`` runs this file on a GPU machine together with the step benchmark.

- bf16 weights (``bf16-true``) come back bit-identical after many perturb/restore cycles;
- under ``precision="16-mixed"`` an overflowing step is skipped by the GradScaler, its weights
  unchanged, and the perturbation counts the skip;
- both passes of a step draw the same dropout masks from the CUDA generator (``rho=0`` equals
  the run without the callback, bit for bit);
- the peak CUDA memory of a νSAM step is AdamW's plus its vectors, SAM's is νSAM's plus a copy
  of the perturbed weights;
- perturb() and restore() do not synchronise with the host (``torch.cuda.set_sync_debug_mode``);
- the drop-in trains a ``torch.compile``-d model as it trains the eager one;
- νSAM's compiled path (``execution="compiled"``: Triton programs) gives the looped reference's
  ε, restores bf16 weights bit-exactly, does not recompile for a new ρ and does not synchronise.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    TinyViTLike,
    classification_data,
    loader,
    make_batch,
    make_net,
    max_weight_difference,
    trainer,
)
from lightning_nusam import NuSAM
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
    Perturbation,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA tier needs a CUDA device (run `make gpu-check` on one)")

CUDA = torch.device("cuda")
MiB = 2**20


def gpu_trainer(**kwargs):
    """helpers.trainer on the first GPU."""
    return trainer(accelerator="gpu", devices=1, **kwargs)


def cuda_first_pass(model: nn.Module, seed: int, autocast: bool = False) -> None:
    """Clear the gradients, forward (under bf16 autocast if asked) and backward on a fixed batch on
    the GPU (TinyViTLike input)."""
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    images, labels = make_batch(seed, dtype=dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(images.to(CUDA)).float(), labels.to(CUDA))
    loss.backward()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# 1. exact restore of bf16 weights ------------------------------------------------------------------
EXACT = {
    "nusam": lambda model: NuclearPerturbation(model, rho=0.5),
    "sam": lambda model: L2Perturbation(model, rho=0.5),
    "gauss": lambda model: GaussianPerturbation(model, rho=0.5, seed=1),
}


@pytest.mark.parametrize("method", sorted(EXACT))
def test_bf16_true_weights_are_restored_bit_exactly_after_many_cycles(method):
    torch.manual_seed(0)
    model = TinyViTLike(dim=64).to(CUDA, torch.bfloat16)
    before = snapshot(model)
    perturbation = EXACT[method](model)
    assert perturbation.exact_restore
    for cycle in range(64):  # lr 0: every cycle must give the weights back
        cuda_first_pass(model, seed=cycle)
        perturbation.perturb()
        if cycle == 0:
            moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            assert moved, "perturb() changed no weight"
        perturbation.restore()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


# 2. 16-mixed: the GradScaler skips an overflowing step -------------------------------------------
class Overflowing(Classifier):
    """Both passes of batch ``overflow_batch`` overflow in fp16: the loss × 1e30 (× the scale 2^16
    gives a gradient far beyond fp16's 65504)."""

    overflow_batch = 2

    def compute_loss(self, batch, batch_idx):
        output = super().compute_loss(batch, batch_idx)
        if batch_idx == self.overflow_batch:
            output = {**output, "loss": output["loss"] * 1e30}
        return output


class Snapshots(Callback):
    """The weights and the GradScaler's scale before and after every training batch."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.scales: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append([p.detach().clone() for p in pl_module.parameters()])
        self._scale = trainer.precision_plugin.scaler.get_scale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([p.detach().clone() for p in pl_module.parameters()])
        self.scales.append((self._scale, trainer.precision_plugin.scaler.get_scale()))


def test_16_mixed_overflow_is_skipped_by_the_grad_scaler_and_counted():
    module, snapshots, callback = Overflowing(), Snapshots(), NuSAM(rho=0.1)
    run = gpu_trainer(max_steps=4, precision="16-mixed", callbacks=[callback, snapshots])
    run.fit(module, loader(classification_data()))
    bad = Overflowing.overflow_batch
    assert len(snapshots.after) == 4 and module.loss_calls == 8  # two passes per batch
    assert callback.perturbation.skipped_steps == 1
    before, after = snapshots.before[bad], snapshots.after[bad]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the step was skipped
    scale_before, scale_after = snapshots.scales[bad]
    assert scale_after == scale_before / 2  # the GradScaler found the overflow and backed off
    for index in (0, 1, 3):  # the other steps trained
        assert max_weight_difference(snapshots.after[index], snapshots.before[index]) > 0, index
    assert all(torch.isfinite(p).all() for p in module.parameters())


# 3. the same dropout masks in both passes --------------------------------------------------------
def fit_dropout(callbacks: list[Callback], steps: int = 4) -> tuple[PlainClassifier, list[torch.Tensor]]:
    """A dropout model through the drop-in on the GPU; the dropout masks of every pass."""
    torch.manual_seed(0)
    module = PlainClassifier(net=make_net(dropout=0.5), optimizer="adamw", lr=0.01)
    masks: list[torch.Tensor] = []
    dropout = module.net[2]
    assert isinstance(dropout, nn.Dropout)
    dropout.register_forward_hook(lambda layer, inputs, output: masks.append((output != 0).cpu()))
    gpu_trainer(max_steps=steps, callbacks=callbacks).fit(module, loader(classification_data()))
    return module, masks


def test_both_passes_draw_the_same_dropout_masks_on_cuda():
    module, masks = fit_dropout([NuSAM(rho=0.3)])
    assert module.passes == ["first", "second"] * 4
    for step in range(4):
        assert torch.equal(masks[2 * step], masks[2 * step + 1]), step
    assert not torch.equal(masks[0], masks[2])  # and new masks at the next step


def test_rho_zero_with_dropout_on_cuda_equals_the_run_without_the_callback_bitwise():
    module, masks = fit_dropout([NuSAM(rho=0.0)])
    rng_after = torch.cuda.get_rng_state()
    plain, plain_masks = fit_dropout([])
    assert module.passes == ["first", "second"] * 4 and plain.passes == [None] * 4
    assert max_weight_difference(module.net, plain.net) == 0.0
    assert all(torch.equal(m, p) for m, p in zip(masks[::2], plain_masks, strict=True))
    assert torch.equal(rng_after, torch.cuda.get_rng_state())  # the stream after: a plain run's


# 4. peak memory ----------------------------------------------------------------------------------
WIDTH, LAYERS, BATCH = 2048, 8, 64


def peak_of_a_step(make_perturbation: Callable[[nn.Module], Perturbation] | None) -> tuple[int, int, int]:
    """``max_memory_allocated`` of the second training step (the optimizer's state exists from the
    first), above what was allocated before the model: its bytes; with the bytes the perturbation
    holds after the step and the bytes of the weights it perturbs.

    AdamW is ``fused``: its step makes no temporaries, so the peaks compare the passes and the
    perturbation rather than the optimizer's scratch space."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    model = nn.Sequential(*layers).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    perturbation = make_perturbation(model) if make_perturbation is not None else None
    inputs = torch.randn(BATCH, WIDTH, device=CUDA)

    def step() -> None:
        model(inputs).square().mean().backward()
        if perturbation is not None:  # as the engine does it
            perturbation.perturb()
            optimizer.zero_grad(set_to_none=True)
            model(inputs).square().mean().backward()
            perturbation.restore()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held = perturbed = 0
    if perturbation is not None:
        held = sum(t.numel() * t.element_size() for t in perturbation.held_tensors())
        perturbed = sum(p.numel() * p.element_size() for p in perturbation.parameters)
    return peak, held, perturbed  # the model and its state are freed on return


def test_peak_memory_nusam_is_adamw_plus_its_vectors_and_sam_adds_a_copy():
    adamw, _, _ = peak_of_a_step(None)
    nusam, held, _ = peak_of_a_step(lambda model: NuclearPerturbation(model, rho=0.05))
    sam, copy_bytes, perturbed = peak_of_a_step(lambda model: L2Perturbation(model, rho=0.05))
    vectors = LAYERS * 2 * WIDTH * 4  # u and v of each matrix, fp32
    slack = adamw // 100  # the project's memory bar: νSAM ≤ AdamW + 1 %
    print(f"peak above the start: AdamW {adamw / MiB:.2f} MiB, νSAM {nusam / MiB:.2f} MiB (holds "
          f"{held / 2**10:.0f} KiB, vectors {vectors / 2**10:.0f} KiB), SAM {sam / MiB:.2f} MiB (holds "
          f"{copy_bytes / MiB:.1f} MiB); slack {slack / MiB:.2f} MiB")
    assert nusam <= adamw + vectors + slack
    assert perturbed >= LAYERS * WIDTH * WIDTH * 4  # SAM perturbs every weight
    # The same two-pass step peaks where SAM's copy is alive (the second pass), which a one-pass
    # AdamW step does not reach (measured on an H200: AdamW 578 MiB, νSAM 513, SAM 641): SAM's
    # extra copy shows against νSAM's step, not against AdamW's.
    assert sam >= nusam + perturbed - slack


# 5. no host synchronisation in perturb()/restore() --------------------------------------------
# THE SYNC CHECK: DESIGN.md's GPU requirement, as a test. It fails for a method until that method's
# perturb()/restore() runs without host synchronisation (the failure names the line that synchronised).
SYNC_FREE: dict[str, Callable[[nn.Module], Perturbation]] = {
    "nusam": lambda model: NuclearPerturbation(model, rho=0.1),
    "nusam_batched": lambda model: NuclearPerturbation(model, rho=0.1, batched=True),
    "nusam_t3": lambda model: NuclearPerturbation(model, rho=0.1, power_iterations=3),
    "nusam_one_pass": lambda model: NuclearPerturbation(model, rho=0.1),
    "nusam_norm": lambda model: NuclearNormalizedPerturbation(model, rho=0.1),
    "sam": lambda model: L2Perturbation(model, rho=0.1),
    "asam": lambda model: L2Perturbation(model, rho=0.5, adaptive=True),
    "samon": lambda model: NormLayerPerturbation(model, rho=0.1),
    "gauss": lambda model: GaussianPerturbation(model, rho=0.1, seed=1),
}


@contextlib.contextmanager
def host_sync_is_an_error() -> Iterator[None]:
    """Any CUDA call that synchronises with the host raises inside this context."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("method", sorted(SYNC_FREE))
def test_sync_check_perturb_and_restore_never_synchronise_with_the_host(method, precision):
    """After one warm-up cycle (first-use set-up may synchronise once), two cycles of
    perturb()/restore() (one-pass: estimate()/apply()/restore()) with every synchronising CUDA
    call an error. ``bf16-mixed``: fp32 weights, forward under autocast, and the core called
    inside autocast as SAMMixin calls it; ``bf16-true``: bf16 weights with the exact restore."""
    torch.manual_seed(0)
    model = TinyViTLike(dim=64).to(CUDA, torch.bfloat16 if precision == "bf16-true" else torch.float32)
    perturbation = SYNC_FREE[method](model)
    one_pass = method.endswith("one_pass")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def cycle(checked: bool) -> None:
        cuda_first_pass(model, seed=0, autocast=precision == "bf16-mixed")
        with autocast, host_sync_is_an_error() if checked else contextlib.nullcontext():
            if one_pass:
                perturbation.estimate()
                perturbation.apply()
            else:
                perturbation.perturb()
            perturbation.restore()

    cycle(checked=False)
    before = snapshot(model)
    for _ in range(2):
        cycle(checked=True)
    torch.cuda.synchronize()
    assert perturbation.steps == 3
    if precision == "bf16-true" or method in ("sam", "asam", "samon"):  # exact restores
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# 6. torch.compile (last: the slowest, it compiles for tens of seconds) ----------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16-true"])
def test_compiled_nusam_equals_the_looped_reference_on_cuda_and_never_synchronises(precision):
    """``execution="compiled"`` on the GPU against the looped reference, both fed the same
    gradients, three steps with a changing ρ: the same weights (to a last-bit rounding of u and v),
    bf16 weights restored bit-exactly, two programs compiled at the first step and none after,
    and (after that first step) no host synchronisation in perturb() or restore()."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    torch.manual_seed(0)
    model = TinyViTLike(dim=64).to(CUDA, dtype)
    twin = copy.deepcopy(model)
    compiled = NuclearPerturbation(model, rho=0.1, execution="compiled")
    reference = NuclearPerturbation(twin, rho=0.1, foreach=False, batched=False)
    initial = snapshot(model)
    tolerance = {"rtol": 2**-7, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for step, rho in enumerate([0.1, 0.05, 0.08]):  # small enough for the bf16 exception budgets
        cuda_first_pass(model, seed=step)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        checked = host_sync_is_an_error() if step > 0 else contextlib.nullcontext()  # step 0 compiles
        with checked:
            compiled.perturb(rho)
        reference.perturb(rho)
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, **tolerance, msg=name)
        with checked:
            compiled.restore()
        reference.restore()
        if dtype == torch.bfloat16:
            assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())
    torch.cuda.synchronize()
    assert compiled._programs.compiles == 2 and compiled.steps == 3 and compiled.skipped_steps == 0


def test_the_drop_in_trains_a_compiled_model_as_the_eager_one():
    modules = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = make_net().to(CUDA)
        module = PlainClassifier(net=torch.compile(net) if compiled else net)
        callback = NuSAM(rho=0.3)
        gpu_trainer(max_steps=6, callbacks=[callback]).fit(module, loader(classification_data()))
        assert module.passes == ["first", "second"] * 6
        assert callback.perturbation.steps == 6 and len(callback.perturbation.parameters) == 3
        modules[compiled] = module
    torch.manual_seed(0)
    initial = make_net()  # on the CPU, where the Trainer's teardown leaves the fitted modules
    assert max_weight_difference(modules[True].net, initial) > 1e-3  # it trained
    difference = max_weight_difference(modules[True].net, modules[False].net)
    print(f"max |w_compiled - w_eager| after 6 steps: {difference:.2e}")
    assert difference <= 1e-4

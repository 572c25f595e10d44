"""``nusam memory``: the paper's Table 1 for any timm or Hugging Face model, plus training state.

    nusam memory --model vit_base_patch16_224              # a timm model
    nusam memory --transformers bert                       # BERT-base (the default config of a type)
    nusam memory --transformers models/bert-base-uncased   # a local config.json (or its directory)

The model is built on the ``meta`` device (no memory, no download). SAM must keep a copy of
every trainable weight (or its perturbation); νSAM keeps ``u`` and ``v`` per weight matrix, and
the count is taken from a real :class:`~lightning_nusam.perturbations.NuclearPerturbation`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

from lightning_nusam.perturbations import NuclearPerturbation
from lightning_nusam.perturbations.selection import (
    is_convolution_kernel,
    is_embedding_table,
    owned_parameters,
)
from lightning_nusam.usage import MissingExtraError, check_timm_model

#: How many of the largest parameters left out the report names.
LEFT_OUT_SHOWN = 10

#: Numbers each optimizer keeps per weight besides the weight and its gradient.
OPTIMIZER_STATE_PER_WEIGHT = {"SGD": 0, "SGD+momentum": 1, "AdamW": 2}


@dataclass
class MemoryReport:
    model: str
    parameters: int
    sam_perturbation: int
    nusam_perturbation: int
    perturbed_matrices: int
    #: (name, shape) of every matrix νSAM perturbs, in model order
    counted: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    #: (name, shape, what would include it) of the weights νSAM leaves out, largest first
    left_out: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)

    @property
    def covered(self) -> int:
        """Weights in the matrices νSAM perturbs (SAM perturbs all ``parameters``)."""
        return sum(torch.Size(shape).numel() for _, shape in self.counted)

    @property
    def coverage(self) -> float:
        """The share of the trainable weights that νSAM perturbs."""
        return self.covered / self.parameters if self.parameters else 0.0

    @property
    def perturbation_saving(self) -> float:
        return 1 - self.nusam_perturbation / self.sam_perturbation

    def training_state(self, optimizer: str) -> dict[str, int | float]:
        """Numbers held in training: weights + grads + optimizer state + the perturbation."""
        base = (2 + OPTIMIZER_STATE_PER_WEIGHT[optimizer]) * self.parameters
        sam, nusam = base + self.sam_perturbation, base + self.nusam_perturbation
        return {"base": base, "sam": sam, "nusam": nusam, "saving": 1 - nusam / sam}


def memory_report(model_name: str, **model_kwargs) -> MemoryReport:
    """Build the timm model ``model_name`` on the meta device and count what SAM and νSAM hold."""
    check_timm_model(model_name, "--model")
    with torch.device("meta"):
        model = timm.create_model(model_name, **model_kwargs)
    return count(model_name, model)


def transformers_memory_report(config: str, num_labels: int = 2) -> MemoryReport:
    """The same for a Hugging Face sequence classifier, from a local ``config.json`` (or the
    directory holding it), or from the default config of a model type (``bert`` = BERT-base)."""
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification
    except ModuleNotFoundError as error:
        raise MissingExtraError(
            "--transformers needs Hugging Face transformers, which the `text` extra installs: "
            "pip install 'lightning-nusam[text]'") from error

    path = Path(config).expanduser()
    if path.exists():
        model_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    else:
        model_config = AutoConfig.for_model(config)
    model_config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(model_config)
    return count(f"{type(model).__name__} ({config}, {num_labels} labels)", model)


def count(name: str, model: torch.nn.Module) -> MemoryReport:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with warnings.catch_warnings():  # the report lists what is left out itself
        warnings.simplefilter("ignore", UserWarning)
        nusam = NuclearPerturbation(model, rho=0.0)
    counted_names = set(nusam.parameter_names)
    counted, left_out = [], []
    for item in owned_parameters(model):
        shape = tuple(item.parameter.shape)
        if item.name in counted_names:
            counted.append((item.name, shape))
        elif is_convolution_kernel(item):
            left_out.append((item.name, shape, "include_conv=True"))
        elif is_embedding_table(item):
            left_out.append((item.name, shape, "include_embeddings=True"))
        elif item.parameter.dim() >= 2:
            left_out.append((item.name, shape, "excluded by name (exclude=...)"))
    left_out.sort(key=lambda entry: -torch.Size(entry[1]).numel())
    return MemoryReport(name, trainable, trainable, nusam.held_numel(), len(counted), counted, left_out)


def format_report(report: MemoryReport, bytes_per_number: int = 4) -> str:
    def size(numbers: float) -> str:
        return f"{numbers:,.0f} ({numbers * bytes_per_number / 2**20:,.1f} MiB)"

    lines = [
        f"# {report.model}",
        "",
        "| | numbers (fp32 MiB) |",
        "|---|---|",
        f"| trainable parameters | {size(report.parameters)} |",
        f"| SAM perturbation (a copy of the weights) | {size(report.sam_perturbation)} |",
        f"| νSAM perturbation (u, v of {report.perturbed_matrices} matrices) | "
        f"{size(report.nusam_perturbation)} |",
        f"| weights νSAM perturbs (SAM: all) | {report.covered:,} ({100 * report.coverage:.1f} % of the "
        "weights) |",
        f"| saving on the perturbation | {100 * report.perturbation_saving:.2f} % |",
        "",
        f"νSAM perturbs {report.perturbed_matrices} matri{'x' if report.perturbed_matrices == 1 else 'ces'} "
        f"holding {100 * report.coverage:.1f} % of the weights; SAM perturbs all of them"
        + (" (the saving compares different coverage: see what is not perturbed below)."
           if report.coverage < 0.5 else "."),
        "",
        "Training state (weights + gradients + optimizer state + perturbation):",
        "",
        "| optimizer | without SAM | with SAM | with νSAM | νSAM saves vs SAM |",
        "|---|---|---|---|---|",
    ]
    for optimizer in OPTIMIZER_STATE_PER_WEIGHT:
        state = report.training_state(optimizer)
        lines.append(
            f"| {optimizer} | {state['base'] * bytes_per_number / 2**20:,.1f} MiB | "
            f"{state['sam'] * bytes_per_number / 2**20:,.1f} MiB | "
            f"{state['nusam'] * bytes_per_number / 2**20:,.1f} MiB | {100 * state['saving']:.1f} % |"
        )
    lines += ["", "SGD keeps weights and gradients; SAM adds a third copy, which νSAM removes "
              "(close to 1/3 of the training state).", "",
              f"νSAM perturbs these {report.perturbed_matrices} matrices (u and v of each):", ""]
    lines += [f"- {name} {shape}" for name, shape in report.counted]
    if report.left_out:
        left_numel = sum(torch.Size(shape).numel() for _, shape, _ in report.left_out)
        lines += ["", f"not perturbed: {len(report.left_out)} multi-dimensional weights "
                  f"({left_numel:,} numbers, {100 * left_numel / report.parameters:.1f} % of the "
                  "parameters), "
                  "largest first:", ""]
        lines += [f"- {name} {shape}: {hint}" for name, shape, hint in report.left_out[:LEFT_OUT_SHOWN]]
        if len(report.left_out) > LEFT_OUT_SHOWN:
            lines.append(f"- ... and {len(report.left_out) - LEFT_OUT_SHOWN} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> MemoryReport:
    parser = argparse.ArgumentParser(prog="nusam memory", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a timm model name, e.g. vit_base_patch16_224")
    source.add_argument("--transformers", metavar="CONFIG",
                        help="a Hugging Face config.json (or its directory), or a model type such as bert")
    parser.add_argument("--num-labels", type=int, default=2, help="classes of the --transformers head")
    parser.add_argument(
        "--model-kwargs", default="{}", help='JSON, e.g. \'{"img_size": 32, "patch_size": 4}\''
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.transformers:
        report = transformers_memory_report(args.transformers, args.num_labels)
    else:
        report = memory_report(args.model, **json.loads(args.model_kwargs))
    if args.json:
        print(json.dumps({**asdict(report), "covered": report.covered, "coverage": report.coverage,
                          "training_state": {
            name: report.training_state(name) for name in OPTIMIZER_STATE_PER_WEIGHT}}, indent=2))
    else:
        print(format_report(report))
    return report


if __name__ == "__main__":
    main()

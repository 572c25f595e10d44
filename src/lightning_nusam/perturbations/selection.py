"""Which parameters a perturbation touches.

Every perturbation is built from an ``nn.Module`` and a selection rule. The rules here are
plain functions of the module tree, so the choice is visible (``perturbation.parameter_names``)
and testable without running a step. A rule selects frozen parameters too (``requires_grad``
off): a perturbation skips them while they are frozen and perturbs them once they train (a
fine-tuning callback that unfreezes a backbone), so the selection need not be rebuilt.
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm

#: Parameter-name patterns νSAM leaves alone by default: learned position embeddings and the
#: extra tokens of vision transformers. They are not weight matrices of a layer (paper §3.2).
DEFAULT_NUCLEAR_EXCLUDE: tuple[str, ...] = (
    "*pos_embed*",
    "*position_embedding*",
    "*position_embeddings*",
    "*cls_token*",
    "*dist_token*",
    "*reg_token*",
    "*mask_token*",
    "*relative_position_bias_table*",  # Swin, BEiT: a lookup table of biases per relative position
    "*rel_pos_h*",  # the relative position embeddings of SAM's ViT (timm vit_*_sam)
    "*rel_pos_w*",
)

#: Module types whose parameters are normalisation parameters (SAM-ON perturbs exactly these).
#: ``nn.RMSNorm`` exists from torch 2.4 on.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)

CONV_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)

#: Lookup tables: their rows are vectors of tokens, not the weights of a linear map.
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class SelectedParameter:
    """One parameter chosen for perturbation, with the module that owns it (the first one, in
    ``named_modules`` order) and every module that holds it (more than one when tied)."""

    name: str
    parameter: nn.Parameter
    module: nn.Module
    owners: tuple[nn.Module, ...] = ()


def unwrap_module(model: nn.Module) -> nn.Module:
    """The user's module inside the wrappers that training code puts around it, so that names and
    ``state_dict`` keys are the user's: ``DistributedDataParallel``/``DataParallel`` (``.module``),
    ``torch.compile`` (``._orig_mod``) and Lightning Fabric's ``fabric.setup`` (``.module``; checked
    only when Fabric is already imported, so this module never imports Lightning)."""
    fabric_wrappers = tuple(
        sys.modules[name]._FabricModule
        for name in ("lightning.fabric.wrappers", "lightning_fabric.wrappers")
        if name in sys.modules and hasattr(sys.modules[name], "_FabricModule")
    )
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled_type = getattr(compiled, "OptimizedModule", None)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif fabric_wrappers and isinstance(model, fabric_wrappers):
            model = model.module
        elif compiled_type is not None and isinstance(model, compiled_type):
            model = model._orig_mod
        else:
            return model


def owned_parameters(model: nn.Module) -> Iterator[SelectedParameter]:
    """Yield every parameter once (shared/tied parameters once, frozen ones too) with its owners.

    Parameters of lazy modules not initialised yet (``nn.LazyLinear`` before its first forward)
    have no shape and are left out; a perturbation takes its selection again once they have one.
    """
    owners: dict[int, list[nn.Module]] = {}
    first: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for local_name, parameter in module.named_parameters(recurse=False):
            if is_lazy(parameter):
                continue
            owners.setdefault(id(parameter), []).append(module)
            first.setdefault(id(parameter), (f"{module_name}.{local_name}" if module_name else local_name,
                                             parameter))
    for key, (name, parameter) in first.items():
        yield SelectedParameter(name, parameter, owners[key][0], tuple(owners[key]))


def uninitialized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s lazy modules that their first forward has not initialised yet."""
    return [parameter for parameter in model.parameters() if is_lazy(parameter)]


def inside_modules(model: nn.Module, module_types: Sequence[type[nn.Module]]) -> set[int]:
    """``id`` of every parameter inside a module of one of ``module_types`` (its own parameters and
    those of every submodule: a ``TransformerEncoderLayer``'s attention and feed-forward too)."""
    types = tuple(module_types)
    if not types:
        return set()
    return {id(parameter) for module in model.modules() if isinstance(module, types)
            for parameter in module.parameters()}


def weight_norm_magnitudes(model: nn.Module) -> set[int]:
    """``id`` of the magnitudes ``g`` of weight-normalised layers, ``w = g · v / ‖v‖`` (the
    ``parametrizations.weight_norm`` form, ``original0``, and the older hook form, ``weight_g``).

    ``g`` holds one scale per output row, shape ``(out, 1)``: a gain like a normalisation
    layer's, not a layer's weight matrix, so νSAM leaves it alone unless ``include`` names it;
    ``v`` (``original1``, ``weight_v``) is the layer's matrix and is perturbed.
    """
    parametrized_norm = getattr(parametrizations, "_WeightNorm", None)  # the parametrization's class
    found: set[int] = set()
    for module in model.modules():
        for chain in getattr(module, "parametrizations", {}).values():
            if parametrized_norm is not None and any(isinstance(p, parametrized_norm) for p in chain):
                found.add(id(chain.original0))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                magnitude = getattr(module, f"{hook.name}_g", None)
                if isinstance(magnitude, nn.Parameter):
                    found.add(id(magnitude))
    return found


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """``fnmatch`` of a dotted parameter name against any pattern (``*`` matches dots too)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def as_patterns(argument: str, patterns: Sequence[str] | str) -> tuple[str, ...]:
    """Name patterns as a tuple; a single string is one pattern (never split into characters)."""
    if isinstance(patterns, str):
        return (patterns,)
    try:
        result = tuple(patterns)
    except TypeError:
        raise TypeError(f"`{argument}` must be a name pattern or a list of them, got {patterns!r}") from None
    bad = [p for p in result if not isinstance(p, str)]
    if bad:
        raise TypeError(f"`{argument}` must contain name patterns (strings), got {bad[0]!r}")
    return result


def _sparse_gradient(item: SelectedParameter) -> bool:
    """Parameters of embeddings built with ``sparse=True`` get sparse gradients: not perturbed."""
    if isinstance(item.module, EMBEDDING_TYPES) and item.module.sparse:
        warnings.warn(
            f"parameter {item.name!r} gets sparse gradients (sparse=True embedding) and is not "
            "perturbed; build the embedding with sparse=False to perturb it",
            UserWarning, stacklevel=3,
        )
        return True
    return False


def dense_gradient(item: SelectedParameter) -> torch.Tensor | None:
    """``item``'s gradient, or None when it has none or it is sparse (then skipped, with a warning)."""
    grad = item.parameter.grad
    if grad is not None and grad.layout != torch.strided:
        warnings.warn(f"parameter {item.name!r} has a sparse gradient and is not perturbed this step",
                      UserWarning, stacklevel=3)
        return None
    return grad


def is_convolution_kernel(item: SelectedParameter) -> bool:
    """A convolution layer's kernel (more than two dimensions): νSAM perturbs it with ``include_conv``."""
    return isinstance(item.module, CONV_LAYER_TYPES) and item.parameter.dim() > 2


def is_embedding_table(item: SelectedParameter) -> bool:
    """A parameter owned by embedding layers only (an embedding tied to an output projection,
    a linear map, is that layer's weight matrix): νSAM perturbs it with ``include_embeddings``."""
    return all(isinstance(m, EMBEDDING_TYPES) for m in item.owners)


def select_matrices(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str = DEFAULT_NUCLEAR_EXCLUDE,
    exclude_modules: Sequence[type[nn.Module]] = (),
    include_conv: bool = False,
    include_embeddings: bool = False,
) -> list[SelectedParameter]:
    """The weight matrices νSAM perturbs (Algorithm 1: ``x = (M_1, ..., M_l)``).

    A parameter is selected when it is 2-D (or is a convolution kernel and
    ``include_conv`` is set, then seen as an ``(out, in·kh·kw)`` matrix), its name matches
    ``include`` (when given) and no pattern of ``exclude``, its module is neither a
    normalisation layer nor an embedding table (unless ``include_embeddings``), it is not
    inside a module of ``exclude_modules`` (at any depth), it is not a weight-normalised
    layer's magnitude ``g`` (unless ``include`` names it; see :func:`weight_norm_magnitudes`),
    and it does not get sparse gradients. ``include`` and ``exclude`` take a pattern or a list
    of them.
    """
    include = None if include is None else as_patterns("include", include)
    exclude = as_patterns("exclude", exclude)
    skip_types = NORM_LAYER_TYPES
    excluded = inside_modules(model, exclude_modules)
    if include is None:
        excluded |= weight_norm_magnitudes(model)
    selected = []
    for item in owned_parameters(model):
        if id(item.parameter) in excluded:
            continue
        if not include_embeddings and is_embedding_table(item):
            continue
        is_conv = is_convolution_kernel(item)
        if is_conv and not include_conv:
            continue
        if not is_conv and item.parameter.dim() != 2:
            continue
        if isinstance(item.module, skip_types):
            continue
        if include is not None and not matches_any(item.name, include):
            continue
        if matches_any(item.name, exclude) or _sparse_gradient(item):
            continue
        selected.append(item)
    return selected


def select_all(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str = (),
) -> list[SelectedParameter]:
    """Every parameter (SAM's flattened vector), optionally filtered by name (a pattern or a list
    of them); parameters with sparse gradients are left out."""
    include = None if include is None else as_patterns("include", include)
    exclude = as_patterns("exclude", exclude)
    return [
        item
        for item in owned_parameters(model)
        if (include is None or matches_any(item.name, include)) and not matches_any(item.name, exclude)
        and not _sparse_gradient(item)
    ]


def select_norm_layers(
    model: nn.Module, extra_norm_types: Sequence[type[nn.Module]] = ()
) -> list[SelectedParameter]:
    """Parameters of normalisation layers, chosen by module type, not by name (SAM-ON)."""
    norm_types = NORM_LAYER_TYPES + tuple(extra_norm_types)
    return [item for item in owned_parameters(model) if isinstance(item.module, norm_types)]


def nothing_to_perturb(model: nn.Module, hint: str) -> ValueError:
    """The error every perturbation raises when its selection is empty."""
    return ValueError(
        f"`model` ({type(model).__name__}) has no parameters to perturb: {hint}. "
        "Check that `include`/`exclude` select some."
    )


def coverage(model: nn.Module, selected: Sequence[SelectedParameter], *, include_conv: bool = False,
             include_embeddings: bool = False) -> tuple[float, list[str]]:
    """The share of the model's trainable weights in ``selected``, and the convolution kernels
    and embedding tables left out by default, with the option that would include them (for
    νSAM's one-time note on a mostly convolutional or embedding-heavy model)."""
    chosen = {id(item.parameter) for item in selected}
    total = covered = 0
    left_out: dict[tuple[str, str], list[int]] = {}
    for item in owned_parameters(model):
        if not item.parameter.requires_grad:
            continue
        total += item.parameter.numel()
        if id(item.parameter) in chosen:
            covered += item.parameter.numel()
            continue
        if not include_conv and is_convolution_kernel(item):
            kind = ("convolution kernel", "include_conv=True perturbs them as matrices")
        elif not include_embeddings and is_embedding_table(item):
            kind = ("embedding table", "include_embeddings=True perturbs them")
        else:
            continue
        counts = left_out.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += item.parameter.numel()
    share = covered / total if total else 1.0
    return share, [f"{count} {what}{'s' if count > 1 else ''} ({numel:,} weights; {hint})"
                   for (what, hint), (count, numel) in left_out.items()]

"""Which parameters a perturbation touches.

Every perturbation is built from an ``nn.Module`` and a selection rule. The rules here are
plain functions of the module tree, so the choice is visible (``perturbation.parameter_names``)
and testable without running a step.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

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


def owned_parameters(model: nn.Module) -> Iterator[SelectedParameter]:
    """Yield every trainable parameter once (shared/tied parameters once) with its owner modules."""
    owners: dict[int, list[nn.Module]] = {}
    first: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for local_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            owners.setdefault(id(parameter), []).append(module)
            first.setdefault(id(parameter), (f"{module_name}.{local_name}" if module_name else local_name,
                                             parameter))
    for key, (name, parameter) in first.items():
        yield SelectedParameter(name, parameter, owners[key][0], tuple(owners[key]))


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

    A parameter is selected when it requires grad, is 2-D (or is a convolution kernel and
    ``include_conv`` is set, then seen as an ``(out, in·kh·kw)`` matrix), its name matches
    ``include`` (when given) and no pattern of ``exclude``, its module is neither a
    normalisation layer, nor an embedding table (unless ``include_embeddings``), nor an
    instance of ``exclude_modules``, and it does not get sparse gradients. ``include`` and
    ``exclude`` take a pattern or a list of them.
    """
    include = None if include is None else as_patterns("include", include)
    exclude = as_patterns("exclude", exclude)
    skip_types = NORM_LAYER_TYPES + tuple(exclude_modules)
    selected = []
    for item in owned_parameters(model):
        # an embedding tied to an output projection (a linear map) is that layer's weight matrix
        if not include_embeddings and all(isinstance(m, EMBEDDING_TYPES) for m in item.owners):
            continue
        is_conv = isinstance(item.module, CONV_LAYER_TYPES) and item.parameter.dim() > 2
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
    """Every trainable parameter (SAM's flattened vector), optionally filtered by name (a pattern
    or a list of them); parameters with sparse gradients are left out."""
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
        "Check that its parameters require grad and that `include`/`exclude` select some."
    )

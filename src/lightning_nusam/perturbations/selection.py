"""Which parameters a perturbation touches.

Every perturbation is built from an ``nn.Module`` and a selection rule. The rules here are
plain functions of the module tree, so the choice is visible (``perturbation.parameter_names``)
and testable without running a step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SelectedParameter:
    """One parameter chosen for perturbation, with the module that owns it."""

    name: str
    parameter: nn.Parameter
    module: nn.Module


def owned_parameters(model: nn.Module) -> Iterator[SelectedParameter]:
    """Yield every trainable parameter once (shared/tied parameters once) with its owner module."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen or not parameter.requires_grad:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{local_name}" if module_name else local_name
            yield SelectedParameter(name, parameter, module)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """``fnmatch`` of a dotted parameter name against any pattern (``*`` matches dots too)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns(argument: str, patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise TypeError(f"`{argument}` must be a sequence of name patterns, got the string "
                        f"{patterns!r}; write [{patterns!r}]")
    return tuple(patterns)  # type: ignore[arg-type]


def select_matrices(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_NUCLEAR_EXCLUDE,
    exclude_modules: Sequence[type[nn.Module]] = (),
    include_conv: bool = False,
) -> list[SelectedParameter]:
    """The weight matrices νSAM perturbs (Algorithm 1: ``x = (M_1, ..., M_l)``).

    A parameter is selected when it requires grad, is 2-D (or is a convolution kernel and
    ``include_conv`` is set, then seen as an ``(out, in·kh·kw)`` matrix), its name matches
    ``include`` (when given) and no pattern of ``exclude``, and its module is neither a
    normalisation layer nor an instance of ``exclude_modules``.
    """
    include = None if include is None else _check_patterns("include", include)
    exclude = _check_patterns("exclude", exclude)
    skip_types = NORM_LAYER_TYPES + tuple(exclude_modules)
    selected = []
    for item in owned_parameters(model):
        is_conv = isinstance(item.module, CONV_LAYER_TYPES) and item.parameter.dim() > 2
        if is_conv and not include_conv:
            continue
        if not is_conv and item.parameter.dim() != 2:
            continue
        if isinstance(item.module, skip_types):
            continue
        if include is not None and not matches_any(item.name, include):
            continue
        if matches_any(item.name, exclude):
            continue
        selected.append(item)
    return selected


def select_all(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[SelectedParameter]:
    """Every trainable parameter (SAM's flattened vector), optionally filtered by name."""
    include = None if include is None else _check_patterns("include", include)
    exclude = _check_patterns("exclude", exclude)
    return [
        item
        for item in owned_parameters(model)
        if (include is None or matches_any(item.name, include)) and not matches_any(item.name, exclude)
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

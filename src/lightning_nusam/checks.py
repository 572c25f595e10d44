"""Argument checks shared by the whole package (pure Python: the core imports them too).

Each returns the value it accepts, or raises a ``ValueError`` that names the argument, so a bad
setting fails when the object is built, not during training.
"""

from __future__ import annotations


def is_whole_number(value: object) -> bool:
    """An ``int`` (not a ``bool``) or an integral finite ``float``: what a count may be given as."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def check_count(name: str, value: object, minimum: int, *, whole_floats: bool = False,
                meaning: str = "") -> int:
    """``value`` as an ``int`` ≥ ``minimum``; a ``bool`` is never a count.

    Args:
        name: the argument's name, for the message.
        value: what was given.
        minimum: the smallest value allowed.
        whole_floats: also accept an integral ``float`` such as ``2.0`` (a value read from a
            config); otherwise only an ``int`` is a count.
        meaning: what the count is, added to the message in parentheses.

    Example:
        >>> check_count("batch_size", 32, 1)
        32
        >>> check_count("every_n_steps", 2.0, 1, whole_floats=True)
        2
    """
    valid = is_whole_number(value) if whole_floats else isinstance(value, int) and not isinstance(value, bool)
    if not valid or value < minimum:  # type: ignore[operator]
        detail = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{detail}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_fraction(name: str, value: object) -> float:
    """``value`` as a ``float`` in ``[0, 1]`` (a number, not a ``bool`` or a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"`` or None)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_rho(rho: float) -> float:
    """``rho`` as a float, or a ``ValueError`` naming it (negative, NaN, infinite, a bool, a string)."""
    if isinstance(rho, bool) or not isinstance(rho, int | float):
        raise ValueError(f"`rho` must be a finite number >= 0 (the perturbation radius), got {rho!r}")
    rho = float(rho)
    if not rho >= 0.0 or rho == float("inf"):  # also rejects NaN
        raise ValueError(f"`rho` must be a finite number >= 0 (the perturbation radius), got {rho}")
    return rho


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> object:
    """``value`` if it is one of ``choices`` (compared with its type: ``1`` is not ``True``)."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite ``float`` > 0 (≥ 0 with ``allow_zero``); not a ``bool``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value \
            or value == float("inf") or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"`{name}` must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_integer(name: str, value: object) -> int:
    """``value`` if it is an ``int`` (a seed, say), not a ``bool``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    return value


def check_types(name: str, value: object) -> tuple[type, ...]:
    """A sequence of classes (module types) as a tuple."""
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, str) or not hasattr(value, "__iter__") \
            or not all(isinstance(v, type) for v in value):
        raise ValueError(f"`{name}` must be a list of classes, got {value!r}")
    return tuple(value)

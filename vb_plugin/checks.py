"""Checks of options, with errors that name the option, the value and what
is allowed (one place for every family), and the size arithmetic they share.
"""
import numbers
from typing import Optional, Sequence, Tuple


def check_int(name: str, value, minimum: Optional[int] = None,
              maximum: Optional[int] = None) -> int:
    """Return ``value`` as an int, or raise if it is not an int in range.

    Args:
        name (str): The option's name, for the message.
        value: The value given.
        minimum (int, optional): Smallest allowed value.
        maximum (int, optional): Largest allowed value.

    Raises:
        TypeError: If ``value`` is not an int (a bool is not).
        ValueError: If it is out of range.

    Example:
        >>> check_int('in_channels', 3, minimum=1)
        3
        >>> check_int('in_channels', 0, minimum=1)
        Traceback (most recent call last):
            ...
        ValueError: in_channels=0 is not valid; it must be a positive int
    """
    if minimum == 1 and maximum is None:
        allowed = 'a positive int'
    elif maximum is None:
        allowed = f'an int >= {minimum}' if minimum is not None else 'an int'
    elif minimum is None:
        allowed = f'an int <= {maximum}'
    else:
        allowed = f'an int in [{minimum}, {maximum}]'
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be {allowed}, got {value!r} '
                        f'({type(value).__name__})')
    if (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        raise ValueError(f'{name}={value!r} is not valid; it must be '
                         f'{allowed}')
    return int(value)


def resolve_out_indices(out_indices: Sequence[int],
                        num_stages: int,
                        name: str = 'out_indices') -> Tuple[int, ...]:
    """Check ``out_indices`` and return them non-negative, in stage order.

    Args:
        out_indices (Sequence[int]): Stage indices; negative values count from
            the end.
        num_stages (int): Number of stages of the architecture.
        name (str): Option name used in error messages.

    Returns:
        tuple[int, ...]: Sorted, non-negative indices.

    Raises:
        TypeError: If ``out_indices`` is not a sequence of ints.
        ValueError: If it is empty, has values out of range or duplicates.

    Example:
        >>> resolve_out_indices((-1, 1), num_stages=4)
        (1, 3)
    """
    valid = f'ints in [{-num_stages}, {num_stages - 1}]'
    if isinstance(out_indices, (str, bytes)) or not isinstance(
            out_indices, Sequence):
        raise TypeError(f'{name} must be a tuple or list of {valid}, '
                        f'got {out_indices!r} ({type(out_indices).__name__})')
    for idx in out_indices:
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
            raise TypeError(f'{name} must contain only {valid}, got '
                            f'{idx!r} ({type(idx).__name__}) in '
                            f'{tuple(out_indices)!r}')
    if len(out_indices) == 0:
        raise ValueError(f'{name} must not be empty; valid values are {valid}')
    bad = [i for i in out_indices if not -num_stages <= i < num_stages]
    if bad:
        raise ValueError(f'{name}={tuple(out_indices)!r} has {bad} out of '
                         f'range; valid values are {valid} '
                         f'({num_stages} stages)')
    resolved = [int(i) % num_stages for i in out_indices]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f'{name}={tuple(out_indices)!r} names the same stage '
                         f'twice (as non-negative indices: {resolved}); '
                         f'give each stage once, as {valid}')
    return tuple(sorted(resolved))


def check_frozen_stages(frozen_stages: int, num_stages: int) -> int:
    """Check ``frozen_stages``: -1 (nothing), 0 (stem) .. ``num_stages``.

    Example:
        >>> check_frozen_stages(2, num_stages=4)
        2
    """
    if isinstance(frozen_stages, bool) or not isinstance(
            frozen_stages, numbers.Integral):
        raise TypeError(f'frozen_stages must be an int in [-1, {num_stages}], '
                        f'got {frozen_stages!r} '
                        f'({type(frozen_stages).__name__})')
    if not -1 <= frozen_stages <= num_stages:
        raise ValueError(
            f'frozen_stages={frozen_stages} is out of range; valid values are '
            f'-1 (freeze nothing), 0 (the stem) up to {num_stages} (the stem '
            f'and all {num_stages} stages)')
    return int(frozen_stages)


def round_up_to(sizes: Sequence[int], divisor: int) -> Tuple[int, ...]:
    """Each size rounded up to a multiple of ``divisor`` (e.g. a backbone's
    :attr:`VBBackbone.size_divisor`).

    Example:
        >>> round_up_to((225, 301), 32)
        (256, 320)
    """
    return tuple(-(-n // divisor) * divisor for n in sizes)

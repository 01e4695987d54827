"""Checks of numeric options, with errors that name the option, the value
and what is allowed (one place for every family)."""
import numbers
from typing import Optional


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

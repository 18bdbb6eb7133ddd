"""Reading one setting's value: a whole number, a number, yes/no, a choice or a string,
within its bounds, and the words a message uses to say what was wanted and what was given.

Kept apart from `settings.py` (the settings themselves and their checks): these rules are
the same for every setting.
"""

import math
import re
import typing
from typing import Any, Literal


class Invalid(Exception):
    """One value that cannot be read; its message says why."""


# What is stripped around a number, a yes/no or a choice: ASCII white space only.
ASCII_SPACE = " \t\n\r\x0b\x0c"
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_BOOLEAN = "must be true or false (also 1/0, yes/no, on/off)"


def shown(raw: Any) -> str:
    """The value as read, for a message (cut short: it may be long)."""
    text = repr(raw)
    return text if len(text) <= 40 else f"{text[:37]}..."


def read_value(name: str, raw: Any, kind: Any, rules: Any) -> Any:
    """`raw` (a string from the environment, or a value given to Settings()) as `kind`,
    within the field's bounds."""
    options = typing.get_args(kind)
    if isinstance(raw, str) and not raw.isascii():
        try:
            raw.encode()
        except UnicodeEncodeError:  # bytes the environment held that are no UTF-8
            raise Invalid("holds bytes that are not UTF-8") from None
    if type(None) in options:
        if raw is None:
            return None
        kind = next(option for option in options if option is not type(None))
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        word = raw.strip(ASCII_SPACE) if isinstance(raw, str) else raw
        if word not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}, got {shown(raw)}")
        return word
    if kind is str:
        if not isinstance(raw, str):
            raise Invalid(f"must be a string, got {shown(raw)}")
        check = rules.get("check")
        return raw if check is None else check(raw)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = raw.strip(ASCII_SPACE).lower() if isinstance(raw, str) else None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise Invalid(f"{_BOOLEAN}, got {shown(raw)}")
    seconds = name.endswith(("_s", "_seconds"))
    noun = ("a whole number" if kind is int else "a number") + (" of seconds" if seconds else "")
    wanted = f"must be {noun}{_range(rules)}"
    number = _integer(raw) if kind is int else _float(raw)
    if number is None:
        raise Invalid(f"{wanted}, got {shown(raw)}")
    ge, gt, le = rules.get("ge"), rules.get("gt"), rules.get("le")
    if (
        (ge is not None and not number >= ge)
        or (gt is not None and not number > gt)
        or (le is not None and not number <= le)
    ):
        raise Invalid(f"{wanted}, got {shown(raw)}")
    return number


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _range(rules: Any) -> str:
    """The bounds in words: " from 3 to 86400", " above 0, at most 600", " of at least 1"."""
    ge, gt, le = rules.get("ge"), rules.get("gt"), rules.get("le")
    if ge is not None and le is not None:
        return f" from {_bound(ge)} to {_bound(le)}"
    if gt is not None and le is not None:
        return f" above {_bound(gt)} and at most {_bound(le)}"
    if ge is not None:
        return f" of at least {_bound(ge)}"
    if gt is not None:
        return f" above {_bound(gt)}"
    return ""


def _integer(raw: Any) -> int | None:
    """Digits with an optional sign, or an int from code; None if it is no whole number."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str):
        return None
    text = raw.strip(ASCII_SPACE)
    # Python's own bound on a number read from text (sys.get_int_max_str_digits()); past it
    # no bound of ours could hold anyway: such a value is out of range.
    if _INTEGER.fullmatch(text) is None or len(text) > 4000:
        return None
    return int(text)


def _float(raw: Any) -> float | None:
    """A finite decimal number (1, 2.5, 1e3), or an int or float from code; None otherwise.

    "inf" and "nan" are no number of seconds (each setting has an upper bound too, so that
    every time computed from it fits PostgreSQL's and Python's ranges).
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        try:
            number = float(raw)
        except OverflowError:  # an int past any float
            return None
    elif isinstance(raw, str) and _FLOAT.fullmatch(raw.strip(ASCII_SPACE)):
        number = float(raw.strip(ASCII_SPACE))
    else:
        return None
    return number if math.isfinite(number) else None

"""Validation of the options of TSV-M, TSV-C and STI, in one place.

FusionBench's ``auto_register_config`` sets every ``__init__`` parameter as an attribute, unchecked, and
its ``BaseAlgorithm`` only logs a warning for an unknown keyword. :func:`validate_options` refuses
unknown keywords (naming the valid options and the closest), checks the type and range of every option
in :data:`OPTION_CHECKS` and stores the normalized value (e.g. an OmegaConf ``ListConfig`` becomes a
list). Errors name the class and the option and say what to write instead, in Python and on the
command line.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import os
import string
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from ..functional import SVD_METHODS

__all__ = ["OPTION_CHECKS", "float_dtype", "option_names", "validate_options"]

# A converter returns the normalized value or raises ValueError with the reason (may be empty).
Convert = Callable[[Any], Any]


def _is_list(value: Any) -> bool:
    """A list given as a list (Python list/tuple or OmegaConf ListConfig), never a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _number(value: Any) -> float:
    if isinstance(value, str):
        raise ValueError("a string, not a number: write the number without quotes")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError
    if not math.isfinite(value):
        raise ValueError("not finite")
    return float(value)


def _number_where(test: Callable[[float], bool], reason: str) -> Convert:
    def convert(value: Any) -> float:
        value = _number(value)
        if not test(value):
            raise ValueError(reason)
        return value

    return convert


_positive = _number_where(lambda v: v > 0, "not positive")


def _integer(minimum: int) -> Convert:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError
        return int(value)

    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _choice(choices: Sequence[str]) -> Convert:
    def convert(value: Any) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            raise ValueError(f"did you mean {close[0]!r}?" if close else "")
        return value

    return convert


def _entries(values: Any, convert: Convert) -> List[float]:
    """A non-empty list with every entry converted, the first bad one named by its position."""
    if len(values) == 0:
        raise ValueError("an empty list")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(convert(v))
        except ValueError as e:
            raise ValueError(f"entry {i} is {v!r}{': ' + str(e) if str(e) else ''}") from None
    return out


def _alpha(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("a string: give a number, or a list of numbers (one per task) as a list")
    return _entries(value, _number) if _is_list(value) else _number(value)


def _alpha_grid(value: Any) -> List[float]:
    if not _is_list(value) or len(value) == 0:
        raise ValueError("give the values of alpha to try as a list, e.g. [0.5, 1.0]")
    values = _entries(value, _positive)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{repeated} appear more than once")
    return values


def _taskpool(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip() or value != value.strip():
            raise ValueError("an empty name, or spaces around it")
    elif isinstance(value, Mapping):
        if "_target_" not in value:
            raise ValueError("a mapping without _target_: give a task pool config or the name of one")
    elif not callable(getattr(value, "evaluate", None)):  # a task pool instance (from Python)
        raise ValueError
    return value


def _patterns(value: Any) -> List[str]:
    if isinstance(value, str):
        raise ValueError(f"a single string would be read as one pattern per character: write [{value!r}]")
    if not _is_list(value) or not all(isinstance(p, str) for p in value):
        raise ValueError
    return [str(p) for p in value]


def _device(value: Any) -> str:
    value = str(value) if isinstance(value, torch.device) else value
    if not isinstance(value, str):
        raise ValueError
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError("not a torch device") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("no CUDA device is available here: use cpu, or null for the Fabric device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return value


def _path(value: Any) -> str:
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as e:
        raise ValueError(f"{e}; the only placeholder is {{log_dir}}") from None
    if fields - {"log_dir"}:
        raise ValueError(f"unknown placeholder(s) {sorted(fields - {'log_dir'})}: the only one is {{log_dir}}")
    return value


def _shard_size(value: Any) -> Any:
    """A positive number of bytes or a size string, as ``save_pretrained(max_shard_size=...)`` reads it."""
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise ValueError
    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError):
        raise ValueError("not a size such as 5GB, 500MB or a number of bytes") from None
    if size <= 0:
        raise ValueError("not positive")
    return int(value) if isinstance(value, numbers.Integral) else value


def float_dtype(value: Any) -> torch.dtype:
    """The floating-point torch dtype named ``value`` (``"float16"``, ``"torch.bfloat16"``, a dtype)."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError
    return value


_BOOL = ("true or false", "true", _boolean)

#: Every option of TSV-M, TSV-C and STI (an option has the same meaning in each): what it accepts, a valid
#: example and its converter. An option whose description ends in "or null" (or says "null (...)") accepts None.
OPTION_CHECKS: Dict[str, Tuple[str, str, Convert]] = {
    "alpha": ("a finite number, a list of finite numbers (one per task) or null (1.0)", "1.0", _alpha),
    "alpha_grid": ("a list of distinct finite positive numbers or null", "[0.5,1.0]", _alpha_grid),
    "validation_taskpool": ("a task pool config (with _target_), the name of one, or null",
                            "CLIPVisionModelTaskPool/clip-vit-classification_TA8_val", _taskpool),
    "exclude_keys": ("a list of glob patterns or null", "['*text_projection*']", _patterns),
    "rank": ("a positive integer or null", "16", _integer(1)),
    "fraction": ("a number in (0, 1] or null", "0.125", _number_where(lambda v: 0 < v <= 1, "outside (0, 1]")),
    "energy": ("a number in (0, 1] or null", "0.95", _number_where(lambda v: 0 < v <= 1, "outside (0, 1]")),
    "device": ("a torch device name or null (the Fabric device)", "cpu", _device),
    "svd_method": (f"one of {', '.join(map(repr, SVD_METHODS))}", "gram", _choice(SVD_METHODS)),
    "num_workers": ("a non-negative integer or null", "2", _integer(0)),
    "save_path": ("a directory path or null", "'{log_dir}/out'", _path),
    "max_shard_size": ("a size such as '5GB' or a positive number of bytes", "2GB", _shard_size),
    "factor_dtype": ("a floating-point torch dtype name or null", "float16",
                     lambda v: str(float_dtype(v)).removeprefix("torch.")),
    "max_memory_gb": ("a positive number", "4.0", _positive),
    **dict.fromkeys(["show_pbar", "print_profile", "lazy_loading", "save_tokenizer", "allow_missing_keys",
                     "routed_eval", "evaluate_finetuned", "full_rank", "rank_revealing"], _BOOL),
}

RENAMED = {"output_dir": "save_path"}
"""Former option names and the option that replaced them."""


def option_names(cls: type) -> List[str]:
    """The options of an algorithm class: the named parameters of its ``__init__``."""
    return [
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _check(owner: str, name: str, value: Any) -> Any:
    """The normalized ``value`` of option ``name``, or a ValueError naming it, with what to write instead."""
    expected, example, convert = OPTION_CHECKS[name]
    if value is None and "null" in expected:
        return None
    try:
        return convert(value)
    except ValueError as e:
        reason = f" ({e})" if str(e) else ""
        raise ValueError(
            f"{owner}: option '{name}' must be {expected}, got {value!r} of type {type(value).__name__}{reason}; "
            f"e.g. {name}={example} in Python, method.{name}={example} on the command line"
        ) from None


def validate_options(algorithm: Any, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the options of ``algorithm`` (already set as attributes by ``auto_register_config``).

    Raises ``TypeError`` for a keyword option the class does not have (FusionBench's base class takes
    ``_usage_``, ``_version_``, ``_recursive_``) and ``ValueError`` for a value out of type or range,
    each naming the option; stores the normalized values and returns the keywords for the base class.
    """
    cls = type(algorithm)
    names = option_names(cls)
    base = next(b for b in cls.__mro__[1:] if "__init__" in vars(b))
    unknown = [k for k in kwargs if k not in option_names(base)]
    if unknown:
        hints = []
        for k in unknown:
            close = [RENAMED[k]] if RENAMED.get(k) in names else difflib.get_close_matches(k, names, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(hints)}; valid options: {', '.join(names)}")
    for name in names:
        setattr(algorithm, name, _check(cls.__name__, name, getattr(algorithm, name)))
    return dict(kwargs)

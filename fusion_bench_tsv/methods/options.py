"""Validation of the options of TSV-M, TSV-C and STI, in one place.

Every algorithm's ``__init__`` calls :func:`validate_options`, which refuses keyword options the class
does not have (naming the option, the valid ones and the closest), checks the type and range of every
option in :data:`OPTION_CHECKS` and stores the normalized value (e.g. an OmegaConf ``ListConfig`` becomes
a list). Errors name the class and the option and say what to write instead, as Python and on the
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
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping

import torch

from ..functional import SVD_METHODS

__all__ = ["OPTION_CHECKS", "float_dtype", "option_names", "validate_options"]


class _Invalid(ValueError):
    """A value an option does not accept; the message says why (the caller adds the option's name)."""


@dataclass(frozen=True)
class OptionCheck:
    """What an option accepts (``expected``), a valid example, and ``convert``: value → normalized value."""

    expected: str
    example: str
    convert: Callable[[Any], Any]
    optional: bool = False

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        try:
            return self.convert(value)
        except _Invalid as e:
            reason = f" ({e})" if str(e) else ""
            raise ValueError(
                f"{owner}: option '{name}' must be {self.expected}, got {value!r} of type "
                f"{type(value).__name__}{reason}; e.g. {name}={self.example} in Python, "
                f"method.{name}={self.example} on the command line"
            ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    """A list given as a list (Python list/tuple or OmegaConf ListConfig), never a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _finite(value: Any) -> float:
    if isinstance(value, str):
        raise _Invalid("a string, not a number: write the number without quotes")
    if not _is_real(value):
        raise _Invalid()
    if not math.isfinite(value):
        raise _Invalid("not finite")
    return float(value)


def _integer(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise _Invalid()
        return int(value)

    return convert


def _in_unit_interval(value: Any) -> float:
    value = _finite(value)
    if not 0 < value <= 1:
        raise _Invalid("outside (0, 1]")
    return value


def _positive(value: Any) -> float:
    value = _finite(value)
    if value <= 0:
        raise _Invalid("not positive")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid()
    return value


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            raise _Invalid(f"did you mean {close[0]!r}?" if close else "")
        return value

    return convert


def _entries(values: Sequence[Any], convert: Callable[[Any], float]) -> List[float]:
    """Every entry of a list converted, the first bad one named by its position."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(convert(v))
        except _Invalid as e:
            raise _Invalid(f"entry {i} is {v!r}{': ' + str(e) if str(e) else ''}") from None
    return out


def _alpha(value: Any) -> Any:
    if _is_list(value):
        if len(value) == 0:
            raise _Invalid("an empty list")
        return _entries(value, _finite)
    if isinstance(value, str):
        raise _Invalid("a string: give a number, or a list of numbers (one per task) as a list")
    return _finite(value)


def _alpha_grid(value: Any) -> List[float]:
    if not _is_list(value) or len(value) == 0:
        raise _Invalid("give the values of alpha to try as a list, e.g. [0.5, 1.0]")
    values = _entries(value, _positive)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise _Invalid(f"{repeated} appear more than once")
    return values


def _taskpool(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip() or value != value.strip():
            raise _Invalid("an empty name, or spaces around it")
        return value
    if isinstance(value, Mapping):
        if "_target_" not in value:
            raise _Invalid("a mapping without _target_: give a task pool config or the name of one")
        return value
    if callable(getattr(value, "evaluate", None)):
        return value  # a task pool instance (from Python)
    raise _Invalid()


def _patterns(value: Any) -> List[str]:
    if isinstance(value, str):
        raise _Invalid(f"a single string would be read as one pattern per character: write [{value!r}]")
    if not _is_list(value) or not all(isinstance(p, str) for p in value):
        raise _Invalid()
    return [str(p) for p in value]


def _device(value: Any) -> str:
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid()
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise _Invalid("not a torch device") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise _Invalid("no CUDA device is available here: use cpu, or null for the Fabric device")
        if device.index is not None and device.index >= count:
            raise _Invalid(f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return value


def _path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid()
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as e:
        raise _Invalid(f"{e}; the only placeholder is {{log_dir}}") from None
    if fields - {"log_dir"}:
        raise _Invalid(f"unknown placeholder(s) {sorted(fields - {'log_dir'})}: the only one is {{log_dir}}")
    return value


def _shard_size(value: Any) -> Any:
    if _is_int(value):
        if value <= 0:
            raise _Invalid("not positive")
        return int(value)
    if not isinstance(value, str):
        raise _Invalid()
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError):
        raise _Invalid("not a size such as 5GB, 500MB or a number of bytes") from None
    if size <= 0:
        raise _Invalid("not positive")
    return value


def float_dtype(value: Any) -> torch.dtype:
    """The floating-point torch dtype named ``value`` (``"float16"``, ``"torch.bfloat16"``, a dtype)."""
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    else:
        dtype = None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _Invalid()
    return dtype


def _dtype_name(value: Any) -> str:
    return str(float_dtype(value)).removeprefix("torch.")


_BOOL = OptionCheck("true or false", "true", _boolean)

OPTION_CHECKS: Dict[str, OptionCheck] = {
    "alpha": OptionCheck("a finite number, a list of finite numbers (one per task) or null (1.0)", "1.0", _alpha,
                         optional=True),
    "alpha_grid": OptionCheck("a list of distinct finite positive numbers or null", "[0.5,1.0]", _alpha_grid,
                              optional=True),
    "validation_taskpool": OptionCheck(
        "a task pool config (with _target_), the name of one, or null",
        "CLIPVisionModelTaskPool/clip-vit-classification_TA8_val",
        _taskpool, optional=True),
    "exclude_keys": OptionCheck("a list of glob patterns or null", "['*text_projection*']", _patterns, optional=True),
    "rank": OptionCheck("a positive integer or null", "16", _integer(1), optional=True),
    "fraction": OptionCheck("a number in (0, 1] or null", "0.125", _in_unit_interval, optional=True),
    "energy": OptionCheck("a number in (0, 1] or null", "0.95", _in_unit_interval, optional=True),
    "device": OptionCheck("a torch device name or null (the Fabric device)", "cpu", _device, optional=True),
    "svd_method": OptionCheck(f"one of {', '.join(map(repr, SVD_METHODS))}", "gram", _choice(SVD_METHODS)),
    "num_workers": OptionCheck("a non-negative integer or null", "2", _integer(0), optional=True),
    "save_path": OptionCheck("a directory path or null", "'{log_dir}/out'", _path, optional=True),
    "max_shard_size": OptionCheck("a size such as '5GB' or a positive number of bytes", "2GB", _shard_size),
    "factor_dtype": OptionCheck("a floating-point torch dtype name or null", "float16", _dtype_name, optional=True),
    "max_memory_gb": OptionCheck("a positive number", "4.0", _positive),
    "show_pbar": _BOOL,
    "print_profile": _BOOL,
    "lazy_loading": _BOOL,
    "save_tokenizer": _BOOL,
    "allow_missing_keys": _BOOL,
    "routed_eval": _BOOL,
    "evaluate_finetuned": _BOOL,
    "full_rank": _BOOL,
    "rank_revealing": _BOOL,
}
"""Every option of TSV-M, TSV-C and STI, by name (an option has the same meaning in each)."""


RENAMED = {"output_dir": "save_path"}
"""Former option names and the option that replaced them."""


def option_names(cls: type) -> List[str]:
    """The options of an algorithm class: the named parameters of its ``__init__``."""
    return [
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _inherited_keywords(cls: type) -> List[str]:
    """Keywords the base classes' ``__init__`` take (FusionBench's ``_usage_``, ``_version_``, ``_recursive_``)."""
    for base in cls.__mro__[1:]:
        if "__init__" in vars(base):
            return option_names(base)
    return []


def validate_options(algorithm: Any, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the options of ``algorithm`` (already set as attributes by ``auto_register_config``).

    Raises ``TypeError`` for a keyword option the class does not have and ``ValueError`` for a value
    out of type or range, each naming the option; stores the normalized values and returns the keywords
    to hand to the base class.
    """
    cls = type(algorithm)
    names = option_names(cls)
    inherited = _inherited_keywords(cls)
    unknown = [k for k in kwargs if k not in inherited]
    if unknown:
        hints = []
        for k in unknown:
            close = [RENAMED[k]] if RENAMED.get(k) in names else difflib.get_close_matches(k, names, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise TypeError(
            f"{cls.__name__}: unknown option(s) {', '.join(hints)}; valid options: {', '.join(names)}"
        )
    for name in names:
        setattr(algorithm, name, OPTION_CHECKS[name](cls.__name__, name, getattr(algorithm, name)))
    return dict(kwargs)

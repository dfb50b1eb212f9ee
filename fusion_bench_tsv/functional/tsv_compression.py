r"""Task Singular Vector Compression (TSV-C): the math and the storage layout.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025 (arXiv:2412.00081). Each task's update of a weight matrix,
$\Delta_i = W_i - W_0$ (``m x n``), is replaced by its top-k singular triplets,

$$\hat\Delta_i = U_k \Sigma_k V_k^\top,
\qquad \|\Delta_i - \hat\Delta_i\|_F^2 = \sum_{j > k} \sigma_j^2,$$

the best rank-k approximation (Eckart-Young). It costs $k(m + n + 1)$ numbers instead
of $mn$. Task i is served by $W_0 + \hat\Delta_i$; every other parameter (biases,
norms, excluded matrices) is kept as the fine-tuned model has it.

Rank per matrix (at most one option; never 0), with $r = \min(m, n)$:

- default: $k = \max(1, \lfloor r / T \rfloor)$ for T tasks (the paper's choice);
- ``fraction`` f in (0, 1]: $k = \max(1, \lfloor f r \rfloor)$;
- ``rank`` k: the same k for every matrix, at most r;
- ``energy`` e in (0, 1]: per task, the smallest k with
  $\sum_{j \le k} \sigma_j^2 \ge e \sum_j \sigma_j^2$.

Storage: ``checkpoint_tensors`` lays the tasks out as one flat tensor dict for a
``.safetensors`` file, ``t{i}/{key}/U`` (m x k), ``t{i}/{key}/S`` (k), ``t{i}/{key}/Vh``
(k x n) and ``t{i}/{key}`` for a parameter kept in full, plus the string metadata of its
header (``FORMAT``, ``VERSION``, the task names, each matrix's shape and k per task
as JSON); ``read_layout`` and ``task_from_tensors`` read it back, checking every
tensor's shape.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "CompressedTask",
    "apply_compressed",
    "check_rank_options",
    "checkpoint_tensors",
    "compress_matrix",
    "energy_rank",
    "factor_numel",
    "fraction_rank",
    "layer_rank",
    "read_layout",
    "reconstruct",
    "storage_accounting",
    "task_from_tensors",
]

FORMAT = "task_singular_vector_compression"
VERSION = "1"
_PARTS = ("U", "S", "Vh")
# slack for floor(f * r): f = 0.3, r = 10 gives 3, not 2 (0.3 * 10 = 2.9999...)
_FLOOR_EPS = 1e-9

Factors = Tuple[Tensor, Tensor, Tensor]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_unit_interval(value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and 0 < value <= 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SVDs run in: float64 stays float64, every other dtype is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rank_options(
    fraction: Optional[float] = None,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
) -> None:
    """At most one of ``fraction``, ``rank``, ``energy``, each in range; else a
    ``ValueError`` naming the option."""
    options = (("fraction", fraction), ("rank", rank), ("energy", energy))
    given = [repr(name) for name, value in options if value is not None]
    if len(given) > 1:
        raise ValueError(f"options {' and '.join(given)} are exclusive: give one")
    if fraction is not None and not _in_unit_interval(fraction):
        raise ValueError(f"option 'fraction' must be in (0, 1], got {fraction!r}")
    if rank is not None and not (_is_int(rank) and rank >= 1):
        raise ValueError(f"option 'rank' must be a positive integer, got {rank!r}")
    if energy is not None and not _in_unit_interval(energy):
        raise ValueError(f"option 'energy' must be in (0, 1], got {energy!r}")


def fraction_rank(shape: Sequence[int], fraction: float) -> int:
    """$\\max(1, \\lfloor f \\min(m, n) \\rfloor)$."""
    check_rank_options(fraction=fraction)
    r = min(shape[-2:])
    return max(1, min(r, math.floor(fraction * r * (1 + _FLOOR_EPS))))


def energy_rank(singular_values: Tensor, energy: float) -> int:
    r"""The smallest k with $\sum_{j \le k} \sigma_j^2 \ge e \sum_j \sigma_j^2$.

    ``singular_values`` descend (as ``torch.linalg.svd`` returns them); the sums are
    taken in float64. A zero update keeps one triplet.
    """
    check_rank_options(energy=energy)
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        shape = tuple(singular_values.shape)
        raise ValueError(f"singular_values must be non-empty and 1-D, got {shape}")
    s = singular_values.detach().to("cpu", torch.float64)
    cumulative = torch.cumsum(s**2, dim=0)
    k = int((cumulative < energy * cumulative[-1]).sum().item()) + 1
    return max(1, min(k, s.numel()))


def layer_rank(
    shape: Sequence[int],
    num_tasks: int,
    *,
    fraction: Optional[float] = None,
    rank: Optional[int] = None,
    name: str = "matrix",
) -> int:
    """k of a matrix of ``shape`` for T = ``num_tasks``: the default
    $\\max(1, \\lfloor \\min(m, n) / T \\rfloor)$, ``fraction`` or ``rank``.

    A ``rank`` above ``min(m, n)`` is a ``ValueError`` naming the parameter ``name``.
    """
    check_rank_options(fraction=fraction, rank=rank)
    if not (_is_int(num_tasks) and num_tasks >= 1):
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    r = min(shape[-2:])
    if rank is not None:
        if rank > r:
            raise ValueError(
                f"option 'rank'={rank} exceeds the rank of parameter '{name}' of "
                f"shape {tuple(shape)} (at most {r})"
            )
        return rank
    if fraction is not None:
        return fraction_rank(shape, fraction)
    return max(1, r // num_tasks)


def compress_matrix(
    delta: Tensor, k: Optional[int] = None, *, energy: Optional[float] = None
) -> Factors:
    r"""Top-k singular triplets $(U_k, \sigma_{1..k}, V_k^\top)$ of ``delta``.

    Exactly one of ``k`` (``1 <= k <= min(m, n)``) and ``energy`` (``energy_rank``
    on the same decomposition). The thin SVD runs in float64 for float64 input and in
    float32 otherwise; the factors are returned contiguous, in ``delta``'s dtype.
    """
    if (k is None) == (energy is None):
        raise ValueError("compress_matrix needs exactly one of 'k' and 'energy'")
    if delta.dim() != 2:
        raise ValueError(f"delta must be a 2-D matrix, got {tuple(delta.shape)}")
    r = min(delta.shape)
    if k is not None and not (_is_int(k) and 1 <= k <= r):
        raise ValueError(
            f"rank k={k} is out of range for {tuple(delta.shape)} (1..{r})"
        )
    work = compute_dtype(delta.dtype)
    U, S, Vh = torch.linalg.svd(delta.to(work), full_matrices=False)
    k = energy_rank(S, energy) if k is None else k
    factors = (U[:, :k], S[:k], Vh[:k, :])  # copies: the full SVD is freed
    return tuple(
        f.to(delta.dtype).clone(memory_format=torch.contiguous_format) for f in factors
    )


def reconstruct(factors: Factors) -> Tensor:
    r"""$U \operatorname{diag}(S) V^\top$, in the factors' dtype."""
    U, S, Vh = factors
    return (U * S) @ Vh


def factor_numel(shape: Sequence[int], k: int) -> int:
    """Numbers stored for k triplets of an ``m x n`` matrix: ``k (m + n + 1)``."""
    m, n = shape[-2:]
    return k * (m + n + 1)


@dataclass
class CompressedTask:
    """One task: ``factors`` (U, S, Vh) of its matrices, ``others`` kept in full."""

    name: str
    factors: Dict[str, Factors] = field(default_factory=dict)
    others: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def ranks(self) -> Dict[str, int]:
        return {key: int(f[1].numel()) for key, f in self.factors.items()}

    def tensors(self, prefix: str) -> Dict[str, Tensor]:
        """The task's tensors under their names in the file (``prefix``: ``t{i}``)."""
        out = {}
        for key, factors in self.factors.items():
            for part, value in zip(_PARTS, factors):
                out[f"{prefix}/{key}/{part}"] = value
        for key, value in self.others.items():
            out[f"{prefix}/{key}"] = value
        return out


def apply_compressed(
    base_state: Mapping[str, Tensor], task: CompressedTask, device=None
) -> Dict[str, Tensor]:
    """A new state dict: $W_0 + U \\operatorname{diag}(S) V^\\top$ on the
    compressed matrices, the stored values elsewhere, ``base_state``'s other entries.

    The sum is formed on ``device`` (default: the parameter's) in float32 (float64 for
    float64 parameters) and cast to each parameter's dtype. Inputs are not modified.
    """
    out: Dict[str, Tensor] = {}
    for key, base in base_state.items():
        dev = base.device if device is None else torch.device(device)
        work = compute_dtype(base.dtype)
        if key in task.factors:
            delta = reconstruct(tuple(f.to(dev, work) for f in task.factors[key]))
            out[key] = (base.to(dev, work) + delta).to(base.device, base.dtype)
        elif key in task.others:
            out[key] = task.others[key].to(base.device, base.dtype, copy=True)
        else:
            out[key] = base.clone()
    return out


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def storage_accounting(
    params: Mapping[str, Tuple[Sequence[int], torch.dtype]],
    ranks: Sequence[Mapping[str, int]],
    factor_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Parameters and bytes stored for T tasks versus T full task vectors and one model.

    ``params``: the model's floating-point parameters, ``key -> (shape, dtype)``;
    ``ranks``: per task, ``matrix key -> k`` (its other parameters are stored in full);
    ``factor_dtype``: the factors' dtype (default: each matrix's own). A compressed
    matrix costs ``factor_numel`` numbers, anything else its size.
    """
    model_params = sum(_numel(shape) for shape, _ in params.values())
    model_bytes = sum(_numel(s) * _itemsize(d) for s, d in params.values())
    matrix_keys = set().union(*ranks) if ranks else set()
    matrix_params = sum(_numel(params[key][0]) for key in matrix_keys)
    factor_params = factor_bytes = other_params = other_bytes = 0
    for task_ranks in ranks:
        for key, (shape, dtype) in params.items():
            if key in task_ranks:
                n = factor_numel(shape, task_ranks[key])
                factor_params += n
                factor_bytes += n * _itemsize(factor_dtype or dtype)
            else:
                other_params += _numel(shape)
                other_bytes += _numel(shape) * _itemsize(dtype)
    stored_bytes = factor_bytes + other_bytes
    full_bytes = len(ranks) * model_bytes
    return {
        "num_tasks": len(ranks),
        "stored": {
            "params": factor_params + other_params,
            "bytes": stored_bytes,
            "matrix_factor_params": factor_params,
            "matrix_factor_bytes": factor_bytes,
            "other_params": other_params,
            "other_bytes": other_bytes,
        },
        "full_task_vectors": {"params": len(ranks) * model_params, "bytes": full_bytes},
        "one_model": {
            "params": model_params,
            "bytes": model_bytes,
            "matrix_params": matrix_params,
        },
        "stored_over_full_task_vectors": (
            stored_bytes / full_bytes if full_bytes else None
        ),
        "stored_over_one_model": stored_bytes / model_bytes if model_bytes else None,
        "matrix_factors_over_one_model_matrices": (
            factor_params / matrix_params if matrix_params else None
        ),
    }


def checkpoint_tensors(
    tasks: Sequence[CompressedTask],
) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` of ``tasks`` for ``safetensors.torch.save_file``.

    The tasks must have unique names and the same parameters; metadata: ``format``,
    ``version``, ``tasks`` (JSON list of names, task i's tensors start with ``t{i}/``),
    ``matrices`` (JSON ``{key: {"shape": [m, n], "k": [k per task]}}``) and ``others``
    (JSON ``{key: shape}``).
    """
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ValueError(f"tasks need unique names, got {names}")
    first = tasks[0]
    for t in tasks:
        if set(t.factors) != set(first.factors) or set(t.others) != set(first.others):
            raise ValueError(
                f"task '{t.name}' has other parameters than '{first.name}'"
            )
    tensors: Dict[str, Tensor] = {}
    for i, task in enumerate(tasks):
        tensors.update(task.tensors(f"t{i}"))
    matrices = {
        key: {"shape": [U.shape[0], Vh.shape[1]], "k": [t.ranks[key] for t in tasks]}
        for key, (U, _, Vh) in first.factors.items()
    }
    others = {key: list(value.shape) for key, value in first.others.items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "tasks": json.dumps(names),
        "matrices": json.dumps(matrices),
        "others": json.dumps(others),
    }
    return tensors, metadata


def _shape_ok(value, dims: Optional[int] = None) -> bool:
    return (
        isinstance(value, list)
        and all(_is_int(s) and s >= 0 for s in value)
        and (dims is None or len(value) == dims)
    )


def read_layout(metadata: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """The decoded layout (``tasks``, ``matrices``, ``others``) of a file's metadata,
    checked; a ``ValueError`` naming the entry that is missing or malformed."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        found = (metadata.get("format"), metadata.get("version"))
        raise ValueError(f"not a {FORMAT} file of version {VERSION}: found {found}")
    layout = {}
    for entry in ("tasks", "matrices", "others"):
        try:
            layout[entry] = json.loads(metadata[entry])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"metadata entry '{entry}' is missing or not JSON") from e
    tasks, matrices = layout["tasks"], layout["matrices"]
    if not (
        isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)
    ):
        raise ValueError(f"metadata entry 'tasks' is not a list of names: {tasks!r}")
    if len(set(tasks)) != len(tasks) or not isinstance(matrices, dict):
        raise ValueError("metadata entries 'tasks' or 'matrices' are malformed")
    for key, meta in matrices.items():
        ks = meta.get("k") if isinstance(meta, dict) else None
        ok = (
            isinstance(ks, list)
            and len(ks) == len(tasks)
            and _shape_ok(meta["shape"], 2)
        )
        if not (ok and all(_is_int(k) and 1 <= k <= min(meta["shape"]) for k in ks)):
            raise ValueError(
                f"metadata 'matrices' entry '{key}' is malformed: {meta!r}"
            )
    others = layout["others"]
    if not (isinstance(others, dict) and all(map(_shape_ok, others.values()))):
        raise ValueError(f"metadata entry 'others' is malformed: {others!r}")
    return layout


def task_from_tensors(
    layout: Mapping[str, Any], task: str, get_tensor: Callable[[str], Tensor]
) -> CompressedTask:
    """Task ``task`` of a file with ``layout`` (``read_layout``), its tensors read
    one by one with ``get_tensor(name)`` (e.g. ``safe_open(...).get_tensor``).

    A task not in the file is a ``KeyError``; a tensor of another shape than the layout
    says a ``ValueError`` naming it.
    """
    if task not in layout["tasks"]:
        raise KeyError(f"task '{task}' is not in the file; it has {layout['tasks']}")
    index = layout["tasks"].index(task)
    out = CompressedTask(task)

    def read(name: str, shape: List[int]) -> Tensor:
        value = get_tensor(f"t{index}/{name}")
        if list(value.shape) != list(shape):
            raise ValueError(
                f"task '{task}': tensor 't{index}/{name}' has shape "
                f"{list(value.shape)}, the metadata says {list(shape)}"
            )
        return value

    for key, meta in layout["matrices"].items():
        (m, n), k = meta["shape"], meta["k"][index]
        shapes = ([m, k], [k], [k, n])
        out.factors[key] = tuple(read(f"{key}/{p}", s) for p, s in zip(_PARTS, shapes))
    for key, shape in layout["others"].items():
        out.others[key] = read(key, shape)
    return out

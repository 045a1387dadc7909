"""Checkpoint loading: sharded safetensors, memory-mapped, bound to modules by the official key names.

One strict loader (STYLE.md §11): the model's ``named_parameters()`` (after its prefix renames) is the
checkpoint layout. Unknown, missing and mis-shaped tensors are reported together in one
:class:`WeightsMismatchError`; the model's known-dead tensors are accepted and never read. Each tensor is cast
to the engine dtype once, while it is copied out of the memory map. A model may declare tensors of which it
reads only some rows (the 1/8 slice of each quantizer table): only those rows leave the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

__all__ = [
    "DTYPE_NAMES",
    "ENGINE_DTYPES",
    "CheckpointError",
    "SafetensorsCheckpoint",
    "WeightsMismatchError",
    "available_device",
    "build_model",
    "checkpoint_key",
    "default_device",
    "engine_placement",
    "load_weights",
    "parse_dtype",
    "resolve_dtype",
]

INDEX_FILE = "model.safetensors.index.json"
ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The names transformers/diffusers users write for a dtype (``torch_dtype="bfloat16"``, config.json's
# ``"torch_dtype"``), with the usual short forms.
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_device() -> torch.device:
    """The device used when none is given: CUDA when available, else CPU. Every implicit device choice
    of kelix_fast goes through here, so that the tests can forbid it (tests/conftest.py)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(value: torch.dtype | str | None, *, arg: str = "dtype") -> torch.dtype | None:
    """A dtype argument -> ``torch.dtype`` (None stays None): a ``torch.dtype`` or one of
    :data:`DTYPE_NAMES` (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...; a ``"torch."`` prefix is
    accepted). Raises TypeError/ValueError naming ``arg``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a torch.dtype or a dtype name, got {type(value).__name__}")
    dtype = DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(
            f"{arg} must be a torch.dtype or one of {list(DTYPE_NAMES)}, got {value!r}"
        )
    return dtype


def resolve_dtype(
    dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None, *, owner: str
) -> torch.dtype | None:
    """``dtype=`` and its transformers/diffusers alias ``torch_dtype=`` -> one parsed dtype (None when
    neither is given). Raises ValueError, naming both, when both are given."""
    if dtype is not None and torch_dtype is not None:
        raise ValueError(
            f"{owner}: give dtype or torch_dtype (its alias), not both; got dtype={dtype!r} and "
            f"torch_dtype={torch_dtype!r}"
        )
    if torch_dtype is not None:
        return parse_dtype(torch_dtype, arg=f"{owner}: torch_dtype")
    return parse_dtype(dtype, arg=f"{owner}: dtype")


def available_device(device: torch.device | str, *, arg: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine (a CUDA device needs CUDA and
    its index below the device count). Raises ValueError naming ``arg``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{arg} must name a torch device (e.g. 'cuda', 'cpu'), got {device!r}"
        ) from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg}={device!r}, but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{arg}={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return parsed


def engine_placement(
    device: torch.device | str | None, dtype: torch.dtype | str | None, *, owner: str
) -> tuple[torch.device, torch.dtype]:
    """Where weights live: ``device`` (default :func:`default_device`) and ``dtype`` (a ``torch.dtype`` or
    a name of :data:`DTYPE_NAMES`; default bfloat16 on CUDA, float32 elsewhere). Raises ValueError, naming
    ``owner``, for an unsupported dtype."""
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype, arg=f"{owner}: dtype")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"{owner}: dtype must be float32, bfloat16 or float16, got {dtype}")
    return device, dtype


class WeightsMismatchError(ValueError):
    """The checkpoint does not match the model; lists every unknown, missing and mis-shaped tensor."""

    def __init__(
        self,
        *,
        unknown: Sequence[str] = (),
        missing: Sequence[str] = (),
        wrong_shape: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        self.unknown, self.missing, self.wrong_shape = (
            list(unknown),
            list(missing),
            list(wrong_shape),
        )
        lines = ["checkpoint does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unknown:
            lines.append(f"  unexpected keys ({len(self.unknown)}): {', '.join(self.unknown)}")
        for key, got, want in self.wrong_shape:
            lines.append(
                f"  wrong shape: {key}: checkpoint {list(got)}, model expects {list(want)}"
            )
        super().__init__("\n".join(lines))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read: an invalid ``model.safetensors.index.json`` (not
    JSON, no ``weight_map``, an entry that is not a file name inside the checkpoint directory), a corrupt or
    truncated safetensors file, or a tensor of the wrong kind (integer/bool where a floating-point parameter
    is expected) or holding NaN/Inf. The message names the file (and the key, where one is at fault)."""


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of ``index`` (tensor key -> file name), checked to be a JSON object of strings.
    Raises CheckpointError naming ``index`` and what is wrong."""
    try:
        with open(index, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"weights: {index} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"weights: {index} must hold a JSON object, got {type(raw).__name__}")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"weights: {index} has no 'weight_map' object (got {type(weight_map).__name__})"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f"weights: {index}: weight_map[{key!r}] must be a file name (a non-empty string), "
                f"got {name!r}"
            )
    return weight_map


def _index_file(root: Path, index: Path, key: str, name: str) -> Path:
    """``root / name`` for the entry ``key: name`` of ``index``, refused (CheckpointError naming the index,
    the key and the path) when ``name`` is absolute or leads outside ``root``. Symlinked directories are
    resolved; the file itself may be a symlink (a Hugging Face cache snapshot links every file into its
    ``blobs/``), the index only chooses among the files of the directory."""
    entry = Path(name)
    path = root / entry
    if entry.is_absolute() or os.path.isabs(name) or entry.drive:
        problem = "is an absolute path"
    elif entry.name in ("", ".", ".."):
        problem = "does not name a file"
    elif not path.parent.resolve().is_relative_to(root.resolve()):
        problem = "resolves outside the checkpoint directory"
    else:
        return path
    raise CheckpointError(
        f"weights: {index}: weight_map[{key!r}] = {name!r} {problem} (checkpoint directory: "
        f"{root}); refusing to open it"
    )


class SafetensorsCheckpoint:
    """Every ``*.safetensors`` file of a directory (or those named by ``model.safetensors.index.json``).

    Files are opened memory-mapped; nothing is read until :meth:`get`/:meth:`get_rows`. Every path of the
    index must stay inside the directory; an invalid index or an unreadable file raises
    :class:`CheckpointError` naming the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        weight_map: dict[str, str] | None = None
        if root.is_file():
            files = [root]
            root = root.parent
        elif (root / INDEX_FILE).is_file():
            index = root / INDEX_FILE
            weight_map = _read_index(index)
            by_name = {
                name: _index_file(root, index, key, name) for key, name in weight_map.items()
            }
            files = [by_name[name] for name in sorted(by_name)]
        else:
            files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"weights: no *.safetensors file in {root}")
        self._files: dict[str, object] = {}
        self._where: dict[str, object] = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"weights: {file} (named by {INDEX_FILE}) does not exist")
            try:
                handle = safe_open(str(file), framework="pt")
                keys = list(handle.keys())  # a safe_open handle is not iterable
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(
                    f"weights: {file} is not a readable safetensors file (corrupt or truncated?): "
                    f"{exc}"
                ) from None
            self._files[str(file)] = handle
            for key in keys:
                if key in self._where:
                    raise ValueError(
                        f"weights: tensor {key!r} appears in more than one file ({file})"
                    )
                self._where[key] = handle
                self._file_of[key] = str(file)
        if weight_map is not None:
            absent = sorted(weight_map.keys() - self._where.keys())
            if absent:
                raise ValueError(
                    f"weights: {INDEX_FILE} lists tensors absent from the files: {absent}"
                )

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __iter__(self):
        return iter(self.keys())

    def file_of(self, key: str) -> str:
        """The file holding tensor ``key``."""
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        with self._reading(key):
            return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        with self._reading(key):
            return self._where[key].get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` without reading the rest of the tensor."""
        with self._reading(key):
            return self._where[key].get_slice(key)[start:stop]

    @contextlib.contextmanager
    def _reading(self, key: str):
        """A failure of the safetensors reader on ``key`` -> CheckpointError naming file and key."""
        try:
            yield
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"weights: {self._file_of[key]}: cannot read tensor {key!r} (corrupt or "
                f"truncated?): {exc}"
            ) from None


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_weights(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
    *,
    dead: Collection[str] = (),
    renames: Sequence[tuple[str, str]] = (),
    partial_rows: Mapping[str, tuple[int, int]] = {},
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """Bind checkpoint tensors to ``model``'s parameters by name, strictly, casting once to ``dtype``.

    Args:
        model: built on the ``meta`` device (or any device); its parameters are replaced.
        checkpoint: an opened checkpoint or a plain ``{key: tensor}`` mapping (official key names).
        dead: checkpoint keys that are accepted and dropped unread.
        renames: ``(checkpoint prefix, module prefix)`` pairs, first match wins.
        partial_rows: checkpoint key -> ``(start, stop)``: the parameter receives only those rows (its
            declared shape is still the full checkpoint shape, which is what gets validated).

    Raises:
        WeightsMismatchError: listing every unknown, missing and mis-shaped tensor.
        CheckpointError: naming the file and key of the first tensor of the wrong kind (not floating
            point where the parameter is) or holding NaN/Inf (after the cast to ``dtype``), or one
            that cannot be read.
    """
    if isinstance(checkpoint, SafetensorsCheckpoint):
        shapes = {key: checkpoint.shape(key) for key in checkpoint}
    else:
        shapes = {key: tuple(t.shape) for key, t in checkpoint.items()}
    params = dict(model.named_parameters())
    by_param = {_rename(key, renames): key for key in shapes if key not in dead}
    unknown = sorted(key for name, key in by_param.items() if name not in params)
    missing = sorted(checkpoint_key(name, renames) for name in params if name not in by_param)
    wrong = sorted(
        (key, shapes[key], tuple(params[name].shape))
        for name, key in by_param.items()
        if name in params and shapes[key] != tuple(params[name].shape)
    )
    if unknown or missing or wrong:
        raise WeightsMismatchError(unknown=unknown, missing=missing, wrong_shape=wrong)

    modules = dict(model.named_modules())
    for name, key in by_param.items():
        rows = partial_rows.get(key)
        if isinstance(checkpoint, SafetensorsCheckpoint):
            source = checkpoint.file_of(key)
            value = checkpoint.get(key) if rows is None else checkpoint.get_rows(key, *rows)
        else:
            source = "the weights mapping"
            value = checkpoint[key] if rows is None else checkpoint[key][rows[0] : rows[1]]
        if value.is_floating_point() != params[name].is_floating_point():
            want = "floating point" if params[name].is_floating_point() else str(params[name].dtype)
            raise CheckpointError(
                f"weights: {source}: tensor {key!r} has dtype {value.dtype}, the model expects "
                f"{want}"
            )
        target = dtype if value.is_floating_point() else value.dtype
        value = value.to(device=device, dtype=target, copy=True)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"weights: {source}: tensor {key!r} holds NaN or Inf values (checked after the "
                f"cast to {dtype})"
            )
        owner, _, attr = name.rpartition(".")
        setattr(modules[owner], attr, nn.Parameter(value, requires_grad=False))


def checkpoint_key(param: str, renames: Sequence[tuple[str, str]]) -> str:
    """The checkpoint key of module parameter ``param`` (inverse of the load-time renames)."""
    for old, new in renames:
        if param.startswith(new):
            return old + param[len(new) :]
    return param


def build_model(
    make: Callable[[], nn.Module],
    checkpoint: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    dead: Collection[str] = (),
    renames: Sequence[tuple[str, str]] = (),
    partial_rows: Callable[[nn.Module], Mapping[str, tuple[int, int]]] | None = None,
) -> nn.Module:
    """The one loading path of every model: ``make()`` on the meta device (no memory), the checkpoint's
    tensors bound by name (:func:`load_weights`, cast once to ``dtype`` on ``device``), then the model's
    ``process_weights_after_loading()`` if it has one (derived tensors, e.g. codebooks and RoPE tables)
    and eval mode. ``partial_rows(model)`` names the tensors of which only some rows are read."""
    with torch.device("meta"):
        model = make()
    load_weights(
        model,
        checkpoint,
        dead=dead,
        renames=renames,
        partial_rows={} if partial_rows is None else partial_rows(model),
        device=device,
        dtype=dtype,
    )
    process = getattr(model, "process_weights_after_loading", None)
    if process is not None:
        with torch.inference_mode():
            process()
    return model.eval()

r"""Saving and loading: component files, atomic writes, and files that never unpickle code.

A component file (:func:`save_component`, :func:`load_component`; a whole translator is read
back with :func:`load_translator`) holds

* a JSON **config** ``{"format_version": 3, "component": {"class": <name>, "config": {...}}}``
  written by :func:`plasticine.core.to_json`: every component declares its configuration on its
  class (:class:`plasticine.core.Configurable`), so the file rebuilds it, nested components
  included (a translator's six parts, a learned registration's network and integrator), with
  no list of classes kept here (see :doc:`/configuration`);
* the **weights**, the ``state_dict`` of the component when it is an ``nn.Module`` (a
  translator's ``"denoiser.*"``, ``"registration.network.*"``, ...), as a flat ``name -> tensor`` map.

Two formats, chosen by the file name: ``.safetensors`` (the config in the header's metadata; needs the
``safetensors`` package) and ``.pt`` / ``.pth`` (a plain dict of strings and tensors written by
:func:`torch.save` and read back with ``torch.load(weights_only=True)``). Neither can execute code
on load: safetensors holds only raw tensors and strings, and the restricted unpickler of
``weights_only=True`` refuses every object that is not a tensor, a number, a string or a container
of those, so a file with a pickled object raises :class:`CheckpointError` instead of running it.
Rebuilding from the config only calls the constructors of registered classes with plain values.

**Versions.** :data:`FORMAT_VERSION` is 3. A component file of an earlier version (the
translator files of versions 1 and 2 kept their config in a layout of their own) is refused
with a :class:`CheckpointError` that names the file and its version; its weights still read
with :func:`load_tensors`. Files of :func:`save_tensors` of any version load.

**Integrity and finiteness.** Every file records the sha256 of what it holds (since format
version 2): for :func:`save_tensors` the config text and, in name order, every tensor's name,
dtype, shape and raw bytes; for :func:`save_state` the whole nested state the same way (a
canonical description of its structure and plain values, then the tensors' raw bytes in that
order, see :func:`fingerprint`). The loaders recompute it and raise :class:`CheckpointError`
``"... integrity check failed ..."`` naming the file when it differs, so a corrupted file never
loads. Files of :func:`save_tensors` written by format version 1 (before the hash; they record
``version`` 1 and no hash) still load, unverified; a training state without a hash is refused
(such states are scratch files of a run: delete it to start over). Floating (and complex)
tensors must be finite: saving one with a NaN or inf value, or loading one, raises
:class:`CheckpointError` naming the file and the tensor.

Writes are atomic (:func:`atomic_write`): the bytes go to a temporary file in the same folder, are
flushed and ``fsync``-ed, and the file is moved over the destination with :func:`os.replace`, so an
interrupted save leaves the old file intact and never a truncated one. The temporaries a killed
write left for the same destination are removed by the next successful write, and files get the
permissions that :func:`open` would give them (``0o666`` less the umask).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .core.config import ConfigError, from_json, to_json

if TYPE_CHECKING:  # pragma: no cover
    from .translator import TraceableTranslator

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_component",
    "load_component",
    "load_translator",
    "atomic_write",
    "save_tensors",
    "load_tensors",
    "save_state",
    "load_state",
    "fingerprint",
]

#: The version written into every file; component files of another version are refused.
FORMAT_VERSION = 3
_CONFIG_KEY = "plasticine_config"
_HASH_KEY = "plasticine_sha256"


class CheckpointError(ValueError):
    """A checkpoint could not be written or read (a bad or refused file, a config that does not rebuild).

    Shape:
        Not applicable.
    """


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: config keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    raise CheckpointError(f"{where}: config values must be JSON data (None, bool, int, float, str, list, dict), got {type(value).__name__}")


def save_component(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write a component (a translator, a network, a sampler, ...) to one file: its config and weights.

    The config is :func:`plasticine.core.to_json` of ``obj``, the weights ``obj.state_dict()``
    when it is an ``nn.Module`` (none otherwise); written atomically by :func:`save_tensors`.

    Args:
        obj: a :class:`~plasticine.core.Configurable` component.
        path: the file, ``.safetensors``, ``.pt`` or ``.pth``.

    Returns:
        The path.

    Raises:
        CheckpointError: naming the file, for a part that cannot be written into a config (not
            :class:`~plasticine.core.Configurable`), an unknown suffix or a non-finite weight;
            nothing is written then.

    Shape:
        Not applicable.
    """
    try:
        spec = to_json(obj)
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot save: {err}") from err
    tensors = obj.state_dict() if isinstance(obj, nn.Module) else {}
    return save_tensors(path, tensors, {"format_version": FORMAT_VERSION, "component": spec})


def _import_shipped() -> None:
    """Import plasticine's component packages and the translator, so that their classes are registered by name."""
    from . import diffusion, losses, registration, segmentation, translator  # noqa: F401


def _load_weights(obj: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` into ``obj`` strictly, after a check that names the first mismatch in one line."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # weights saved in another floating dtype (translator.to(torch.float64)) load as saved
        obj.to(dtype=next(iter(dtypes)))
    want = obj.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not match the config: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, value in tensors.items():
        if value.shape != want[key].shape or value.dtype != want[key].dtype:
            raise CheckpointError(
                f"{path}: the weights do not match the config: {key}: expected {want[key].dtype} of shape {tuple(want[key].shape)}, "
                f"got {value.dtype} of shape {tuple(value.shape)}"
            )
    obj.load_state_dict(tensors, strict=True)


def load_component(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", expected: type | None = None) -> Any:
    """Rebuild what :func:`save_component` wrote, weights included; never unpickles code.

    The file is read and verified by :func:`load_tensors`; the component is rebuilt by
    :func:`plasticine.core.from_json` (plasticine's own classes are registered first; a class of
    yours must be imported before), moved to ``map_location``, given the saved weights (a module
    also takes their floating dtype) and put in evaluation mode.

    Args:
        path: the file.
        map_location: where the weights go.
        expected: the class the component must be an instance of (e.g.
            :class:`~plasticine.translator.TraceableTranslator`), or None for any.

    Returns:
        The component.

    Raises:
        CheckpointError: naming the file, for a missing, malformed, unsafe or corrupted file, one
            of another format version, a config that does not rebuild (a class not registered,
            an argument refused), a component of another class than ``expected``, or weights that
            do not fit the rebuilt component (the first mismatching key).

    Shape:
        Not applicable.
    """
    path = Path(path)
    tensors, config = load_tensors(path, map_location)
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION or "component" not in config:
        shown = "unknown" if version is None else version
        raise CheckpointError(
            f"{path}: a checkpoint of format version {shown}; this plasticine reads component checkpoints of format "
            f"version {FORMAT_VERSION} (configs declared on the classes) only. Its weights still read with "
            "plasticine.checkpoint.load_tensors: load them into the rebuilt component with load_state_dict, then save it again"
        )
    _import_shipped()
    try:
        obj = from_json(config["component"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    if expected is not None and not isinstance(obj, expected):
        raise CheckpointError(f"{path}: expected a {expected.__name__} checkpoint, the file holds a {type(obj).__name__}")
    if isinstance(obj, nn.Module):
        obj.to(map_location)
        _load_weights(obj, tensors, path)
        obj.eval()
    elif tensors:
        raise CheckpointError(f"{path}: the file holds {len(tensors)} weight tensor(s), but a {type(obj).__name__} has no weights")
    return obj


def load_translator(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> "TraceableTranslator":
    """Read a translator written by :func:`save_component`, weights included, in evaluation mode.

    :func:`load_component` with ``expected=TraceableTranslator``.

    Args:
        path: the file.
        map_location: where the weights go.

    Returns:
        The :class:`~plasticine.translator.TraceableTranslator`.

    Raises:
        CheckpointError: naming the file, as :func:`load_component`, and for a file that holds
            another kind of component.

    Shape:
        Not applicable.
    """
    from .translator import TraceableTranslator

    return load_component(path, map_location, expected=TraceableTranslator)


# -- files ----------------------------------------------------------------------------------------


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new file ``.{name}.XXXXXXXX.tmp`` in ``folder``, opened for writing with mode ``0o666`` less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot write {folder / name}: no free temporary name .{name}.XXXXXXXX.tmp in {folder}")  # pragma: no cover


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove the temporaries of earlier writes of ``folder / name`` that were interrupted."""
    pattern = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")  # also what tempfile.mkstemp made
    try:
        entries = list(os.scandir(folder))
    except OSError:  # pragma: no cover - the folder became unreadable
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:  # pragma: no cover - removed meanwhile, or not ours to remove
                pass


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    The temporary file is ``.{name}.XXXXXXXX.tmp`` next to ``path``, created with the permissions
    :func:`open` gives a new file (``0o666`` less the process umask), so the result has them too.
    After a successful write, temporaries of the same destination left by interrupted (killed)
    writes are removed; those of other files are kept. Two processes writing the same file at once
    are not supported (one of them may fail; the file is never truncated).

    Args:
        path: destination file (its folder must exist).
        data: the bytes.

    Returns:
        The path.

    Raises:
        CheckpointError: when the folder does not exist.

    Shape:
        Not applicable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {path}: the folder {folder} does not exist")
    fd, tmp = _create_temporary(folder, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    _remove_stale_temporaries(folder, path.name)
    return path


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "torch"
    raise CheckpointError(f"{path}: expected a file name ending in .safetensors, .pt or .pth, got {path.name!r}")


def _describe(obj: Any, name: str, tensors: list[tuple[str, torch.Tensor]]) -> Any:
    """A canonical JSON description of a nested value; its tensors are appended to ``tensors`` in order."""
    if isinstance(obj, torch.Tensor):
        tensors.append((name, obj))
        return {"tensor": [str(obj.dtype), list(obj.shape)]}
    if isinstance(obj, Mapping):
        keyed = sorted(((json.dumps(_describe(k, "", []), sort_keys=True), k, v) for k, v in obj.items()), key=lambda item: item[0])
        return {"dict": [[kd, _describe(v, f"{name}.{k}" if name else str(k), tensors)] for kd, k, v in keyed]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_describe(v, f"{name}[{i}]", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        return {"set": sorted(json.dumps(_describe(v, "", []), sort_keys=True) for v in obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return [type(obj).__name__, obj]
    return [type(obj).__qualname__, repr(obj)]  # floats (repr is exact), dtypes, devices, bytes


def _raw_bytes(t: torch.Tensor) -> Any:
    flat = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def fingerprint(obj: Any, text: str = "") -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """The sha256 of ``text`` and ``obj``, and the tensors ``obj`` holds: what the files record.

    ``obj`` is described canonically (its structure, plain values, and every tensor's dtype and
    shape, dict keys sorted), the description hashed after ``text``, then every tensor's raw bytes
    in that order. Equal content gives an equal hash whatever the device or memory layout; used
    for the files of this module and for the data fingerprint of a training run.

    Args:
        obj: nested dicts, lists, tuples and sets of tensors and plain values.
        text: text hashed first (a file's config).

    Returns:
        ``(hex digest, [(name, tensor), ...])``, the tensors named by their path in ``obj``.

    Shape:
        Not applicable.
    """
    tensors: list[tuple[str, torch.Tensor]] = []
    description = json.dumps(_describe(obj, "", tensors), sort_keys=True)
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass") + b"\0" + description.encode("utf-8", "surrogatepass"))
    for _, t in tensors:
        h.update(_raw_bytes(t))
    return h.hexdigest(), tensors


def _check_finite(tensors: list[tuple[str, torch.Tensor]], where: str) -> None:
    for name, t in tensors:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; a checkpoint must hold finite values")


def _verify(path: Path, obj: Any, text: str, recorded: Any, legacy: bool) -> list[tuple[str, torch.Tensor]]:
    """Check the recorded hash (absent only in a legacy file) and finiteness; return the tensors."""
    try:
        actual, tensors = fingerprint(obj, text)
    except (RecursionError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: integrity check failed: the content cannot be described ({type(err).__name__}: {err})") from err
    if recorded is None and not legacy:
        raise CheckpointError(f"{path}: integrity check failed: the file records no sha256 (key {_HASH_KEY!r}), expected one (format version {FORMAT_VERSION})")
    if recorded is not None and recorded != actual:
        shown = recorded[:16] if isinstance(recorded, str) else repr(recorded)[:16]
        raise CheckpointError(f"{path}: integrity check failed: the content's sha256 is {actual[:16]}..., the file records {shown}...; the file is corrupted")
    _check_finite(tensors, f"{path}: refused to load")
    return tensors


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write a flat tensor map and a JSON config to one file, atomically, with their sha256.

    The format follows the file name: ``.safetensors`` (config and hash in the header metadata) or
    ``.pt``/``.pth`` (``{"format": "plasticine", "version", "config": json, "tensors": {...},
    "sha256"}`` by :func:`torch.save`). Tensors are written contiguous, on the CPU. The hash covers
    the config text and every tensor's name, dtype, shape and raw bytes (see the module docstring).

    Args:
        path: the file.
        tensors: ``name -> tensor``; floating tensors must be finite.
        config: JSON data.

    Returns:
        The path.

    Raises:
        CheckpointError: for an unknown suffix, a missing ``safetensors`` package, a config that
            is not JSON data, or a tensor with a NaN or inf value (nothing is written then).

    Shape:
        Not applicable.
    """
    path = Path(path)
    fmt = _format_of(path)
    text = json.dumps(_jsonable(dict(config), "config"), sort_keys=True)
    flat = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"tensor {k!r}: expected a torch.Tensor, got {type(t).__name__}")
        flat[k] = t.detach().to("cpu").contiguous()
    digest, described = fingerprint(flat, text)
    _check_finite(described, f"{path}: refused to write")
    if fmt == "safetensors":
        try:
            from safetensors.torch import save as st_save
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise CheckpointError(f"{path}: writing .safetensors needs the safetensors package (pip install safetensors), or use a .pt file") from err
        # safetensors refuses tensors that share memory; give every entry its own storage
        data = st_save({k: v.clone() for k, v in flat.items()}, metadata={_CONFIG_KEY: text, "format_version": str(FORMAT_VERSION), _HASH_KEY: digest})
    else:
        buf = io.BytesIO()
        torch.save({"format": "plasticine", "version": FORMAT_VERSION, "config": text, "tensors": flat, "sha256": digest}, buf)
        data = buf.getvalue()
    return atomic_write(path, data)


def _safe_torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain data "
            f"(loading never unpickles code). Details: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, storage sizes)
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint: {type(err).__name__}: {first}") from err


def load_tensors(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_tensors` wrote, without unpickling any code, verifying its sha256.

    A file of format version 1 (written before the hash was recorded) loads unverified; every
    other file must carry the hash. Tensors are read on the CPU, checked, then moved to
    ``map_location``.

    Args:
        path: the file.
        map_location: where the tensors go.

    Returns:
        ``(tensors, config)``.

    Raises:
        CheckpointError: naming the file, for a missing or malformed file, one that holds pickled
            objects, one whose content differs from its recorded hash ("integrity check failed"), or
            one with a non-finite floating tensor (naming the tensor).

    Shape:
        Not applicable.
    """
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if fmt == "safetensors":
        try:
            from safetensors import safe_open
        except ImportError as err:  # pragma: no cover
            raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from err
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
        text, recorded, version = meta.get(_CONFIG_KEY), meta.get(_HASH_KEY), meta.get("format_version")
        if text is None:
            raise CheckpointError(f"{path}: a safetensors file without a plasticine config (metadata key {_CONFIG_KEY!r})")
    else:
        obj = _safe_torch_load(path, "cpu")
        if not isinstance(obj, dict) or obj.get("format") != "plasticine" or not isinstance(obj.get("config"), str) or not isinstance(obj.get("tensors"), dict):
            raise CheckpointError(f"{path}: expected a plasticine checkpoint (a dict with format, config and tensors)")
        text, tensors, recorded, version = obj["config"], obj["tensors"], obj.get("sha256"), obj.get("version")
        bad = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise CheckpointError(f"{path}: expected tensors as name -> tensor, got {bad!r} -> {type(tensors[bad]).__name__}")
    _verify(path, tensors, text, recorded, legacy=version in (1, "1"))
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: the config is not valid JSON: {err}") from err
    return {k: v.to(map_location) for k, v in tensors.items()}, config


def save_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write a training state (nested dicts and lists of tensors, numbers and strings) atomically.

    Written by :func:`torch.save` and read back by :func:`load_state` with ``weights_only=True``, so
    it must hold only tensors and plain data (optimizer, scaler and generator states do). The
    sha256 of the state (see the module docstring) is stored with it under the key
    ``"plasticine_sha256"``.

    Args:
        path: the file (any name).
        state: the state; its floating tensors must be finite.

    Returns:
        The path.

    Raises:
        CheckpointError: for a tensor with a NaN or inf value (naming it; nothing is written), or a
            state that uses the reserved key.

    Shape:
        Not applicable.
    """
    state = dict(state)
    if _HASH_KEY in state:
        raise CheckpointError(f"{path}: the state key {_HASH_KEY!r} is reserved for the checkpoint's hash")
    digest, tensors = fingerprint(state)
    _check_finite(tensors, f"{path}: refused to write")
    buf = io.BytesIO()
    torch.save({**state, _HASH_KEY: digest}, buf)
    return atomic_write(path, buf.getvalue())


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training state written by :func:`save_state`; pickled objects are refused, the hash is verified.

    Args:
        path: the file.
        map_location: where tensors go.

    Returns:
        The state (without the hash).

    Raises:
        CheckpointError: naming the file, for a missing or malformed file, one that holds pickled
            objects, one without a hash or whose content differs from it ("integrity check
            failed"), or one with a non-finite floating tensor (naming the tensor).

    Shape:
        Not applicable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj = _safe_torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    recorded = obj.pop(_HASH_KEY, None)
    _verify(path, obj, "", recorded, legacy=False)
    return obj

r"""Saving and loading: a component registry, atomic writes and files that never unpickle code.

A saved translator is one file holding

* a JSON **config** that rebuilds every component: each component is written as
  ``{"class": <registered name>, "config": {...}}`` by the adapter registered for its class
  (:func:`register_component`), nested where a component holds others (a learned registration holds
  its network config and its integrator);
* the **weights** of every ``nn.Module`` inside the components, as a flat ``name -> tensor`` map.

Two formats, chosen by the file name: ``.safetensors`` (the config in the header's metadata; needs the
``safetensors`` package) and ``.pt`` / ``.pth`` (a plain dict of strings and tensors written by
:func:`torch.save` and read back with ``torch.load(weights_only=True)``). Neither can execute code
on load: safetensors holds only raw tensors and strings, and the restricted unpickler of
``weights_only=True`` refuses every object that is not a tensor, a number, a string or a container
of those, so a file with a pickled object raises :class:`CheckpointError` instead of running it.

**Integrity and finiteness.** Every file records the sha256 of what it holds (format version 2):
for :func:`save_tensors` the config text and, in name order, every tensor's name, dtype, shape and
raw bytes; for :func:`save_state` the whole nested state the same way (a canonical description of
its structure and plain values, then the tensors' raw bytes in that order). The loaders recompute
it and raise :class:`CheckpointError` ``"... integrity check failed ..."`` naming the file when it
differs, so a corrupted file never loads. Files of :func:`save_tensors` written by format version 1
(before the hash; they record ``version`` 1 and no hash) still load, unverified; a training state
without a hash is refused (such states are scratch files of a run: delete it to start over).
Floating (and complex) tensors must be finite: saving one with a NaN or inf value, or loading
one, raises :class:`CheckpointError` naming the file and the tensor.

Writes are atomic (:func:`atomic_write`): the bytes go to a temporary file in the same folder, are
flushed and ``fsync``-ed, and the file is moved over the destination with :func:`os.replace`, so an
interrupted save leaves the old file intact and never a truncated one. The temporaries a killed
write left for the same destination are removed by the next successful write, and files get the
permissions that :func:`open` would give them (``0o666`` less the umask).

The registry knows the components shipped with plasticine (schedules, samplers, the conditional
U-Net, condition encoders, structure extractors, registration backends, integrators, losses). A
component of another class must be registered before saving, otherwise :func:`component_config`
raises a :class:`CheckpointError` that says how.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "ComponentAdapter",
    "register_component",
    "registered_components",
    "component_config",
    "build_component",
    "component_modules",
    "atomic_write",
    "save_tensors",
    "load_tensors",
    "save_state",
    "load_state",
]

FORMAT_VERSION = 2
_CONFIG_KEY = "plasticine_config"
_HASH_KEY = "plasticine_sha256"


class CheckpointError(ValueError):
    """A checkpoint could not be written or read (unknown component, bad file, refused content)."""


@dataclass(frozen=True)
class ComponentAdapter:
    """How the registry writes and rebuilds one component class.

    Attributes:
        cls: the component class.
        to_config: ``obj -> dict`` of JSON values that ``from_config`` turns back into an equal object.
        from_config: ``dict -> obj``.
        modules: ``obj -> {name: nn.Module}``, the modules whose weights are saved (default: the
            object itself when it is an ``nn.Module``, else none).
    """

    cls: type
    to_config: Callable[[Any], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], Any]
    modules: Callable[[Any], dict[str, nn.Module]] | None = None


_REGISTRY: dict[str, ComponentAdapter] = {}
_BUILTINS_LOADED = False


def register_component(
    cls: type,
    to_config: Callable[[Any], dict[str, Any]] | None = None,
    from_config: Callable[[dict[str, Any]], Any] | None = None,
    *,
    modules: Callable[[Any], dict[str, nn.Module]] | None = None,
    name: str | None = None,
) -> type:
    """Make a component class savable: register how it becomes JSON and how it is rebuilt.

    Without ``to_config`` the class must have a ``config()`` (or ``to_dict()``) method returning
    its constructor arguments as JSON values (a ``"name"`` key is dropped), and ``from_config``
    defaults to ``cls(**config)``. Usable as a decorator: ``@register_component``.

    Args:
        cls: the component class.
        to_config: ``obj -> dict`` of JSON values.
        from_config: ``dict -> obj``.
        modules: ``obj -> {name: nn.Module}`` whose weights are saved (default: the object itself
            if it is an ``nn.Module``).
        name: the registered name written into files (default: ``cls.__qualname__``); it must be
            unique.

    Returns:
        ``cls`` (so that it works as a decorator).

    Raises:
        CheckpointError: if ``name`` is already taken by another class, or no ``to_config`` is
            given and the class has neither ``config`` nor ``to_dict``.

    Shape:
        Not applicable.
    """
    _load_builtins()
    key = name if name is not None else cls.__qualname__
    old = _REGISTRY.get(key)
    if old is not None and old.cls is not cls:
        raise CheckpointError(f"register_component: the name {key!r} is already registered for {old.cls.__module__}.{old.cls.__qualname__}")
    if to_config is None:
        method = "config" if hasattr(cls, "config") and callable(getattr(cls, "config")) else "to_dict" if hasattr(cls, "to_dict") else None
        if method is None:
            raise CheckpointError(f"register_component({cls.__qualname__}): give to_config=, or give the class a config() method returning its constructor arguments")

        def to_config(obj: Any, _m: str = method) -> dict[str, Any]:
            return {k: v for k, v in getattr(obj, _m)().items() if k != "name"}

    if from_config is None:

        def from_config(cfg: dict[str, Any], _cls: type = cls) -> Any:
            return _cls(**cfg)

    _REGISTRY[key] = ComponentAdapter(cls, to_config, from_config, modules)
    return cls


def registered_components() -> dict[str, type]:
    """The registered names and their classes.

    Returns:
        ``{name: class}``.

    Shape:
        Not applicable.
    """
    _load_builtins()
    return {k: a.cls for k, a in _REGISTRY.items()}


def _adapter_of(obj: Any) -> tuple[str, ComponentAdapter]:
    _load_builtins()
    for key, adapter in _REGISTRY.items():
        if type(obj) is adapter.cls:
            return key, adapter
    cls = type(obj)
    raise CheckpointError(
        f"cannot save a component of class {cls.__module__}.{cls.__qualname__}: it is not registered. "
        "Call plasticine.checkpoint.register_component(YourClass, to_config=..., from_config=...) "
        "(or give the class a config() method and call register_component(YourClass)) before saving"
    )


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
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


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (the constructors here take tuples or any sequence)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def component_config(obj: Any) -> dict[str, Any]:
    """The JSON spec ``{"class": name, "config": {...}}`` that :func:`build_component` rebuilds.

    Args:
        obj: a component of a registered class.

    Returns:
        The spec (JSON values only).

    Raises:
        CheckpointError: for an unregistered class or a config that is not JSON data.

    Shape:
        Not applicable.
    """
    key, adapter = _adapter_of(obj)
    return {"class": key, "config": _jsonable(adapter.to_config(obj), key)}


def build_component(spec: Mapping[str, Any]) -> Any:
    """Rebuild a component from :func:`component_config` output (weights are loaded separately).

    Args:
        spec: ``{"class": name, "config": {...}}``.

    Returns:
        The component.

    Raises:
        CheckpointError: for a malformed spec or an unregistered class name.

    Shape:
        Not applicable.
    """
    _load_builtins()
    if not isinstance(spec, Mapping) or set(spec) != {"class", "config"} or not isinstance(spec["config"], Mapping):
        raise CheckpointError(f"component spec: expected {{'class': str, 'config': dict}}, got {spec!r}")
    adapter = _REGISTRY.get(spec["class"])
    if adapter is None:
        raise CheckpointError(
            f"component class {spec['class']!r} is not registered (known: {sorted(_REGISTRY)}); "
            "import the module that calls register_component for it before loading"
        )
    try:
        return adapter.from_config(dict(spec["config"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot rebuild {spec['class']} from config {dict(spec['config'])}: {err}") from err


def component_modules(obj: Any) -> dict[str, nn.Module]:
    """The modules of a component whose weights a checkpoint holds.

    Uses the registered ``modules`` hook; otherwise the object itself when it is an ``nn.Module``
    (under the name ``""``), else none. Unregistered objects are treated the same way.

    Args:
        obj: a component.

    Returns:
        ``{name: module}``.

    Shape:
        Not applicable.
    """
    _load_builtins()
    for adapter in _REGISTRY.values():
        if type(obj) is adapter.cls and adapter.modules is not None:
            return adapter.modules(obj)
    return {"": obj} if isinstance(obj, nn.Module) else {}


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


def _fingerprint(obj: Any, text: str = "") -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """The sha256 of ``text`` and ``obj`` (structure, plain values, tensors' dtypes, shapes and raw bytes), and its tensors."""
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
        actual, tensors = _fingerprint(obj, text)
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
    digest, described = _fingerprint(flat, text)
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
    digest, tensors = _fingerprint(state)
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


# -- the shipped components ------------------------------------------------------------------------


def _by_attributes(cls: type, names: tuple[str, ...], **kwargs: Any) -> None:
    """Register ``cls`` whose constructor arguments are stored as attributes of the same names."""

    def to_config(obj: Any) -> dict[str, Any]:
        return {n: getattr(obj, n) for n in names}

    def from_config(cfg: dict[str, Any]) -> Any:
        return cls(**_tuples(cfg))

    register_component(cls, to_config, from_config, **kwargs)


def _dataclass_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from .diffusion import AncestralSampler, CosineSchedule, DDIMSampler, DPMSolverPP, LinearSchedule, ScheduleFromBetas
    from .diffusion.conditioning import ConcatConditioning, LearnedConditioning
    from .diffusion.unet import ConditionalUNet, UNetConfig
    from .losses import NCC, BendingEnergy, GradientSmoothness, LocalNCC, MutualInformation
    from .registration import RK4, Euler, ScalingAndSquaring

    for cls in (LinearSchedule, CosineSchedule, ScheduleFromBetas, AncestralSampler, DDIMSampler, DPMSolverPP):
        register_component(cls, from_config=lambda cfg, _c=cls: _c(**_tuples(cfg)))

    def unet_to(obj: ConditionalUNet) -> dict[str, Any]:
        enc = obj.encoder
        return {
            "config": obj.config.to_dict(),
            "encoder": None if enc is None else {"in_channels": enc.in_channels, "channels": list(enc.channels), "ndim": enc.ndim},
        }

    def unet_from(cfg: dict[str, Any]) -> ConditionalUNet:
        enc = cfg.get("encoder")
        encoder = None if enc is None else LearnedConditioning(enc["in_channels"], tuple(enc["channels"]), enc["ndim"])
        return ConditionalUNet(UNetConfig.from_dict(cfg["config"]), encoder=encoder)

    register_component(ConditionalUNet, unet_to, unet_from)

    _dtypes = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    register_component(
        ConcatConditioning,
        lambda o: {"num_labels": o.num_labels, "one_hot": o.one_hot, "dtype": None if o.dtype is None else str(o.dtype)},
        lambda c: ConcatConditioning(c["num_labels"], c["one_hot"], None if c["dtype"] is None else _dtypes[c["dtype"]]),
    )
    _by_attributes(LearnedConditioning, ("in_channels", "channels", "ndim"))
    for cls in (ScalingAndSquaring, Euler, RK4):
        _by_attributes(cls, ("steps", "padding"))
    _by_attributes(MutualInformation, ("bins", "normalized", "kernel", "sigma", "moving_range", "fixed_range"))
    _by_attributes(NCC, ())
    _by_attributes(LocalNCC, ("window",))
    _by_attributes(GradientSmoothness, ("spacing",))
    _by_attributes(BendingEnergy, ("spacing",))

    try:  # structure extractors and registration backends (import lazily; they may be optional)
        from .segmentation import KMeansExtractor, MultiOtsuExtractor, PottsExtractor

        _by_attributes(PottsExtractor, ("num_classes", "gamma", "neighborhood", "normalize", "max_iter"))
        _by_attributes(KMeansExtractor, ("num_classes", "smoothing_sigma", "max_iter"))
        _by_attributes(MultiOtsuExtractor, ("num_classes", "smoothing_sigma", "bins"))
    except ImportError:  # pragma: no cover
        pass
    try:
        from .registration.network import LearnedRegistration, RegistrationNet, RegistrationNetConfig

        def learned_to(obj: LearnedRegistration) -> dict[str, Any]:
            return {"network": _dataclass_dict(obj.network.config), "integrator": component_config(obj.integrator)}

        def learned_from(cfg: dict[str, Any]) -> LearnedRegistration:
            net = RegistrationNet(RegistrationNetConfig(**_tuples(cfg["network"])))
            return LearnedRegistration(net, build_component(cfg["integrator"]))

        register_component(LearnedRegistration, learned_to, learned_from, modules=lambda o: {"network": o.network})
    except ImportError:  # pragma: no cover
        pass
    try:
        from .registration.iterative import IterativeConfig, IterativeRegistration
        from .registration.optimizers import LBFGS, Adam, GradientDescent

        _by_attributes(GradientDescent, ("lr", "update_smoothing"))
        _by_attributes(Adam, ("lr",))
        _by_attributes(LBFGS, ("lr",))

        def iterative_to(obj: IterativeRegistration) -> dict[str, Any]:
            return {
                "config": _dataclass_dict(obj.config),
                "similarity": component_config(obj.similarity),
                "regularizer": component_config(obj.regularizer),
                "integrator": component_config(obj.integrator),
                "optimizer": component_config(obj.optimizer),
            }

        def iterative_from(cfg: dict[str, Any]) -> IterativeRegistration:
            return IterativeRegistration(
                build_component(cfg["similarity"]),
                build_component(cfg["regularizer"]),
                IterativeConfig(**_tuples(cfg["config"])),
                integrator=build_component(cfg["integrator"]),
                optimizer=build_component(cfg["optimizer"]),
            )

        register_component(IterativeRegistration, iterative_to, iterative_from, modules=lambda o: {})
    except ImportError:  # pragma: no cover
        pass

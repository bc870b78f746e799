"""Backend switch: which array library reflora computes with.

reflora has no global "current backend" for its math: every function takes its
namespace from the arrays it is given (``array_api_compat.array_namespace``).
The switch below only decides where *new* arrays are created (``init_lora``,
``LoraAdapter`` without ``xp=``, the CLI):

    REFLORA_BACKEND=auto   (default) CuPy when it imports and a GPU is usable,
                           else NumPy; the fallback is logged at INFO level.
    REFLORA_BACKEND=numpy  always NumPy.
    REFLORA_BACKEND=cupy   CuPy, or a RuntimeError saying why it cannot run;
                           never a silent fallback.

Random numbers are always drawn on the host with ``numpy.random.Generator`` and
then moved, so one seed gives bit-identical parameters on every backend.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "BACKEND_ENV",
    "array_namespace",
    "asarray",
    "default_namespace",
    "device_name",
    "dtype_name",
    "get_namespace",
    "host_rng",
    "resolve_dtype",
    "to_numpy",
]

BACKEND_ENV = "REFLORA_BACKEND"
_NAMESPACE_BY_TYPE: dict[type, ModuleType] = {}
_CHOICES = ("auto", "numpy", "cupy")
log = logging.getLogger("reflora")


def _cupy_status() -> tuple[ModuleType | None, str]:
    """Return (cupy, "") when CuPy can run here, else (None, reason)."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return None, f"cupy does not import ({type(exc).__name__}: {exc})"
    try:
        available = bool(cupy.is_available())
    except Exception as exc:
        return None, f"cupy imports but cupy.is_available() failed ({exc})"
    if not available:
        return None, "cupy imports but cupy.is_available() is False (no usable GPU)"
    return cupy, ""


def get_namespace(name: str | None = None) -> ModuleType:
    """Return the array-API namespace for a backend name.

    Args:
      name: "auto", "numpy" or "cupy"; None reads ``$REFLORA_BACKEND``
        (default "auto").

    Returns:
      ``array_api_compat.numpy`` or ``array_api_compat.cupy``.

    Raises:
      ValueError: an unknown name.
      RuntimeError: "cupy" was asked for where CuPy cannot run.
    """
    source = "argument"
    if name is None:
        name, source = os.environ.get(BACKEND_ENV, "auto") or "auto", f"${BACKEND_ENV}"
    key = name.strip().lower()
    if key not in _CHOICES:
        raise ValueError(f"backend from {source} is {name!r}; expected one of {_CHOICES}")
    if key == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    cupy, why = _cupy_status()
    if cupy is not None:
        return array_api_compat.array_namespace(cupy.empty(0))
    if key == "cupy":
        raise RuntimeError(f"backend 'cupy' was requested ({source}) but {why}")
    log.info("reflora: backend auto -> numpy (%s)", why)
    return array_api_compat.array_namespace(np.empty(0))


def default_namespace() -> ModuleType:
    """The namespace new arrays are created in when no ``xp=`` is given."""
    return get_namespace(None)


def normalize_xp(xp: Any) -> ModuleType:
    """Accept a namespace, a raw ``numpy``/``cupy`` module, or a backend name."""
    if xp is None:
        return default_namespace()
    if isinstance(xp, str):
        if xp in _CHOICES:
            return get_namespace(xp)
        # e.g. "array_api_strict": import it by name.
        import importlib  # noqa: PLC0415

        try:
            xp = importlib.import_module(xp)
        except ImportError:
            raise ValueError(f"xp is {xp!r}; expected one of {_CHOICES}, an importable array "
                             "library name such as 'array_api_strict', or a namespace module") from None
    # Map numpy/cupy to their array_api_compat wrappers, keep others as given.
    return array_api_compat.array_namespace(xp.empty(0))


def array_namespace(*arrays: Any, names: tuple[str, ...] | None = None) -> ModuleType:
    """The one namespace shared by ``arrays`` (None entries are ignored).

    Raises:
      TypeError: the arrays come from different libraries (e.g. NumPy and
        CuPy). reflora never moves data between devices silently; use
        ``reflora.asarray(x, xp=...)`` to move it explicitly.
    """
    present = [a for a in arrays if a is not None]
    kind = type(present[0]) if present else None
    if kind is not None and all(type(a) is kind for a in present):
        if kind is np.ndarray:
            # Note: NumPy >= 2 implements the standard in its main namespace; taking it
            # directly for plain ndarrays skips the compat wrapper (~8 us a call).
            return np
        ns = _NAMESPACE_BY_TYPE.get(kind)
        if ns is None:
            ns = _NAMESPACE_BY_TYPE[kind] = array_api_compat.array_namespace(present[0])
        return ns
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as exc:
        labels = names or tuple(f"argument {i}" for i in range(len(arrays)))
        kinds = [
            f"{label}: {type(a).__module__}.{type(a).__name__}"
            for label, a in zip(labels, arrays)
            if a is not None
        ]
        raise TypeError(
            "arrays come from different array libraries ("
            + ", ".join(kinds)
            + "); expected one library. Move them explicitly with reflora.asarray(x, xp=...)"
        ) from exc


def dtype_name(dtype: Any) -> str:
    """"float32" for "float32", numpy.float32, a NumPy/CuPy dtype or array_api_strict.float32."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name  # NumPy/CuPy dtypes and scalar types
        except TypeError:
            name = str(dtype)  # e.g. array_api_strict.float32
    return name.rsplit(".", 1)[-1]


def resolve_dtype(xp: ModuleType, dtype: Any) -> Any:
    """Turn "float32", a NumPy dtype or a namespace dtype into ``xp``'s dtype."""
    name = dtype_name(dtype)
    try:
        return getattr(xp, name)
    except AttributeError:
        raise TypeError(f"dtype {dtype!r} is not available in {xp.__name__}") from None


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy-or-view of any array reflora handles (CuPy -> .get())."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def asarray(x: Any, *, xp: Any = None, dtype: Any = None) -> Any:
    """Bring any array (torch, jax, NumPy, CuPy, array_api_strict, lists) into a backend.

    This is the one explicit place where data may cross libraries or devices.

    Args:
      x: a DLPack-capable array, or anything ``numpy.asarray`` accepts.
      xp: the target namespace (module or "numpy"/"cupy"/"auto"); None means
        the default backend (``$REFLORA_BACKEND``).
      dtype: optional target dtype ("float64", ...).

    Returns:
      An array of ``xp``. Like the standard's ``asarray(copy=None)`` it may share
      memory with ``x`` (DLPack) when no conversion is needed; copy it if ``x``
      will change afterwards.

    Example:
      >>> import reflora, numpy as np
      >>> reflora.asarray([1.0, 2.0], xp="numpy", dtype="float64").dtype
      dtype('float64')
    """
    target = normalize_xp(xp)
    dt = None if dtype is None else resolve_dtype(target, dtype)
    if array_api_compat.is_array_api_obj(x) and not isinstance(x, (list, tuple)):
        try:
            if array_api_compat.array_namespace(x) is target:
                return x if dt is None or x.dtype == dt else target.astype(x, dt)
        except TypeError:
            pass
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray) or (
            isinstance(x, np.ndarray) and not array_api_compat.is_numpy_namespace(target)):
        # Zero-copy where the device allows it (torch CUDA -> CuPy, torch CPU -> NumPy).
        try:
            y = target.from_dlpack(x)
        except Exception:  # another device, a tensor that requires grad, no support
            y = None
        if y is not None:
            return y if dt is None or y.dtype == dt else target.astype(y, dt)
    host = to_numpy(x)
    if dt is not None:
        host = host.astype(dtype_name(dt), copy=False)
    return target.asarray(host)


def device_name(xp: ModuleType) -> str:
    """A human-readable device for a namespace: "cpu" or "cuda:0 (NVIDIA H100 ...)"."""
    if array_api_compat.is_cupy_namespace(xp):
        import cupy  # noqa: PLC0415

        dev = cupy.cuda.Device()
        try:
            name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        except Exception:
            name = "GPU"
        return f"cuda:{dev.id} ({name})"
    return "cpu"


def host_rng(seed: int) -> np.random.Generator:
    """The host generator every random draw in reflora comes from (PCG64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed is {seed!r} ({type(seed).__name__}); expected an int")
    return np.random.Generator(np.random.PCG64(int(seed)))


_normalize_xp = normalize_xp  # the old private spelling, for branches written before the layout change

"""LoRA adapter files: the "peft" and "seed" single-file layouts.

Two single-file layouts hold the same adapter (legend: I in, O out, R rank):

    layout  keys (one module)                         shapes               forward
    "peft"  base_model.model.<module>.lora_A.weight   A (R, I)             y = s (x A^T) B^T
            base_model.model.<module>.lora_B.weight   B (O, R)
    "seed"  lora_a            (or <module>.lora_a)    a (I, R) = A^T       y = s (x a) b
            lora_b            (or <module>.lora_b)    b (R, O) = B^T

reflora's canonical layout is PEFT's; the seed's (candle) layout is its
transpose and exists only here, at I/O. Files written by reflora carry the
LoraConfig of every module in ``__metadata__["reflora"]`` (JSON), so they
reload complete; a file without it needs ``alpha=``.

Key names live in ``reflora.io._keys``; PEFT folders in ``reflora.io.peft``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import to_numpy
from ..config import INIT_SCHEMES, LoraConfig
from ._keys import (LAYOUTS, adapter_tensors, as_mapping, build_adapter, key, metadata_for, parse_key,
                    read_record, unsupported_reason)
from .safetensors import load_tensors, save_tensors

__all__ = ["LAYOUTS", "detect_layout", "layouts_roundtrip_error", "load_adapter", "save_adapter"]


# ---------------------------------------------------------------- layout detection


def _fits(a_shape: tuple, b_shape: tuple) -> set[str]:
    """Layouts under which (a, b) is a consistent, plausible pair (R <= min(I, O))."""
    fits = set()
    if len(a_shape) == 2 and len(b_shape) == 2:
        # peft: a = A (R, I), b = B (O, R)
        R, I, O = a_shape[0], a_shape[1], b_shape[0]
        if b_shape[1] == R and 1 <= R <= min(I, O):
            fits.add("peft")
        # seed: a (I, R), b (R, O)
        I, R, O = a_shape[0], a_shape[1], b_shape[1]
        if b_shape[0] == R and 1 <= R <= min(I, O):
            fits.add("seed")
    return fits


def group_keys(shapes: Mapping[str, tuple], where: str) -> tuple[dict[str, dict[str, str]], set[str]]:
    """{module: {"A": key, "B": key}} and the layouts the names suggest; FormatError on any other key."""
    modules: dict[str, dict[str, str]] = {}
    suggested: set[str] = set()
    for name in shapes:
        parsed = parse_key(name)
        if parsed is None:
            why = unsupported_reason(name)
            raise FormatError(f"{where}: tensor {name!r} is {why}" if why else
                              f"{where}: tensor {name!r} is not a LoRA A/B tensor; expected keys "
                              f"{key('peft', 'A', '<module>')!r} / ...lora_B.weight or 'lora_a' / 'lora_b'")
        module, half, suggests = parsed
        if half in modules.setdefault(module, {}):
            raise FormatError(f"{where}: module {module!r} has two {half} tensors: "
                              f"{modules[module][half]!r} and {name!r}")
        modules[module][half] = name
        if suggests:
            suggested.add(suggests)
    for module, halves in modules.items():
        for half, other in (("A", "B"), ("B", "A")):
            if half not in halves:
                raise FormatError(f"{where}: module {module or '(bare)'!r} has {halves[other]!r} but no {half} half; "
                                  "expected both lora_A and lora_B")
    if not modules:
        raise FormatError(f"{where}: no LoRA tensors; expected lora_A/lora_B (peft) or lora_a/lora_b (seed) keys")
    return modules, suggested


def detect_layout(shapes: Mapping[str, tuple], *, where: str = "adapter") -> str:
    """Decide "peft" or "seed" for a file from its tensor names and shapes.

    Every module's pair (a, b) must fit one orientation: "peft" a = A (R, I),
    b = B (O, R); "seed" a (I, R), b (R, O); with R <= min(I, O). Names
    suggest a layout (``...lora_A.weight`` peft, bare ``lora_a`` seed), but
    writers use both spellings in both orientations, so shapes must confirm it.

    Args:
      shapes: {tensor name: shape}.
      where: the file name, for messages.

    Returns:
      "peft" or "seed".

    Raises:
      reflora.FormatError: unknown keys, a missing half, ranks that disagree,
        names and shapes that contradict each other, or shapes that fit both
        orientations (a square a (n, n), b (n, n)): the message says which
        ``layout=`` to pass.

    Example:
      >>> detect_layout({"lora_a": (16, 4), "lora_b": (4, 8)})
      'seed'
    """
    modules, suggested = group_keys(shapes, where)
    common = set(LAYOUTS)
    for module, halves in modules.items():
        a, b = tuple(shapes[halves["A"]]), tuple(shapes[halves["B"]])
        fits = _fits(a, b)
        label = f"module {module!r}" if module else "the adapter"
        if not fits:
            raise FormatError(
                f"{where}: {label}: {halves['A']!r} has shape {a} and {halves['B']!r} {b}; expected "
                "A (R, I) and B (O, R) [peft] or a (I, R) and b (R, O) [seed] with one rank R <= min(I, O) "
                "(the ranks disagree, a tensor is not 2-D, or R > min(I, O): pass layout= to allow that)")
        common &= fits
    if len(suggested) > 1:
        raise FormatError(f"{where}: tensor names mix the peft (lora_A.weight) and seed (lora_a) spellings; "
                          "pass layout='peft' or layout='seed'")
    if not common:
        raise FormatError(f"{where}: modules disagree on the layout (some fit only peft, some only seed); "
                          "pass layout='peft' or layout='seed'")
    if len(common) == 2:
        raise FormatError(f"{where}: shapes fit both layouts (square: rank equals the dims), so a (R, I) cannot be "
                          "told from a (I, R); pass layout='peft' (A (R, I), B (O, R)) or layout='seed' "
                          "(a (I, R), b (R, O))")
    (layout,) = common
    if suggested and layout not in suggested:
        (named,) = suggested
        raise FormatError(f"{where}: names are {named}-style but the shapes fit only the {layout} orientation; "
                          f"pass layout='{layout}' to read them by orientation")
    return layout


# ---------------------------------------------------------------- saving


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")
    return layout


def save_adapter(path: Any, adapter: Any, *, layout: str = "peft", module: str = "linear",
                 overwrite: bool = True) -> None:
    """Write one adapter (or a mapping module -> adapter) to a safetensors file.

    "peft": ``base_model.model.<module>.lora_A.weight`` A (R, I) and
    ``...lora_B.weight`` B (O, R), metadata {"format": "pt"} as PEFT writes.
    "seed": ``lora_a`` a = A^T (I, R) and ``lora_b`` b = B^T (R, O), the seed's
    candle layout (y = s x a b); a mapping gets ``<module>.lora_a`` keys.
    Either way ``__metadata__["reflora"]`` holds every module's LoraConfig
    (rank, alpha, in/out, use_rslora, init) as JSON, so ``load_adapter``
    needs no ``alpha=``. Arrays are written in their dtype (F16/BF16/F32/F64).

    Args:
      path: destination file (written atomically).
      adapter: a ``LoraAdapter`` or {module path: LoraAdapter}.
      layout: "peft" or "seed".
      module: module path of a single adapter in the "peft" layout (the seed
        layout's single-adapter keys are the bare ``lora_a``/``lora_b``).
      overwrite: False refuses to replace an existing file.

    Raises:
      ValueError: an unknown layout, a malformed module path, or an adapter
        with a DoRA ``magnitude`` or a ``lora_bias`` (use ``save_peft``).
      TypeError: not a LoraAdapter (mapping).
      FileExistsError: ``overwrite=False`` and the file exists.

    Example:
      >>> import reflora, tempfile, os
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
      >>> save_adapter(p, ad, layout="seed")
      >>> load_adapter(p).A.shape
      (2, 4)
    """
    layout = _check_layout(layout)
    if not isinstance(module, str) or not module or module != module.strip("."):
        raise ValueError(f"module is {module!r}; expected a dotted module path such as 'linear'")
    adapters, single = as_mapping(adapter, module if layout == "peft" else "")
    for m, ad in adapters.items():
        extras = [n for n in ("magnitude", "lora_bias") if getattr(ad, n, None) is not None]
        if extras:  # neither single-file layout has keys for them: refuse rather than drop them
            raise ValueError(f"adapter {m or '(single)'!r} has {' and '.join(extras)}; the peft/seed adapter files "
                             "hold A and B only. Use reflora.save_peft(directory, {module: adapter}) instead")
    save_tensors(path, adapter_tensors(adapters, layout), metadata=metadata_for(adapters, layout),
                 overwrite=overwrite)


# ---------------------------------------------------------------- loading


def _alpha_for(alpha: Any, module: str, where: str) -> float:
    if isinstance(alpha, Mapping):
        if module not in alpha:
            raise ValueError(f"{where}: alpha has no entry for module {module!r}; got keys {sorted(alpha)}")
        alpha = alpha[module]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha is {alpha!r}; expected a finite real number (or a mapping module -> alpha)")
    return float(alpha)


def load_adapter(path: Any, *, layout: str | None = None, alpha: Any = None, use_rslora: bool | None = None,
                 xp: Any = None, dtype: Any = None) -> Any:
    """Read an adapter file in the "peft" or "seed" layout (see ``save_adapter``).

    The layout comes from ``__metadata__["reflora"]`` when reflora wrote the
    file, else from ``detect_layout`` (names and shapes), else from ``layout=``.
    The seed layout is transposed to the canonical A (R, I), B (O, R).

    Args:
      path: a safetensors file (read with the strict reader).
      layout: None (detect), "peft" or "seed" (forces the orientation; key
        names of either spelling are accepted).
      alpha: required when the file has no reflora config (e.g. a bare PEFT
        or seed file): a number, or {module: number}. Given for a file that
        stores alpha, it must agree.
      use_rslora: scale alpha / sqrt(R) instead of alpha / R for files without
        a reflora config (default False); must agree when the file stores it.
      xp: namespace of the returned arrays; None = default backend.
      dtype: e.g. "float64" to upcast on load.

    Returns:
      A ``LoraAdapter`` when the file holds one module, else {module: LoraAdapter}.

    Raises:
      reflora.FormatError: a malformed file, unknown keys, a missing half,
        ranks that disagree, an undecidable layout (says which to pass), or a
        stored config that contradicts the tensors.
      ValueError: ``alpha`` missing for a file without a config, or
        contradicting the stored one; an unknown ``layout``.

    Example:
      >>> import reflora, tempfile, os
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
      >>> save_adapter(p, ad)
      >>> load_adapter(p).config == ad.config
      True
    """
    where = os.fspath(path)
    if layout is not None:
        _check_layout(layout)
    if use_rslora is not None and not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora is {use_rslora!r}; expected True, False or None")
    tensors, metadata = load_tensors(path, xp="numpy", dtype=dtype)
    record = read_record(metadata, where)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if layout is None:
        if record is not None:
            layout = record["layout"]
            group_keys(shapes, where)  # still refuse unknown keys / missing halves
        else:
            layout = detect_layout(shapes, where=where)
    elif record is not None and record["layout"] != layout:
        raise ValueError(f"{where}: the file records layout {record['layout']!r}; got layout={layout!r}")
    modules, _ = group_keys(shapes, where)
    if record is not None and sorted(record["modules"]) != sorted(modules):
        raise FormatError(f"{where}: __metadata__ describes modules {sorted(record['modules'])} but the tensors "
                          f"are for {sorted(modules)}")
    if record is None and alpha is None:
        raise ValueError(f"{where}: the file has no reflora config (__metadata__['reflora']), so alpha is unknown; "
                         "pass alpha= (PEFT's lora_alpha; for a PEFT directory use reflora.load_peft)")
    out = {}
    for module, halves in modules.items():
        label = f"module {module!r}" if module else "the adapter"
        a, b = tensors[halves["A"]], tensors[halves["B"]]
        if a.ndim != 2 or b.ndim != 2:
            raise FormatError(f"{where}: {label}: shapes {a.shape} and {b.shape}; expected 2-D tensors")
        A_RI, B_OR = (a, b) if layout == "peft" else (a.T, b.T)
        if B_OR.shape[1] != A_RI.shape[0]:
            want = "A (R, I) and B (O, R)" if layout == "peft" else "a (I, R) and b (R, O)"
            raise FormatError(f"{where}: {label}: {halves['A']!r} has shape {a.shape} and {halves['B']!r} "
                              f"{b.shape}; expected {want} with one R for layout {layout!r}")
        rs = bool(use_rslora) if use_rslora is not None else False
        init = INIT_SCHEMES[0]
        if record is not None:
            cfg = record["modules"][module]
            try:
                stored = LoraConfig.from_dict(cfg)
            except (ValueError, TypeError) as exc:
                raise FormatError(f"{where}: {label}: stored config {cfg!r} is invalid ({exc})") from None
            R, I = A_RI.shape
            if (stored.rank, stored.in_features, stored.out_features) != (R, I, B_OR.shape[0]):
                raise FormatError(f"{where}: {label}: stored config says (R, I, O) = ({stored.rank}, "
                                  f"{stored.in_features}, {stored.out_features}); the tensors give "
                                  f"({R}, {I}, {B_OR.shape[0]})")
            if alpha is not None and _alpha_for(alpha, module, where) != stored.alpha:
                raise ValueError(f"{where}: {label}: the file stores alpha {stored.alpha:g}; got alpha="
                                 f"{_alpha_for(alpha, module, where):g}. Leave alpha out to use the stored one")
            if use_rslora is not None and use_rslora != stored.use_rslora:
                raise ValueError(f"{where}: {label}: the file stores use_rslora={stored.use_rslora}; "
                                 f"got use_rslora={use_rslora}")
            a_val, rs, init = stored.alpha, stored.use_rslora, stored.init
        else:
            a_val = _alpha_for(alpha, module, where)
        out[module] = build_adapter(label, A_RI, B_OR, alpha=a_val, use_rslora=rs, init=init, xp=xp, where=where)
    if len(out) == 1:
        return next(iter(out.values()))
    return out


def layouts_roundtrip_error(adapter: LoraAdapter, x: Any) -> float:
    """Save ``adapter`` in both layouts, reload both, return max |y_peft - y_seed| + max |y_peft - y|.

    y = s (x A^T) B^T (plus x W^T + bias when the adapter has a base) from the
    original adapter and from each reloaded file; 0.0 means both files hold
    exactly the adapter. Used by ``reflora demo``; files go to a temporary folder.
    """
    import tempfile  # noqa: PLC0415

    from ..ops.lora import lora_forward  # noqa: PLC0415

    def out(ad: LoraAdapter) -> np.ndarray:
        y, _ = lora_forward(x, ad.A, ad.B, scale=ad.scale, W=adapter.W, bias=adapter.bias)
        return np.asarray(to_numpy(y), dtype=np.float64)

    with tempfile.TemporaryDirectory(prefix="reflora-demo-") as tmp:
        ys = []
        for layout in LAYOUTS:
            path = os.path.join(tmp, f"adapter-{layout}.safetensors")
            save_adapter(path, adapter, layout=layout)
            ys.append(out(load_adapter(path, xp=adapter.xp)))
    y0 = out(adapter)
    return float(np.max(np.abs(ys[0] - ys[1]), initial=0.0) + np.max(np.abs(ys[0] - y0), initial=0.0))

"""LoRA adapter files: the "peft" and "seed" layouts, and PEFT adapter directories.

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

A PEFT directory is ``adapter_config.json`` + ``adapter_model.safetensors``
as ``PeftModel.save_pretrained`` writes them. ``load_peft`` honours r,
lora_alpha, use_rslora, rank_pattern and alpha_pattern (matched against module
paths exactly as PEFT matches them), use_dora (``lora_magnitude_vector`` ->
``LoraAdapter.magnitude``) and lora_bias (``lora_B.bias`` -> ``.lora_bias``), and
refuses what it cannot represent (embeddings, convolutions, modules_to_save,
trainable tokens, base-modifying inits such as PiSSA, DoRA together with
lora_bias) rather than mis-read it.

All key names live in ``_KEY_FORMATS`` / ``_parse_key`` and all refusals of
PEFT features in ``_UNSUPPORTED_CONFIG`` / ``_UNSUPPORTED_KEYS``: extend there.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from ._errors import FormatError
from .adapter import LoraAdapter
from .backend import asarray, to_numpy
from .config import INIT_SCHEMES, LoraConfig
from .safetensors_io import _atomic_write, load_tensors, save_tensors

__all__ = ["LAYOUTS", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "detect_layout", "load_adapter", "load_peft",
           "save_adapter", "save_peft"]

LAYOUTS = ("peft", "seed")
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_META_KEY = "reflora"
_META_VERSION = 1

# ---------------------------------------------------------------- key names (the one place)

#: (layout, half) -> key format; "{m}" is the module path ("" for the seed's bare keys).
_KEY_FORMATS = {
    ("peft", "A"): PEFT_PREFIX + "{m}.lora_A.weight",
    ("peft", "B"): PEFT_PREFIX + "{m}.lora_B.weight",
    ("seed", "A"): "{m}lora_a",
    ("seed", "B"): "{m}lora_b",
}
# Both families' names are recognised for either half; which layout a name *suggests* is recorded.
_KEY_RE = re.compile(r"^(?P<prefix>base_model\.model\.)?(?:(?P<m>.+)\.)?lora_(?P<half>[ABab])(?P<w>\.weight)?$")
#: PEFT tensors reflora cannot represent yet -> what they are (the DoRA / lora_bias issue extends this).
_UNSUPPORTED_KEYS = (
    (re.compile(r"\.lora_magnitude_vector$"), "a DoRA magnitude vector (use_dora); read DoRA adapters from their "
                                                "PEFT folder with load_peft"),
    (re.compile(r"\.lora_B\.bias$"), "a LoRA bias (lora_bias=True); read it from its PEFT folder with load_peft"),
    (re.compile(r"\.lora_embedding_[AB]$"), "a LoRA embedding; only Linear layers are supported"),
    (re.compile(r"modules_to_save|\.original_module\."), "a modules_to_save copy; not part of a LoRA adapter"),
    (re.compile(r"token_adapter|trainable_tokens"), "a trainable-tokens delta; not supported"),
)


def _key(layout: str, half: str, module: str) -> str:
    if layout == "seed":
        return _KEY_FORMATS[(layout, half)].format(m=f"{module}." if module else "")
    return _KEY_FORMATS[(layout, half)].format(m=module)


def _parse_key(name: str) -> tuple[str, str, str] | None:
    """'base_model.model.q.lora_A.weight' -> ('q', 'A', 'peft'); 'lora_b' -> ('', 'B', 'seed'); else None."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    half = m["half"]
    suggests = "peft" if (half in "AB" and m["w"]) else "seed" if (half in "ab" and not m["w"] and not m["prefix"]) \
        else None
    return m["m"] or "", half.upper(), suggests


def _unsupported_reason(name: str) -> str | None:
    for pattern, what in _UNSUPPORTED_KEYS:
        if pattern.search(name):
            return what
    return None


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


def _group(shapes: Mapping[str, tuple], where: str) -> tuple[dict[str, dict[str, str]], set[str]]:
    """{module: {"A": key, "B": key}} and the layouts the names suggest; FormatError on any other key."""
    modules: dict[str, dict[str, str]] = {}
    suggested: set[str] = set()
    for name in shapes:
        parsed = _parse_key(name)
        if parsed is None:
            why = _unsupported_reason(name)
            raise FormatError(f"{where}: tensor {name!r} is {why}" if why else
                              f"{where}: tensor {name!r} is not a LoRA A/B tensor; expected keys "
                              f"{_key('peft', 'A', '<module>')!r} / ...lora_B.weight or 'lora_a' / 'lora_b'")
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
    modules, suggested = _group(shapes, where)
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


# ---------------------------------------------------------------- reflora metadata


def _config_record(config: LoraConfig) -> dict[str, Any]:
    return config.to_dict()


def _metadata_for(adapters: Mapping[str, LoraAdapter], layout: str) -> dict[str, str]:
    record = {"version": _META_VERSION, "layout": layout,
              "modules": {m: _config_record(ad.config) for m, ad in adapters.items()}}
    meta = {_META_KEY: json.dumps(record, sort_keys=True)}
    if layout == "peft":
        meta["format"] = "pt"  # what PEFT (and transformers) write and check
    return meta


def _read_record(metadata: Mapping[str, str], where: str) -> dict[str, Any] | None:
    if _META_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[_META_KEY])
    except ValueError as exc:
        raise FormatError(f"{where}: __metadata__[{_META_KEY!r}] is not valid JSON ({exc})") from None
    if not (isinstance(record, dict) and record.get("version") == _META_VERSION
            and record.get("layout") in LAYOUTS and isinstance(record.get("modules"), dict)):
        raise FormatError(f"{where}: __metadata__[{_META_KEY!r}] is {metadata[_META_KEY][:200]!r}; expected "
                          f"{{'version': {_META_VERSION}, 'layout': 'peft'|'seed', 'modules': {{...}}}}")
    return record


# ---------------------------------------------------------------- saving


def _as_mapping(adapters: Any, module: str | None) -> tuple[dict[str, LoraAdapter], bool]:
    """({module: adapter}, single) from one LoraAdapter or a mapping of them."""
    if isinstance(adapters, LoraAdapter):
        return {module or "": adapters}, True
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapter is {type(adapters).__name__}; expected a reflora.LoraAdapter or a non-empty "
                        "mapping of module path -> LoraAdapter")
    out = {}
    for m, ad in adapters.items():
        if not isinstance(m, str) or not m or m != m.strip(".") or m.startswith(PEFT_PREFIX):
            raise ValueError(f"module path {m!r}; expected a dotted path such as 'layers.0.q_proj' "
                             f"(without '{PEFT_PREFIX}')")
        if not isinstance(ad, LoraAdapter):
            raise TypeError(f"adapters[{m!r}] is {type(ad).__name__}; expected a reflora.LoraAdapter")
        out[m] = ad
    return out, False


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")
    return layout


def _adapter_tensors(adapters: Mapping[str, LoraAdapter], layout: str) -> dict[str, Any]:
    tensors = {}
    for m, ad in adapters.items():
        A, B = to_numpy(ad.A), to_numpy(ad.B)  # host copies (CuPy -> .get()); writer makes them contiguous
        if layout == "peft":
            tensors[_key("peft", "A", m)], tensors[_key("peft", "B", m)] = A, B
        else:  # the seed's candle layout is the transpose: a = A^T (I, R), b = B^T (R, O)
            tensors[_key("seed", "A", m)], tensors[_key("seed", "B", m)] = A.T, B.T
    return tensors


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
    adapters, single = _as_mapping(adapter, module if layout == "peft" else "")
    for m, ad in adapters.items():
        extras = [n for n in ("magnitude", "lora_bias") if getattr(ad, n, None) is not None]
        if extras:  # neither single-file layout has keys for them: refuse rather than drop them
            raise ValueError(f"adapter {m or '(single)'!r} has {' and '.join(extras)}; the peft/seed adapter files "
                             "hold A and B only. Use reflora.save_peft(directory, {module: adapter}) instead")
    save_tensors(path, _adapter_tensors(adapters, layout), metadata=_metadata_for(adapters, layout),
                 overwrite=overwrite)


# ---------------------------------------------------------------- loading


def _build(module_label: str, A_RI: np.ndarray, B_OR: np.ndarray, *, alpha: float, use_rslora: bool,
           init: str, xp: Any, where: str) -> LoraAdapter:
    if A_RI.dtype != B_OR.dtype:
        raise FormatError(f"{where}: {module_label}: A is {A_RI.dtype} and B {B_OR.dtype}; expected one dtype")
    if A_RI.dtype.kind != "f" and A_RI.dtype.name not in ("bfloat16",):  # ml_dtypes' bfloat16 has kind "V"
        raise FormatError(f"{where}: {module_label}: dtype {A_RI.dtype}; expected a floating dtype")
    A = asarray(np.ascontiguousarray(A_RI), xp=xp)
    B = asarray(np.ascontiguousarray(B_OR), xp=xp)
    try:
        return LoraAdapter.from_arrays(A, B, alpha=alpha, use_rslora=use_rslora, init=init)
    except ValueError as exc:
        raise FormatError(f"{where}: {module_label}: {exc}") from None


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
    record = _read_record(metadata, where)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if layout is None:
        if record is not None:
            layout = record["layout"]
            _group(shapes, where)  # still refuse unknown keys / missing halves
        else:
            layout = detect_layout(shapes, where=where)
    elif record is not None and record["layout"] != layout:
        raise ValueError(f"{where}: the file records layout {record['layout']!r}; got layout={layout!r}")
    modules, _ = _group(shapes, where)
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
        out[module] = _build(label, A_RI, B_OR, alpha=a_val, use_rslora=rs, init=init, xp=xp, where=where)
    if len(out) == 1:
        return next(iter(out.values()))
    return out


# ---------------------------------------------------------------- PEFT directories

#: adapter_config.json fields whose non-default value reflora cannot represent -> why.
_UNSUPPORTED_CONFIG = (
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=True) is not supported yet"),
    ("lora_bias", lambda v: bool(v), "lora_bias=True (a bias on lora_B) is not supported yet"),
    ("bias", lambda v: v not in (None, "none"), "bias other than 'none' saves base-layer biases"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save stores full copies of other modules"),
    ("trainable_token_indices", lambda v: bool(v), "trainable tokens are not a LoRA adapter"),
    ("layer_replication", lambda v: bool(v), "layer_replication changes the base model's structure"),
    ("target_parameters", lambda v: bool(v), "LoRA on nn.Parameter (target_parameters) is not supported"),
    ("use_qalora", lambda v: bool(v), "QALoRA is not supported"),
    ("alora_invocation_tokens", lambda v: bool(v), "aLoRA (activated LoRA) is not supported"),
    ("megatron_config", lambda v: bool(v), "Megatron-parallel LoRA is not supported"),
    ("arrow_config", lambda v: bool(v), "Arrow routing is not supported"),
    ("use_bdlora", lambda v: bool(v), "BD-LoRA is not supported"),
    ("monteclora_config", lambda v: bool(v), "MonteCLoRA changes the LoRA forward; not supported"),
    ("kasa_config", lambda v: bool(v), "KaSA changes the LoRA forward; not supported"),
    ("velora_config", lambda v: bool(v), "VeLoRA is not supported"),
    ("init_lora_weights", lambda v: isinstance(v, str) and v.lower().startswith(("pissa", "olora", "corda",
                                                                                  "loftq", "lora_ga")),
     "this init rewrites the base weight (the adapter is relative to a residual model); convert it with "
     "PEFT's path_initial_model_for_weight_conversion first"),
)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def _read_peft_config(directory: str, *, allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """adapter_config.json, checked; fields in ``allow`` are not refused (``reflora merge`` handles DoRA, lora_bias)."""
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{directory}: no {PEFT_CONFIG_NAME}; expected a PEFT adapter directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: a JSON {type(cfg).__name__}; expected an object")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise FormatError(f"{path}: peft_type is {ptype!r}; expected 'LORA'")
    for field, bad, why in _UNSUPPORTED_CONFIG:
        if field not in allow and bad(cfg.get(field)):
            raise FormatError(f"{path}: {field} = {cfg.get(field)!r}: {why}; refusing rather than mis-reading")
    for field in ("r", "lora_alpha"):
        v = cfg.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FormatError(f"{path}: {field} is {v!r}; expected a number")
    for field in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(field) or {}
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in v.values()):
            raise FormatError(f"{path}: {field} is {v!r}; expected an object of pattern -> number")
        for p in v:
            try:
                re.compile(rf"(.*\.)?({p})$")  # as PEFT's get_pattern_key uses it
            except re.error as exc:
                raise FormatError(f"{path}: {field} key {p!r} is not a valid regular expression ({exc})") from None
        cfg[field] = v
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(field, False), bool):
            raise FormatError(f"{path}: {field} is {cfg.get(field)!r}; expected true or false")
    return cfg


_PEFT_EXTRA_RE = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.(lora_magnitude_vector|lora_B\.bias)$")


def _attach_extras(ad: LoraAdapter, extra: Mapping[str, np.ndarray], cfg: Mapping[str, Any], label: str,
                   weights: str, xp: Any) -> None:
    """Set a loaded adapter's DoRA magnitude and lora_bias, checked against use_dora / lora_bias."""
    for key, flag, what in (("magnitude", "use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_bias",
                                                                               "lora_B.bias")):
        if bool(cfg.get(flag)) != (key in extra):
            raise FormatError(f"{weights}: {label}: {flag} is {bool(cfg.get(flag))} in {PEFT_CONFIG_NAME} but the "
                              f"file {'lacks' if cfg.get(flag) else 'has'} {what}")
    if len(extra) == 2:
        raise FormatError(f"{weights}: {label}: DoRA with lora_bias is not supported (PEFT's merge of the pair "
                          "disagrees with its own forward)")
    try:
        for key, arr in extra.items():
            setattr(ad, key, ad._extra(asarray(np.ascontiguousarray(arr), xp=ad.xp), key))
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{weights}: {label}: {exc}") from None


def _peft_extras(mods: Mapping[str, LoraAdapter]) -> dict[str, Any]:
    """PEFT's keys for DoRA magnitudes and lora_B biases of the adapters that have them."""
    out = {}
    for m, ad in mods.items():
        if ad.magnitude is not None:
            out[f"{PEFT_PREFIX}{m}.lora_magnitude_vector"] = to_numpy(ad.magnitude)
        if ad.lora_bias is not None:
            out[f"{PEFT_PREFIX}{m}.lora_B.bias"] = to_numpy(ad.lora_bias)
    return out


def load_peft(directory: Any, *, xp: Any = None, dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

    For each module path m with ``base_model.model.m.lora_A.weight`` (R, I) and
    ``...lora_B.weight`` (O, R): R = rank_pattern's match for m, else r;
    alpha = alpha_pattern's match, else lora_alpha (patterns matched as PEFT
    does: the first p with m matching ``(.*\\.)?(p)$``); scale = alpha / R, or
    alpha / sqrt(R) with use_rslora. ``fan_in_fan_out`` (GPT-2 Conv1D) only
    transposes the *base* weight: A and B keep these shapes, so it does not
    change the adapter. Dropout does not apply at inference.

    Args:
      directory: the folder ``save_pretrained`` wrote.
      xp: namespace of the returned arrays; None = default backend.
      dtype: e.g. "float64" to upcast on load.

    Returns:
      {module path: LoraAdapter} in file order.

    Raises:
      reflora.FormatError: missing/malformed files, a config reflora cannot
        represent (modules_to_save, PiSSA-style inits, embeddings, convolutions,
        DoRA with lora_bias, ...), or ranks (or use_dora / lora_bias) contradicting
        the config. DoRA modules come back with ``magnitude`` set, lora_bias
        modules with ``lora_bias`` set; a DoRA adapter needs its base ``W`` to run.

    Example:
      >>> import reflora, tempfile
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> d = tempfile.mkdtemp()
      >>> save_peft(d, {"layers.0.q_proj": ad})
      >>> load_peft(d)["layers.0.q_proj"].scale
      8.0
    """
    directory = os.fspath(directory)
    cfg = _read_peft_config(directory, allow=("use_dora", "lora_bias"))
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(directory, "adapter_model.bin")):
            raise FormatError(f"{directory}: only adapter_model.bin (a pickle) is present; reflora reads "
                              "safetensors only (re-save with safe_serialization=True)")
        raise FormatError(f"{directory}: no {PEFT_WEIGHTS_NAME}")
    tensors, metadata = load_tensors(weights, xp="numpy", dtype=dtype)
    record = _read_record(metadata, weights)
    modules: dict[str, dict[str, str]] = {}
    extras: dict[str, dict[str, np.ndarray]] = {}  # DoRA magnitudes and lora_B biases (reflora.dora, .lora_bias)
    for name in tensors:
        extra = _PEFT_EXTRA_RE.match(name)
        if extra is not None:
            extras.setdefault(extra[1], {})["magnitude" if extra[2] == "lora_magnitude_vector" else "lora_bias"] = \
                tensors[name]
            continue
        why = _unsupported_reason(name)
        parsed = _parse_key(name)
        if why or parsed is None or not name.startswith(PEFT_PREFIX) or parsed[2] != "peft":
            raise FormatError(f"{weights}: tensor {name!r} is "
                              + (why or f"not a PEFT LoRA tensor; expected '{PEFT_PREFIX}<module>.lora_A.weight' "
                                        "or '.lora_B.weight'"))
        module, half, _ = parsed
        if half in modules.setdefault(module, {}):
            raise FormatError(f"{weights}: module {module!r} has two {half} tensors")
        modules[module][half] = name
    out = {}
    for module, halves in modules.items():
        label = f"module {module!r}"
        if set(halves) != {"A", "B"}:
            (have,) = halves.values()
            raise FormatError(f"{weights}: {label} has {have!r} but not its other half")
        A, B = tensors[halves["A"]], tensors[halves["B"]]
        if A.ndim != 2 or B.ndim != 2:
            raise FormatError(f"{weights}: {label}: lora_A {A.shape}, lora_B {B.shape}; expected 2-D (R, I) and "
                              "(O, R): only Linear (and Conv1D) layers are supported, not convolutions")
        rk = _pattern_key(cfg["rank_pattern"], module)
        ak = _pattern_key(cfg["alpha_pattern"], module)
        R = cfg["rank_pattern"][rk] if rk is not None else cfg["r"]
        alpha = cfg["alpha_pattern"][ak] if ak is not None else cfg["lora_alpha"]
        if A.shape[0] != R or B.shape[1] != R:
            src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
            raise FormatError(f"{weights}: {label}: lora_A has shape {A.shape} and lora_B {B.shape}; expected "
                              f"(R, I) and (O, R) with R = {R} from {src} in {PEFT_CONFIG_NAME}")
        init = "gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming_uniform"
        out[module] = _build(label, A, B, alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                             init=init, xp=xp, where=weights)
        saved = (record or {}).get("modules", {}).get(module)
        if isinstance(saved, dict) and any(saved.get(k) != v for k, v in (
                ("rank", R), ("alpha", float(alpha)), ("use_rslora", bool(cfg.get("use_rslora", False))))):
            # a reflora-written file records each module's config: a disagreement means the two
            # files come from different saves (e.g. one interrupted between its two writes)
            raise FormatError(f"{directory}: {label}: {PEFT_CONFIG_NAME} says rank {R}, alpha {alpha}, "
                              f"use_rslora {cfg.get('use_rslora', False)} but {PEFT_WEIGHTS_NAME} was saved with "
                              f"{saved}; expected the two files of one save")
        _attach_extras(out[module], extras.pop(module, {}), cfg, label, weights, xp)
    if extras:
        raise FormatError(f"{weights}: {sorted(extras)[:5]} have a magnitude vector or lora_B.bias but no "
                          "lora_A/lora_B weights")
    if not out:
        raise FormatError(f"{weights}: no LoRA tensors")
    return out


def save_peft(directory: Any, adapters: Mapping[str, LoraAdapter], *, base_model_name_or_path: str | None = None,
              fan_in_fan_out: bool = False, task_type: str | None = None, overwrite: bool = True) -> None:
    """Write a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads.

    adapter_model.safetensors holds ``base_model.model.<m>.lora_A.weight``
    (R, I) and ``...lora_B.weight`` (O, R) with metadata {"format": "pt"}
    (plus reflora's config record). adapter_config.json targets exactly the
    given module paths (``target_modules`` is an anchored regex, which PEFT
    full-matches) and lists every module's rank and alpha in rank_pattern /
    alpha_pattern (escaped, longest path first, so PEFT's suffix matching
    picks each module's own entry); r and lora_alpha are the most common values.

    Args:
      directory: created if missing.
      adapters: {module path: LoraAdapter}; paths as in ``model.named_modules()``.
      base_model_name_or_path: recorded in the config (PEFT uses it only to
        fetch the base model when you ask it to).
      fan_in_fan_out: set True for GPT-2 style Conv1D targets (base weight (I, O)).
      task_type: PEFT's task type (e.g. "CAUSAL_LM"), or None.
      overwrite: False refuses to replace existing files.

    Raises:
      ValueError: adapters that disagree on use_rslora (one PEFT config holds
        one), an empty mapping, or malformed module paths.
      TypeError: values that are not LoraAdapter.
      FileExistsError: ``overwrite=False`` and a file exists.

    Example:
      >>> import reflora, tempfile, os
      >>> ad = reflora.LoraAdapter(reflora.LoraConfig(rank=2, in_features=4, out_features=3), xp="numpy")
      >>> d = tempfile.mkdtemp()
      >>> save_peft(d, {"fc": ad})
      >>> sorted(os.listdir(d))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    if isinstance(adapters, LoraAdapter):
        raise TypeError("adapters is a single LoraAdapter; expected {module path: LoraAdapter} "
                        "(PEFT keys need the module path)")
    mods, _ = _as_mapping(adapters, None)
    rslora = {ad.config.use_rslora for ad in mods.values()}
    if len(rslora) > 1:
        raise ValueError("adapters disagree on use_rslora; a PEFT config has one use_rslora for all modules")
    dora = {ad.magnitude is not None for ad in mods.values()}
    lbias = {ad.lora_bias is not None for ad in mods.values()}
    if len(dora) > 1 or len(lbias) > 1:
        raise ValueError("adapters disagree on DoRA (magnitude) or lora_bias; a PEFT config has one use_dora and "
                         "one lora_bias for all modules")
    if not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"fan_in_fan_out is {fan_in_fan_out!r}; expected True or False")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not overwrite:
        for p in (cfg_path, weights):
            if os.path.lexists(p):
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")

    def most_common(values: list) -> Any:
        return max(sorted(set(values)), key=values.count)

    ranks = [ad.config.rank for ad in mods.values()]
    alphas = [ad.config.alpha for ad in mods.values()]
    order = sorted(mods, key=lambda m: (-len(m), m))  # longest first: PEFT returns the first matching pattern
    alpha_int = {m: (int(a) if float(a).is_integer() else a) for m, a in zip(mods, alphas)}
    inits = {ad.config.init for ad in mods.values()}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": most_common(ranks),
        "lora_alpha": alpha_int[next(m for m in mods if mods[m].config.alpha == most_common(alphas))],
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in order) + ")$",
        "rank_pattern": {re.escape(m): mods[m].config.rank for m in order},
        "alpha_pattern": {re.escape(m): alpha_int[m] for m in order},
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": dora.pop(),
        "lora_bias": lbias.pop(),
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if inits == {"gaussian"} else True,
    }
    save_tensors(weights, {**_adapter_tensors(mods, "peft"), **_peft_extras(mods)}, metadata=_metadata_for(mods, "peft"),
                 overwrite=overwrite)
    text = json.dumps(config, indent=2) + "\n"  # not sort_keys: pattern order matters to PEFT

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(cfg_path, write, overwrite=overwrite)


def layouts_roundtrip_error(adapter: LoraAdapter, x: Any) -> float:
    """Save ``adapter`` in both layouts, reload both, return max |y_peft - y_seed| + max |y_peft - y|.

    y = s (x A^T) B^T (plus x W^T + bias when the adapter has a base) from the
    original adapter and from each reloaded file; 0.0 means both files hold
    exactly the adapter. Used by ``reflora demo``; files go to a temporary folder.
    """
    import tempfile  # noqa: PLC0415

    from .core import lora_forward  # noqa: PLC0415

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

"""llama.cpp GGUF LoRA adapters (``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``), through
the ``gguf`` package from PyPI (imported only here, only when called: ``pip install gguf`` or
``reflora[interop]``).

One GGUF file (legend: I in, O out, R rank; shapes as NumPy sees them, GGUF's ``ne`` is
the reverse):

    general.architecture   "llama" (must equal the base model's)
    general.type           "adapter"
    adapter.type           "lora"
    adapter.lora.alpha     float32, ONE for the file; s = alpha / R per tensor pair
                           (alpha 0 or absent: s = 1, llama.cpp's rule)
    blk.N.attn_q.weight.lora_a   (R, I)  = PEFT's A
    blk.N.attn_q.weight.lora_b   (O, R)  = PEFT's B, rows permuted for attn_q / attn_k

Tensor names are the base model's GGUF names + ``.lora_a`` / ``.lora_b``. For Llama and
Qwen2 (``LLAMA_NAMES``): ``model.layers.N.self_attn.{q,k,v,o}_proj`` -> ``blk.N.attn_{q,k,v,output}``,
``model.layers.N.mlp.{gate,up,down}_proj`` -> ``blk.N.ffn_{gate,up,down}``, ``lm_head`` ->
``output``. convert_hf_to_gguf permutes the rows of Llama's q and k weights for its RoPE
layout (``LlamaModel.permute``: reshape (heads, 2, O/heads/2, I), swap axes 1 and 2; Qwen2's
NeoX-style RoPE needs none), and
the LoRA converter applies the same to lora_b, so that B' A = P (B A) matches the
permuted base weight. Undoing it needs the head counts (``n_head``, ``n_head_kv``), which
the adapter file does not carry: pass them, or read a file reflora wrote (its record has them).

What the format cannot hold: different alphas per module (one adapter.lora.alpha; a
rank_pattern adapter with one lora_alpha is fine, since s = alpha / R per pair), an rsLoRA
flag (a single-rank rsLoRA adapter is stored as alpha_eff = alpha sqrt(R), rounded to
float32), DoRA, lora_bias, float64 tensors (llama.cpp's converter writes f32, f16, bf16,
q8_0; reflora writes f32, f16 and bf16). llama.cpp's own converter ignores use_rslora and
alpha_pattern (it writes lora_alpha as is), so an rsLoRA adapter it converted is sqrt(R) too
weak: ``reflora diff`` says so.
reflora adds the KV ``reflora.record`` (JSON: each module's exact config and the head counts).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from .._errors import FormatError
from ..adapter import LoraAdapter
from ..backend import to_numpy
from . import _common as c

__all__ = ["ARCHITECTURES", "GGUF_DTYPES", "LLAMA_NAMES", "gguf_name", "hf_name", "is_gguf", "load_gguf", "permute_rows",
           "save_gguf", "unpermute_rows"]

#: HF (transformers) module path pattern -> GGUF base tensor name, for architecture "llama".
LLAMA_NAMES = (
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", "blk.{}.attn_q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", "blk.{}.attn_k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", "blk.{}.attn_v"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", "blk.{}.attn_output"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", "blk.{}.ffn_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", "blk.{}.ffn_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", "blk.{}.ffn_down"),
    (r"lm_head", "output"),
)
#: architectures reflora maps names for -> whether convert_hf_to_gguf permutes their q/k rows
#: (Llama's LlamaModel.permute; Qwen2 uses NeoX-style RoPE and keeps HF's order). Both share LLAMA_NAMES.
ARCHITECTURES = {"llama": True, "qwen2": False}
GGUF_DTYPES = ("float32", "float16", "bfloat16")
_RECORD_KEY = "reflora.record"
_MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError:
        raise ImportError("GGUF files need the 'gguf' package: pip install gguf (or reflora[interop])") from None
    return gguf


def gguf_name(module: str, arch: str = "llama") -> str:
    """The GGUF base tensor name (without ``.weight``) of an HF module path.

    Example:
      >>> gguf_name("model.layers.3.self_attn.k_proj")
      'blk.3.attn_k'
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch is {arch!r}; reflora maps module names for {sorted(ARCHITECTURES)}")
    for pattern, name in LLAMA_NAMES:
        m = re.fullmatch(pattern, module)
        if m:
            return name.format(*m.groups())
    raise ValueError(f"module {module!r} has no GGUF name in reflora's {arch} map (model.layers.N.self_attn."
                     "{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj, lm_head)")


def hf_name(name: str, arch: str = "llama") -> str | None:
    """Inverse of ``gguf_name`` ('blk.3.attn_k' -> 'model.layers.3.self_attn.k_proj'), None if unmapped."""
    if arch not in ARCHITECTURES:
        return None
    for pattern, fmt in LLAMA_NAMES:
        regex = "^" + re.escape(fmt).replace(r"\{\}", r"(\d+)") + "$"
        m = re.match(regex, name)
        if m:
            return pattern.replace(r"(\d+)", m.group(1) if m.groups() else "").replace("\\.", ".")
    return None


def _heads(module_gguf: str, n_head: int | None, n_head_kv: int | None) -> int | None:
    """Heads of the permutation for attn_q (n_head) and attn_k (n_head_kv, else n_head); None: no permutation."""
    if module_gguf.endswith(".attn_q"):
        return n_head
    if module_gguf.endswith(".attn_k"):
        return n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    return None


def permute_rows(b_OR: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute on the rows of B: (h, 2, O/h/2, R) -> swap 1, 2 -> (O, R)."""
    O, R = b_OR.shape
    if heads < 1 or O % (2 * heads):
        raise ValueError(f"O = {O} rows do not split into {heads} heads of two halves (O must be a multiple of "
                         "2 x heads)")
    return b_OR.reshape(heads, 2, O // heads // 2, R).swapaxes(1, 2).reshape(O, R)


def unpermute_rows(b_OR: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of ``permute_rows``: (h, O/h/2, 2, R) -> swap 1, 2 -> (O, R)."""
    O, R = b_OR.shape
    if heads < 1 or O % (2 * heads):
        raise ValueError(f"O = {O} rows do not split into {heads} heads of two halves (O must be a multiple of "
                         "2 x heads)")
    return b_OR.reshape(heads, O // heads // 2, 2, R).swapaxes(1, 2).reshape(O, R)


def _file_alpha(mods: Mapping[str, LoraAdapter]) -> float:
    """The one float32 alpha with alpha / R_m = s_m for every module, or ValueError."""
    need = {m: np.float32(c.alpha_for_scale(ad.scale, ad.config.rank)) for m, ad in mods.items()}
    if len(set(need.values())) > 1:
        shown = {m: float(v) for m, v in list(need.items())[:6]}
        raise ValueError(f"modules need different alphas {shown} (alpha = s R); a GGUF adapter holds one "
                         "adapter.lora.alpha for all modules (llama.cpp: s = alpha / R per tensor pair). "
                         "Keep it as PEFT, or convert modules of one alpha separately")
    return float(next(iter(need.values())))


def save_gguf(path: Any, adapters: Mapping[str, LoraAdapter], *, arch: str = "llama", n_head: int | None = None,
              n_head_kv: int | None = None, overwrite: bool = True) -> None:
    """Write {HF module path: LoraAdapter} as a llama.cpp GGUF LoRA adapter (module docstring).

    Args:
      path: the .gguf file.
      adapters: module paths as transformers names them (``model.layers.0.self_attn.q_proj``).
      arch: general.architecture: "llama" (q/k rows permuted) or "qwen2" (same names, no permutation).
      n_head, n_head_kv: the base model's num_attention_heads / num_key_value_heads;
        needed when q_proj / k_proj are adapted (their lora_b rows are permuted).
      overwrite: False refuses to replace an existing file.

    Raises:
      ValueError: DoRA or lora_bias, float64 tensors, modules needing different alphas,
        modules without a GGUF name, q/k modules without n_head.
      ImportError: the gguf package is missing.
    """
    gguf = _gguf()
    mods = c.as_modules(adapters)
    c.refuse_extras(mods, "a GGUF adapter", "llama.cpp's LoRA adapters hold lora_a and lora_b only",
                    "llama.cpp's LoRA adapters hold lora_a and lora_b only")
    for m, ad in mods.items():
        c.check_dtype(ad, m, GGUF_DTYPES, "a GGUF adapter (as llama.cpp's converter writes it)")
    alpha = _file_alpha(mods)
    tensors = {}
    for m, ad in mods.items():
        base = gguf_name(m, arch)
        A, B = to_numpy(ad.A), to_numpy(ad.B)
        heads = _heads(base, n_head, n_head_kv)
        if ARCHITECTURES[arch] and base.endswith((".attn_q", ".attn_k")):
            if heads is None:
                raise ValueError(f"module {m!r} ({base}) needs n_head (and n_head_kv for k_proj with grouped-query "
                                 "attention): llama.cpp's converter permutes the rows of its lora_b")
            B = permute_rows(B, heads)
        tensors[f"{base}.weight.lora_a"] = np.ascontiguousarray(A)
        tensors[f"{base}.weight.lora_b"] = np.ascontiguousarray(B)
    record = c.record_json("gguf", {gguf_name(m, arch): (m, ad.config) for m, ad in mods.items()},
                           arch=arch, n_head=n_head, n_head_kv=n_head_kv)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string(_RECORD_KEY, record)
        for name, arr in tensors.items():
            if arr.dtype.name == "bfloat16":  # as the converter writes bf16: gguf.quants gives the raw bytes
                q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.BF16)  # exact: bf16 values
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    c.atomic_write(os.fspath(path), write, overwrite=overwrite)


def is_gguf(path: Any) -> bool:
    """True when the file starts with GGUF's magic."""
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _field(reader: Any, key: str, where: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as exc:  # noqa: BLE001 - a malformed field, whatever gguf raises
        raise FormatError(f"{where}: KV {key!r} cannot be read ({type(exc).__name__}: {exc})") from None


def _tensor_array(t: Any, gguf: Any, where: str) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # ne reversed = NumPy's shape
    if t.tensor_type in (T.F32, T.F16, T.F64):
        return np.array(t.data).reshape(shape)
    if t.tensor_type == T.BF16:
        import ml_dtypes  # noqa: PLC0415

        return np.array(t.data).view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
    raise FormatError(f"{where}: tensor {t.name!r} has GGML type {t.tensor_type.name}; reflora reads F32, F16, BF16 "
                      "and F64 (quantized adapters are not supported)")


def load_gguf(path: Any, *, n_head: int | None = None, n_head_kv: int | None = None, xp: Any = None,
              dtype: Any = None) -> dict[str, LoraAdapter]:
    """Read a llama.cpp GGUF LoRA adapter; {module: LoraAdapter} in file order.

    For "llama" and "qwen2" modules get their HF paths back; for "llama" attn_q / attn_k
    lora_b rows are un-permuted (head counts from reflora's record, else ``n_head`` /
    ``n_head_kv``); other architectures keep GGUF names and the layout as stored.
    Scale s = alpha / R (alpha 0 or absent: s = 1, as llama.cpp), held as alpha and
    use_rslora False, unless reflora's record gives the exact config (checked against the
    stored alpha and shapes).

    Raises:
      reflora.FormatError: not a GGUF file, a malformed one (whatever the gguf package
        raises), general.type / adapter.type not adapter / lora, tensors that are not
        ``<name>.lora_a`` / ``.lora_b``, a missing half, shapes that are not (R, I) and
        (O, R), quantized tensors, a record that contradicts the file.
      ValueError: a Llama q/k module and no head counts.
    """
    gguf = _gguf()
    where = os.fspath(path)
    if not is_gguf(where):
        raise FormatError(f"{where}: not a GGUF file (no 'GGUF' magic)")
    try:
        reader = gguf.GGUFReader(where, "r")
    except Exception as exc:  # noqa: BLE001 - the package raises ValueError, struct.error, IndexError, ...
        raise FormatError(f"{where}: malformed GGUF ({type(exc).__name__}: {exc})") from None
    gtype, atype = _field(reader, "general.type", where), _field(reader, "adapter.type", where)
    if gtype != "adapter" or atype != "lora":
        raise FormatError(f"{where}: general.type is {gtype!r} and adapter.type {atype!r}; expected 'adapter' and "
                          "'lora' (a GGUF LoRA adapter)")
    arch = _field(reader, "general.architecture", where)
    f_alpha = reader.fields.get("adapter.lora.alpha")
    if f_alpha is not None and f_alpha.types != [gguf.GGUFValueType.FLOAT32]:
        raise FormatError(f"{where}: adapter.lora.alpha has type {[t.name for t in f_alpha.types]}; expected FLOAT32 "
                          "(llama.cpp aborts on any other)")
    alpha = float(_field(reader, "adapter.lora.alpha", where) or 0.0)
    record = c.parse_record(_field(reader, _RECORD_KEY, where), "gguf", where)
    if record is not None:
        for key in ("n_head", "n_head_kv"):
            v = record.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise FormatError(f"{where}: reflora's record has {key} = {v!r:.80}; expected an int >= 1 or null: "
                                  "the file was changed after reflora wrote it")
        n_head, n_head_kv = record.get("n_head"), record.get("n_head_kv")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        m = re.match(r"^(?P<base>.+)\.weight\.lora_(?P<half>[ab])$", t.name)
        if m is None:
            raise FormatError(f"{where}: tensor {t.name!r} is not a LoRA tensor; expected '<base>.weight.lora_a' or "
                              "'.lora_b' (norm weights from mergekit-extract-lora and token embeddings are not "
                              "supported)")
        if m["half"] in halves.setdefault(m["base"], {}):
            raise FormatError(f"{where}: two tensors named {t.name!r}")
        try:
            halves[m["base"]][m["half"]] = _tensor_array(t, gguf, where)
        except (ValueError, TypeError, IndexError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{where}: tensor {t.name!r} cannot be read ({type(exc).__name__}: {exc})") from None
    c.check_found(halves, record, where)
    out: dict[str, LoraAdapter] = {}
    for base, h in halves.items():
        label = f"tensor pair {base!r}"
        if set(h) != {"a", "b"}:
            raise FormatError(f"{where}: {label} has only lora_{next(iter(h))} (llama.cpp: 'LoRA tensor pair is "
                              "missing one component')")
        a, b = h["a"], h["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(f"{where}: {label}: lora_a {a.shape}, lora_b {b.shape}; expected (R, I) and (O, R) "
                              "(GGUF ne [I, R] and [R, O]; llama.cpp: 'lora_a tensor is not transposed')")
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        R = a.shape[0]
        module = hf_name(base, arch) or base
        permuted = ARCHITECTURES.get(arch, False) and base.endswith((".attn_q", ".attn_k"))
        heads = _heads(base, n_head, n_head_kv) if permuted else None
        if permuted:
            if heads is None:
                raise ValueError(f"{where}: {label} is Llama's q or k projection, whose lora_b rows llama.cpp's "
                                 "converter permuted; pass n_head (and n_head_kv) to undo it")
            try:
                b = unpermute_rows(b, heads)
            except ValueError as exc:
                raise FormatError(f"{where}: {label}: {exc}") from None
        mod_alpha, rs, init = (alpha if alpha != 0.0 else float(R)), False, "kaiming_uniform"
        if record is not None:
            rec = record["modules"][base]
            cfg = rec["config"]
            c.check_against_record(where, label, cfg, R, a.shape[1], b.shape[0])
            if np.float32(c.alpha_for_scale(cfg.scale, cfg.rank)) != np.float32(alpha):
                raise FormatError(f"{where}: {label}: adapter.lora.alpha is {alpha!r} but reflora's record means "
                                  f"{float(np.float32(c.alpha_for_scale(cfg.scale, cfg.rank)))!r}: the file was "
                                  "changed after reflora wrote it")
            module, mod_alpha, rs, init = rec["module"], cfg.alpha, cfg.use_rslora, cfg.init
        if module in out:
            raise FormatError(f"{where}: two tensor pairs map to module {module!r}")
        out[module] = c.build(where, label, a, b, alpha=mod_alpha, use_rslora=rs, init=init, xp=xp)
    return out


def read_summary(path: Any) -> dict[str, Any]:
    """The KVs reflora cares about (architecture, types, alpha) for ``reflora inspect``."""
    gguf = _gguf()
    where = os.fspath(path)
    try:
        reader = gguf.GGUFReader(where, "r")
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{where}: malformed GGUF ({type(exc).__name__}: {exc})") from None
    kv = {k: _field(reader, k, where) for k in ("general.architecture", "general.type", "adapter.type",
                                                "adapter.lora.alpha")}
    kv["tensors"] = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed([int(x) for x in t.shape])))
                     for t in reader.tensors]
    return kv


"""``reflora merge BASE ADAPTER OUT``: fold a PEFT adapter into base model weights.

The work is ``reflora.io.model_merge.merge_model``; this module is its argparse front.
"""

from __future__ import annotations

import argparse

from ..io import model_merge
from ..io.model_merge import merge_model


def _cmd(args: argparse.Namespace) -> int:
    s = merge_model(args.base, args.adapter, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"merged {s['modules']} adapter modules ({s['tensors merged']} tensors; {s['tensors copied']} copied) "
          f"into {len(s['outputs'])} file(s), {s['bytes'] / 2**20:.1f} MiB in {s['seconds']:.1f} s")
    for p in s["outputs"]:
        print(f"  {p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a PEFT adapter into base safetensors weights (correctly rounded)",
                       description=model_merge.__doc__.split("\n\n")[0])
    p.add_argument("base", help="base model: a .safetensors file, a folder, or model.safetensors.index.json")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output file (single-file base) or folder (sharded base)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)

"""Turn a SAMG checkpoint into one its base algorithm loads: awac_samg -> awac, cql_samg -> cql.

    python scripts/samg_to_base.py runs/<awac_samg run>/offline.pt runs/awac_from_samg.pt
    python algorithms/awac.py --env <dataset> --load_model runs/awac_from_samg.pt --offline_iterations 0

A SAMG file's agent holds its base algorithm's networks, optimizers and counters under the same
names, plus SAMG's own state (the C-VAE, its optimizer and reference ELBOs, the frozen offline
critic) under "samg". This drops "samg" and renames the algorithm, so the base file's
`--load_model` fine-tunes the SAMG-pretrained actor and critics as it would its own, with the
offline data kept in its buffer and no guidance: what separates SAMG's guidance from its 100%-online
buffer. The state normalisation constants travel with the checkpoint and the base file checks them
as usual. Only the agent is used by `--load_model`; the checkpoint's online buffer is left as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

BASE_OF = {"awac_samg": "awac", "cql_samg": "cql"}


def convert(source: Path, target: Path) -> str:
    """Write the converted checkpoint to `target`; return the base algorithm's name."""
    if not source.is_file():
        raise SystemExit(f"error: checkpoint '{source}' does not exist.")
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    algorithm = checkpoint.get("algorithm")
    if algorithm not in BASE_OF:
        raise SystemExit(f"error: '{source}' was written by {algorithm}; this converts {', '.join(BASE_OF)} checkpoints.")
    if Path(target).resolve() == Path(source).resolve():
        raise SystemExit("error: the target would overwrite the SAMG checkpoint; name another file.")
    checkpoint["agent"] = {key: value for key, value in checkpoint["agent"].items() if key != "samg"}
    checkpoint["algorithm"] = BASE_OF[algorithm]
    checkpoint["converted_from"] = algorithm
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, target)
    return BASE_OF[algorithm]


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an awac_samg or cql_samg checkpoint (offline.pt, checkpoint.pt)")
    parser.add_argument("target", type=Path, help="where to write the base algorithm's checkpoint")
    args = parser.parse_args(argv)
    base = convert(args.source, args.target)
    print(f"Wrote {args.target}: load it with algorithms/{base}.py --load_model {args.target}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Keep the shared plumbing blocks of algorithms/*.py byte-identical.

Every algorithm file carries copies of the same blocks, marked

    # === shared: <name> ===
    ...
    # === end shared ===

so that each file runs alone and `diff a.py b.py` shows only the algorithm. Edit a block in one
file, then copy it everywhere:

    python scripts/sync_shared_blocks.py --source algorithms/iql.py   # copy its blocks to the others
    python scripts/sync_shared_blocks.py --check                      # exit 1 if any copy differs
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List

ALGORITHMS = Path(__file__).resolve().parents[1] / "algorithms"
BLOCK = re.compile(r"^# === shared: (?P<name>[^=]+?) ===\n.*?^# === end shared ===\n", re.S | re.M)


def shared_blocks(text: str) -> Dict[str, str]:
    """Block name -> full block text (markers included). A name may appear once per file."""
    blocks: Dict[str, str] = {}
    for match in BLOCK.finditer(text):
        name = match.group("name")
        if name in blocks:
            raise ValueError(f"shared block '{name}' appears twice")
        blocks[name] = match.group(0)
    return blocks


def algorithm_files() -> List[Path]:
    return sorted(p for p in ALGORITHMS.glob("*.py") if p.name != "__init__.py")


def differences(files: List[Path]) -> List[str]:
    """One line per block whose copies are not all identical."""
    copies: Dict[str, Dict[str, List[Path]]] = {}
    for path in files:
        for name, text in shared_blocks(path.read_text()).items():
            copies.setdefault(name, {}).setdefault(text, []).append(path)
    problems = []
    for name, variants in sorted(copies.items()):
        if len(variants) > 1:
            groups = " | ".join(", ".join(p.name for p in paths) for paths in variants.values())
            problems.append(f"block '{name}' has {len(variants)} different versions: {groups}")
    return problems


def sync(source: Path, files: List[Path]) -> List[Path]:
    """Replace every block of each file with the source's block of the same name."""
    reference = shared_blocks(source.read_text())
    changed = []
    for path in files:
        text = path.read_text()
        new = BLOCK.sub(lambda m: reference.get(m.group("name"), m.group(0)), text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="file whose blocks are copied into the others")
    parser.add_argument("--check", action="store_true", help="only report differing blocks")
    args = parser.parse_args()
    files = algorithm_files()
    if args.check or args.source is None:
        problems = differences(files)
        print("\n".join(problems) if problems else f"all shared blocks identical across {len(files)} files")
        sys.exit(1 if problems else 0)
    for path in sync(args.source.resolve(), files):
        print(f"updated {path.relative_to(ALGORITHMS.parent)}")


if __name__ == "__main__":
    main()

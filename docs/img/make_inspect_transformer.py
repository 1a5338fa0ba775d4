"""Make docs/img/inspect-transformer.png: the demo Transformer with a planted bug, read back.

Run from the repository root: ``python docs/img/make_inspect_transformer.py [LOGDIR]``; a LOGDIR
that already holds the run (``LOGDIR/transformer``) is plotted again without training.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from gradwatch.inspect import load, plot
from tests.helpers.transformer_run import fit_buggy_transformer


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    if not (root / "transformer").exists():
        fit_buggy_transformer(root, steps=12, check_every=4)
    out = Path(__file__).with_name("inspect-transformer.png")
    plot(load(root), out)
    from PIL import Image  # a 256-colour palette keeps the page light (matplotlib needs Pillow)

    with Image.open(out) as img:
        small = img.convert("RGB").quantize(256)
    small.save(out, optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KB), logs in {root}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Create the untrained placeholder model (random weights, fixed seed, the embedded model's
architecture) that ``thrift-vllm serve`` uses until the trained model is shipped.

    python scripts/make_placeholder_model.py        # -> models/thrift-placeholder-untrained
    python scripts/make_placeholder_model.py --out DIR --seed 0 --overwrite
"""

from __future__ import annotations

import argparse

from thrift_vllm.server.models import (
    PLACEHOLDER_NAME,
    PLACEHOLDER_SEED,
    make_placeholder,
    models_dir,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help=f"default: <models dir>/{PLACEHOLDER_NAME}")
    p.add_argument("--seed", type=int, default=PLACEHOLDER_SEED)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    out = make_placeholder(a.out or models_dir() / PLACEHOLDER_NAME, seed=a.seed,
                           overwrite=a.overwrite)
    print(f"untrained placeholder model (seed {a.seed}) in {out}")


if __name__ == "__main__":
    main()

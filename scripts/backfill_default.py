"""One-off: give the shipped default model (built before `facerace train` recorded them) the digests of its
training data and its caveat, then re-evaluate it and rewrite its config and model card (counts and 95%
intervals on every rate).

    python scripts/backfill_default.py --fairface ../shared/datasets/fairface --utkface ../shared/datasets/utkface

The model was trained on 16,100 images of this project's FairFace train folder as it was then; the folder
has grown to 30,100 since, and which 16,100 were used is no longer known (the label CSV is sorted by file
number). So its digest file lists every image of FairFace train: evaluating it on any of them warns, which
is right for 16,100 of them and cautious for the rest. For the same reason its held-out split cannot be
rebuilt, so it keeps its one recorded threshold (for fairface7; coarser schemes fall back to it).
`scripts/build_model.py default` makes this script unnecessary: `facerace train` records the exact
training files and one threshold per scheme itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_model import finish  # noqa: E402

from facerace.files import sha256_file  # noqa: E402
from facerace.model import ModelConfig, load_config, shipped_dir, write_training_digests  # noqa: E402
from facerace.training.datasets import open_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", required=True, type=Path, help="FairFace folder with fairface_label_train.csv")
    ap.add_argument("--utkface", type=Path, help="UTKFace folder (cross-dataset evaluation only)")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args()

    target = shipped_dir("default")
    config = load_config("default")
    samples = open_dataset(f"fairface:{args.fairface}", "train").samples
    digests = write_training_digests(target, [sha256_file(s.path) for s in samples])
    note = (f"; {digests['training_files']} lists all {len(samples):,} images of that folder today, "
            "which grew after the build (which 16,100 were drawn is no longer known)")
    config = ModelConfig.from_dict({**config.to_dict(), **digests,
                                    "trained_on": config.trained_on.split(";")[0] + note})
    (target / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    finish("default", target, config, args.fairface, args.utkface, workers=args.workers, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()

"""``plasticine evaluate`` on the demo's T1 -> PD case, with the shipped translator.

The demo's case (:mod:`plasticine.demo`): the real BrainWeb T1 slice deformed per subject, its
PD-like targets with enlarged ventricles. The script writes image and label folders as a user would
have them (NIfTI, float32, so that the intensities are read back exactly with ``--normalization none``;
labels 0 background, 1 ventricles; needs nibabel), then runs the command on them:

* sources: the demo's test subjects (the real slice and 3 deformed ones), labelled with their
  ventricle masks, and their true PD-like targets as the paired ``--truth``;
* targets: the demo's training targets with their (enlarged) ventricle masks, on which the
  segmentation U-Net is trained;
* the translator: the shipped demo checkpoint.

Run (any other option is passed on to ``plasticine evaluate``)::

    python examples/evaluate_t1_pd.py --outdir t1pd-eval                       # 400 segmentation and 400 DDIB steps
    python examples/evaluate_t1_pd.py --small --outdir t1pd-eval               # 8 training targets, 20 segmentation steps, no DDIB
    python examples/evaluate_t1_pd.py --outdir t1pd-eval --threads 2 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plasticine.cli import main
from plasticine.demo import DemoConfig, make_cohort, shipped_checkpoint
from plasticine.io import write_image


def write_case(root: Path, train_subjects: int, config: DemoConfig = DemoConfig()) -> None:
    """Write the T1 -> PD case as folders of NIfTI images and labels under ``root``."""
    test = make_cohort(config, config.test_subjects, config.seed, include_real=True)
    train = make_cohort(config, train_subjects, config.seed + 1, include_real=False)
    for i in range(len(test)):
        write_image(root / "source" / f"subject{i}.nii.gz", test.sources[i])
        write_image(root / "source_labels" / f"subject{i}.nii.gz", test.source_masks[i].float())
        write_image(root / "truth" / f"subject{i}.nii.gz", test.targets[i])
    for i in range(len(train)):
        write_image(root / "target" / f"pd{i:02d}.nii.gz", train.targets[i])
        write_image(root / "target_labels" / f"pd{i:02d}.nii.gz", train.target_masks[i].float())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="plasticine evaluate on the demo's T1 -> PD case")
    parser.add_argument("--outdir", type=Path, default=Path("t1pd-evaluation"), help="folder for the data and the evaluation")
    parser.add_argument("--small", action="store_true", help="8 training targets, 20 segmentation steps, no DDIB: a quick check")
    options, passed = parser.parse_known_args()
    d = options.outdir / "data"
    write_case(d, 8 if options.small else DemoConfig().train_subjects)
    args = ["evaluate", "--source", str(d / "source"), "--source-labels", str(d / "source_labels"), "--truth", str(d / "truth")]
    args += ["--target", str(d / "target"), "--target-labels", str(d / "target_labels"), "--normalization", "none", "--classes", "2"]
    args += ["--model", str(shipped_checkpoint()), "--output", str(options.outdir / "evaluation")]
    args += ["--segmentation-steps", "20", "--no-ddib", "--quiet"] if options.small else ["--segmentation-steps", "400", "--ddib-steps", "400"]
    sys.exit(main(args + passed))

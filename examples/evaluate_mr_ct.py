"""``plasticine train`` and ``plasticine evaluate`` on the real unpaired MR -> CT case.

The case of :func:`plasticine.data.crossmodal.crossmodal_case`: axial slices of the Colin27 T1 MR head (Debian
``mricron-data``) and of the InVesalius head CT (Debian ``invesalius-examples``), unpaired, on one
pixel grid, intensities in [0, 1] (the CT in a soft-tissue to bone window). The script writes them
as a user would have them (NIfTI folders, float32, read back with ``--normalization none``; labels
0 background, 1 the brain in the MR and the intracranial space in the CT; needs nibabel), then

* trains a translator with ``plasticine train``'s defaults on the training MR slices (sources) and
  the training CT slices (targets): every fourth slice of each is held out, as in
  ``benchmarks/crossmodal.py``;
* runs ``plasticine evaluate`` with the held-out MR slices and their brain masks as the sources and
  the training CT slices with their intracranial masks as the segmentation network's targets.

Run (any other option is passed on to ``plasticine evaluate``)::

    python examples/evaluate_mr_ct.py --outdir mrct-eval                  # 128 x 128, 400 + 300 training steps, DDIB 200 steps
    python examples/evaluate_mr_ct.py --small --outdir mrct-eval          # 32 x 32, a few steps, no DDIB: a quick check

Without the two Debian packages the script says which one is missing and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from plasticine.cli import main
from plasticine.io import write_image


def write_case(root: Path, size: int) -> None:
    """Write the MR -> CT case as folders of NIfTI images and labels under ``root``."""
    from plasticine.data.crossmodal import crossmodal_case

    case = crossmodal_case(size)
    held = lambda n: [i for i in range(n) if i % 4 == 2]  # noqa: E731  (benchmarks/crossmodal.py's split)
    mr_held, ct_held = held(len(case.source)), held(len(case.target))
    for i in range(len(case.source)):
        image = torch.from_numpy(case.source[i]).float()[None]
        if i in mr_held:
            write_image(root / "mr_test" / f"mr{i:03d}.nii.gz", image)
            write_image(root / "mr_test_labels" / f"mr{i:03d}.nii.gz", torch.from_numpy(case.source_brain[i]).float()[None])
        else:
            write_image(root / "mr_train" / f"mr{i:03d}.nii.gz", image)
    for i in range(len(case.target)):
        if i not in ct_held:
            write_image(root / "ct_train" / f"ct{i:03d}.nii.gz", torch.from_numpy(case.target[i]).float()[None])
            write_image(root / "ct_train_labels" / f"ct{i:03d}.nii.gz", torch.from_numpy(case.target_intracranial[i]).float()[None])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="plasticine train and evaluate on the real MR -> CT case")
    parser.add_argument("--outdir", type=Path, default=Path("mrct-evaluation"), help="folder for the data, the model and the evaluation")
    parser.add_argument("--small", action="store_true", help="32 x 32 slices, a few training steps, no DDIB: a quick check")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    options, passed = parser.parse_known_args()
    d = options.outdir / "data"
    try:
        write_case(d, 32 if options.small else 128)
    except (FileNotFoundError, ImportError) as error:
        print(f"evaluate_mr_ct: the real MR -> CT case is not installed here: {error}", file=sys.stderr)
        sys.exit(0)
    model = options.outdir / "model.pt"
    steps = ["--diffusion-steps", "4", "--registration-steps", "4"] if options.small else ["--diffusion-steps", "400", "--registration-steps", "300"]
    code = main(
        ["--threads", str(options.threads), "train", "--source", str(d / "mr_train"), "--target", str(d / "ct_train"), "--output", str(model), "--normalization", "none", *steps]
        + (["--quiet"] if options.small else [])
    )
    if code:
        sys.exit(code)
    args = ["--threads", str(options.threads), "evaluate", "--source", str(d / "mr_test"), "--source-labels", str(d / "mr_test_labels")]
    args += ["--target", str(d / "ct_train"), "--target-labels", str(d / "ct_train_labels"), "--normalization", "none", "--classes", "2"]
    args += ["--model", str(model), "--output", str(options.outdir / "evaluation")]
    args += ["--segmentation-steps", "10", "--no-ddib", "--no-figures", "--quiet"] if options.small else ["--segmentation-steps", "400", "--ddib-steps", "200"]
    sys.exit(main(args + passed))

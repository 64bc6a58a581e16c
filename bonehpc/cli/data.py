"""`bonehpc synth`, `bonehpc manifest` and `bonehpc folds`: data set, manifest and cross-validation folds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the data commands to the `bonehpc` subparsers."""
    p = sub.add_parser(
        "synth",
        help="write a synthetic data set in the exact MURA-v1.1 layout",
        description="Write DIR/MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageM.png "
        "and the four official headerless CSVs. Procedural radiographs of the seven MURA body parts; abnormal "
        "studies (--abnormal-rate, 40 %% by default) show a fracture (healing, plated or in a cast). "
        "A few files are unusable on purpose "
        "(--bad-frac), so the pipeline meets bad data like real collections; DIR/MURA-v1.1/bonehpc_synthetic.json "
        "marks the set as synthetic and lists them. Same arguments, same bytes.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder that will contain MURA-v1.1/")
    p.add_argument("--patients", type=int, default=100, help="patients over both splits (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-side", type=int, default=512, help="longest image side in pixels (default 512, as MURA)")
    p.add_argument("--valid-frac", type=float, default=0.2, help="fraction of patients in the valid split (0.2)")
    p.add_argument("--rgb-frac", type=float, default=0.1, help="fraction of images saved as RGB PNGs (0.1)")
    p.add_argument(
        "--bad-frac",
        type=float,
        default=0.01,
        help="fraction of image files written unusable on purpose: truncated, 0 bytes, not an image; at least one "
        "of each, and one train study loses all its images (default 0.01; 0: none)",
    )
    p.add_argument(
        "--abnormal-rate",
        type=float,
        default=0.4,
        help="fraction of abnormal studies in each split (default 0.4, about MURA's; e.g. 0.15 for a skewed set)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic DIR/MURA-v1.1")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "manifest",
        help="check the official MURA CSVs and files; print (and save) the per-image manifest summary",
        description="Read the four MURA-v1.1 CSVs (the CSVs are the truth; the tree is not walked), check that "
        "every listed image exists and every label agrees with its study folder, and print images, studies, "
        "patients and abnormal-study rate per split x body part. Exit code 2 on bad input.",
    )
    p.add_argument("--mura-root", required=True, type=Path, help="folder that contains MURA-v1.1/ (or MURA-v1.1)")
    p.add_argument("--out", type=Path, help="write the manifest CSV here (e.g. runs/<exp>/manifest.csv)")
    p.add_argument("--strict", action="store_true", help="fail (instead of warn) on labeled studies without images")
    p.add_argument(
        "--cross-split-patients",
        action="store_true",
        help="accept a patient number in both the train and the valid split (refused by default: a holdout leak)",
    )
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "folds",
        help="assign train patients to K patient-grouped, label x body-part stratified folds",
        description="Split the official train split into K folds by patient (StratifiedGroupKFold, strata "
        "body part x label) and print patients, studies, images and abnormal rate per fold. The official valid "
        "split never enters a fold: it is the holdout (fold -1).",
    )
    p.add_argument("--manifest", required=True, type=Path, help="manifest CSV written by `bonehpc manifest --out`")
    p.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--out", type=Path, help="write the folds CSV (patient, fold) here (e.g. runs/<exp>/folds.csv)")
    p.set_defaults(func=cmd_folds)


def _fail(what: str, err: Exception | str) -> int:
    print(f"bonehpc: {what}: {err}", file=sys.stderr)
    return 2


def cmd_synth(args: argparse.Namespace) -> int:
    from bonehpc.data.synthetic import generate

    try:
        root = generate(
            args.out,
            patients=args.patients,
            seed=args.seed,
            max_side=args.max_side,
            valid_frac=args.valid_frac,
            rgb_frac=args.rgb_frac,
            bad_frac=args.bad_frac,
            overwrite=args.overwrite,
            abnormal_rate=args.abnormal_rate,
        )
    except (ValueError, FileExistsError) as err:
        return _fail("synth", err)
    except OSError as err:
        return _fail("synth", f"cannot write in {args.out}: {err.strerror or err}")
    print(root)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from bonehpc.data.mura import ManifestError, build_manifest, summarize, write_manifest

    try:
        df = build_manifest(args.mura_root, strict=args.strict, cross_split_patients=args.cross_split_patients)
    except ManifestError as err:
        return _fail("manifest error", err)
    print(summarize(df).to_string(index=False))
    if args.out:
        try:
            print(f"wrote {write_manifest(df, args.out)} ({len(df)} images)")
        except OSError as err:
            return _fail("manifest", f"cannot write {args.out}: {err.strerror or err}")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from bonehpc.data.folds import FoldError, apply_folds, fold_summary, make_folds, write_folds
    from bonehpc.data.mura import ManifestError, read_manifest

    try:
        manifest = read_manifest(args.manifest)
        folds = make_folds(manifest, args.k, args.seed)
    except ManifestError as err:
        return _fail("manifest error", err)
    except FoldError as err:
        return _fail("folds error", err)
    print(fold_summary(apply_folds(manifest, folds)).to_string(index=False))
    if args.out:
        try:
            print(f"wrote {write_folds(folds, args.out)} ({len(folds)} patients, k={args.k}, seed={args.seed})")
        except OSError as err:
            return _fail("folds", f"cannot write {args.out}: {err.strerror or err}")
    return 0

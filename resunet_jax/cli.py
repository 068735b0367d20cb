"""Console commands installed by `pip install -e .`: `resunet-predict`.

    resunet-predict -i STUDY_OR_FOLDER -o OUT [--model PATH | --ensemble]
        [--backend auto|jax|onnx|openvino] [--precision auto|f32|bf16|int8]
        [--probabilities] [--uncertainty] [--no-flip-tta]

Runs exactly what `launch.py --config=configs/resunet.py --mode=predict` runs
(`predict.predict`), with the shipped model and flip TTA (`eval.flip_tta`, which its
calibrated rules and the review flag need) by default, and writes the same files into
OUT instead of WORKDIR/predict/ (an earlier OUT is moved aside, never overwritten).
`launch.py` stays the research entry point, with every config key.
"""

import argparse
import os
import sys

from absl import logging

from resunet_jax import config_schema, errors, predict

# The checkout that `pip install -e .` installed: configs/ and pretrained/ beside the package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "resunet.py")
MODEL = os.path.join(ROOT, "pretrained", "resunet_lgg")
ENSEMBLE = os.path.join(ROOT, "pretrained", "resunet_lgg_5fold")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resunet-predict",
        description="Outline lower-grade glioma (FLAIR abnormality) in brain MRI: NIfTI, "
        "DICOM series or .tif slices in; masks on the input's grid, patients.csv and an "
        "HTML report (OUT/index.html) out. Research use only.",
    )
    p.add_argument("-i", "--input", required=True, help="a volume, series folder or folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default="", help=f"checkpoint or exported model ({MODEL})")
    model.add_argument(
        "--ensemble", action="store_true", help=f"the shipped 5-fold ensemble ({ENSEMBLE})"
    )
    p.add_argument(
        "--backend",
        default="",
        choices=config_schema.BACKENDS,
        help="what runs the model (default auto: OpenVINO, else ONNX Runtime, where the "
        "model has its exported graph; else jax)",
    )
    p.add_argument(
        "--precision",
        default="",
        choices=config_schema.PRECISIONS,
        help="OpenVINO's arithmetic (default auto: INT8 where exported, else bf16 where "
        "the CPU has it, else f32)",
    )
    p.add_argument("--probabilities", action="store_true", help="also write probability maps")
    p.add_argument("--uncertainty", action="store_true", help="also write uncertainty maps")
    p.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average with the mirrored slices (twice the time): what the shipped models' "
        "calibrated rules and the review flag are chosen with (default: on)",
    )
    return p


def predict_config(args: argparse.Namespace):
    """The `--mode=predict` config the arguments name (configs/resunet.py, resolved and
    validated)."""
    config = config_schema.load_config_file(CONFIG)
    config.checkpoint = args.model or (ENSEMBLE if args.ensemble else MODEL)
    config.predict.input = args.input
    config.predict.save_probabilities = args.probabilities
    config.predict.save_uncertainty = args.uncertainty
    config.eval.flip_tta = args.flip_tta
    config.inference.backend = args.backend or config.inference.backend
    config.inference.precision = args.precision or config.inference.precision
    config = config_schema.resolve_defaults(config)
    config_schema.validate(config, "predict")
    return config


def predict_main(argv: list[str] | None = None) -> int:
    """`resunet-predict`: the exit status (0 done, 1 a bad input, model or setting)."""
    args = parser().parse_args(argv)
    logging.use_absl_handler()  # the same log lines as launch.py's
    logging.set_verbosity(logging.INFO)
    try:
        config = predict_config(args)
        out = os.path.abspath(args.output)
        predict.predict(config, os.path.dirname(out), out_dir=out)
    except errors.UserError as e:
        logging.error("%s", e)
        return 1
    print(f"Report: {os.path.join(out, 'index.html')}", file=sys.stderr)
    return 0


def main():
    sys.exit(predict_main())

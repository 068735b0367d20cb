"""The LGG recipe: the seed ResUNet on a patient-level split.

Demo on built-in synthetic phantom data (no dataset needed; minutes on a laptop CPU):
  python launch.py --config=configs/resunet.py --workdir=runs/demo

Train on the Kaggle LGG data (kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation):
  python launch.py --config=configs/resunet.py --workdir=runs/lgg \\
      --config.data.dir=PATH/kaggle_3m

Evaluate a run's best checkpoint (or any: --config.checkpoint=PATH):
  python launch.py --config=configs/resunet.py --workdir=runs/lgg --mode=eval \\
      --config.data.dir=PATH/kaggle_3m

Cross-validate: train folds k = 0..4 as separate runs (--config.data.fold=k
--workdir=runs/cv/fold_k), then report each on its own fold:
  python launch.py --config=configs/resunet.py --workdir=runs/cv_report --mode=cv \\
      --config.data.dir=PATH/kaggle_3m --config.checkpoint=runs/cv
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init, shuffling and augmentation

    # The seed ResUNet (1,206,129 parameters); see resunet_jax/models.py.
    config.model = ml_collections.ConfigDict()
    config.model.stem_features = 16
    config.model.features = (32, 64, 128)
    config.model.bottleneck_features = 256
    config.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters and loss
    # True: a slice-level tumour classifier on the bottleneck, trained jointly; a slice
    # whose tumour probability is under the threshold chosen on the validation patients
    # gets an empty mask. False: a slice's tumour score is its highest pixel
    # probability, so "tumour" = a confident predicted mask (docs/experiments.md
    # compares the two).
    config.model.detection_head = False
    # Deep supervision (nnU-Net): k > 0 also trains 1x1 logit heads on the k decoder
    # blocks before the last (1/2, ..., 1/2**k of the side), with loss weights 1/2**j;
    # prediction uses the full-resolution head only. 0 = off.
    config.model.deep_supervision = 0
    # True: two ResUNets, one for complete slices and one for slices whose pre-contrast
    # is a FLAIR copy (not acquired), each slice routed to its model; evaluation and
    # prediction only, joined from two trained models (checkpointing.join_no_contrast_expert).
    config.model.no_contrast_expert = False

    config.data = ml_collections.ConfigDict()
    # A kaggle_3m-style folder; empty = synthetic phantom data generated under the workdir.
    config.data.dir = ""
    # Where prepared (TFDS) data go, keyed by the source folder; "" = ~/.cache/resunet_jax.
    config.data.prepared_dir = ""
    # Model input side; slices are resized to it. None = defaults.lgg / defaults.synthetic.
    config.data.image_size = config_dict.placeholder(int)
    config.data.num_folds = 5  # patient-level k-fold split ...
    config.data.fold = 0  # ... and the fold used for validation
    config.data.split_seed = 0  # patient permutation of the split
    # "scale": x/255; "slice": per-slice z-score; "volume": each channel z-scored by
    # its patient's brain-pixel mean and std (prediction: the slices of one folder).
    config.data.normalization = "scale"
    # 2.5-D input: each slice with its k neighbours on either side (of the same volume;
    # the end slice repeats past the ends) as 3(2k + 1) channels; 0 = the slice alone.
    config.data.context_slices = 0
    config.data.shuffle_buffer = 1024
    # Share of training slices drawn from slices with tumour; None = natural (~35%).
    config.data.tumor_fraction = 0.5
    # Where training batches come from: "tfdata" streams the prepared data through
    # tf.data (each process its shard); "device" keeps the training split in every
    # device's memory as uint8 and samples it inside the train step (accelerators,
    # machines without TensorFlow; the split must fit: 82 LGG patients at 256 px take
    # 0.8 GB). Both augment on the device, in the step.
    config.data.pipeline = "tfdata"

    # Synthetic phantom data (used when data.dir is empty).
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.num_patients = 20
    config.synthetic.slices_per_patient = 20
    config.synthetic.size = 128  # side of the generated slices
    config.synthetic.seed = 0

    # Drawn per example and applied on the devices inside the train step
    # (resunet_jax/augment.py). Strong, against overfitting the few training patients
    # (docs/experiments.md compares milder settings and the variants dropped).
    config.augment = ml_collections.ConfigDict()
    config.augment.flip = True  # left-right
    config.augment.rotate_degrees = 20.0  # uniform in [-r, r]
    config.augment.scale = 0.2  # zoom uniform in [1-s, 1+s]
    config.augment.intensity = 0.2  # per-channel gain uniform in [1-i, 1+i]
    config.augment.gamma = 0.35  # per-channel gamma: x -> x^γ, log γ uniform in [-g, g]
    # Missing sequences: with this probability a training slice loses its pre-contrast,
    # its post-contrast or both (equally likely), each replaced by its FLAIR, as the LGG
    # data fill a sequence that was not acquired (some patients lack one). Without it the
    # model needs all three sequences (docs/experiments.md). 0 = off.
    config.augment.missing_sequences = 0.0
    # Scanner domains (issue #47; resunet_jax/augment.py's docstring), so that scans from
    # elsewhere are inside the training distribution. All 0 = off (as the recipe trained);
    # configs/domain_aug.py sets the fine-tune's values.
    config.augment.fov = 0.0  # lowest zoom (e.g. 0.75: the head smaller in frame) + shift
    config.augment.blur = 0.0  # probability of a thick-slice Gaussian blur, σ <= 1.5 px
    config.augment.bias_field = 0.0  # strength b of a smooth multiplicative field <= e^b
    config.augment.window = 0.0  # per-sequence window: lo, hi moved up to ±w of the range
    config.augment.skull_strip = 0.0  # probability of a skull-stripped slice

    config.loss = "dice_bce"  # focal_tversky (the seed's) | dice | bce | dice_bce | slice_dice_bce
    config.detection_loss_weight = 0.5  # weight of the detection head's BCE

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # adam | adamw | sgd (Nesterov momentum)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.eps = 1e-8  # adam, adamw
    config.optimizer.weight_decay = 0.0  # adamw only
    config.optimizer.momentum = 0.9  # sgd only
    config.optimizer.schedule = "cosine"  # cosine | constant, after linear warm-up
    config.optimizer.warmup_steps = 50
    config.optimizer.grad_clip_norm = 1.0  # 0 = off
    # Validation, checkpoints and exports use an exponential moving average of the
    # weights (and BatchNorm statistics); 0 = the raw weights. See train.train_step.
    config.ema_decay = 0.999

    config.batch_size = 16  # global: split over all processes and devices
    # None = defaults.lgg / defaults.synthetic.
    config.num_train_steps = config_dict.placeholder(int)
    config.log_every_steps = 20
    config.eval_every_steps = config_dict.placeholder(int)
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 3  # latest kept; the best by val Dice is kept separately

    config.eval = ml_collections.ConfigDict()
    # val: the patients of data.dir that the checkpoint did not train on (its meta lists
    # its training patients); all: every one.
    config.eval.split = "val"
    config.eval.batch_size = 32
    # Average with the left-right mirrored slice (2x cost); each member of an ensemble.
    config.eval.flip_tta = False
    # "largest_component": keep each patient's largest 3D connected component (Buda et
    # al.); metrics.json reports both variants under postprocess_comparison.
    config.eval.postprocess = "none"
    # "pre" | "post" | "both": evaluate as if that sequence (pre- or post-contrast) had
    # not been acquired, its channel filled with the FLAIR as the LGG data do. "" = as is.
    config.eval.missing_sequences = ""
    # Use the calibration.json beside the model (--mode=calibrate: detection and pixel
    # thresholds, post-processing and review rule chosen out-of-fold) when it was chosen
    # with the same eval.flip_tta.
    config.eval.calibration = True

    # --mode=calibrate (resunet_jax/calibrate.py): the share of out-of-fold patients the
    # review flag is set to flag (the most uncertain ones).
    config.calibrate = ml_collections.ConfigDict()
    config.calibrate.review_rate = 0.2

    config.predict = ml_collections.ConfigDict()
    # --mode=predict input: a .tif or NIfTI file, a DICOM series folder, or a folder of them
    # or of patient folders (resunet_jax/predict.py, resunet_jax/data/volumes.py).
    config.predict.input = ""
    # Also write float32 pixel probabilities: <name>_pred_prob.tif per .tif slice,
    # <name>_pred_prob.nii.gz per volume.
    config.predict.save_probabilities = False
    # Also write the float32 pixel uncertainty: the s.d. of the pixel probability across
    # an ensemble's members (and flips with eval.flip_tta; 0 for one model without):
    # <name>_pred_std.tif per .tif slice, <name>_pred_std.nii.gz per volume.
    config.predict.save_uncertainty = False
    # Volumes (NIfTI, DICOM): bring the FLAIR's slices to the training frame (square
    # pixels, the head at the training slices' size and place; resunet_jax/data/
    # harmonise.py) and map the results back. The other sequences are resampled onto the
    # FLAIR's grid either way.
    config.predict.reframe = True

    # Checkpoint to evaluate / predict with ("" = the workdir's best, else latest); with
    # inference.backend=onnx an .onnx file, or a folder or workdir holding model.onnx or
    # export/model.onnx (--mode=export writes WORKDIR/export/model.onnx). Several models
    # predict as an ensemble (probabilities averaged; detection threshold the mean of
    # theirs): comma-separated paths, or a folder of runs (a folder that is not a model
    # itself, whose sub-folders are). --mode=cv takes the runs of the folds this way.
    config.checkpoint = ""
    # Fine-tuning: a new run starts from these weights (a workdir or an exported model
    # such as pretrained/resunet_lgg; same model config) with a fresh optimizer and
    # schedule. Ignored when the workdir already has a checkpoint to resume.
    config.init_checkpoint = ""

    config.inference = ml_collections.ConfigDict()
    # What runs the model in eval and predict: "jax"; "onnx" (ONNX Runtime on the graph
    # --mode=export wrote; no JAX model needed; resunet_jax/export.py); "openvino"
    # (OpenVINO on that graph, the fastest on CPUs; pip install -e ".[openvino]"); or
    # "auto": on a CPU the fastest of openvino and onnx installed where the checkpoint
    # has its graph of the same step, else (and on GPUs and TPUs) jax.
    config.inference.backend = "auto"
    # The arithmetic of the openvino backend: "auto" (the INT8 model where
    # --mode=export --config.export.int8=True wrote it beside model.onnx, else bf16 where
    # the CPU has it, e.g. AVX512-BF16 or AMX, else f32), "f32", "bf16", or "int8". The
    # jax and onnx backends take auto or f32 (jax: model.dtype).
    config.inference.precision = "auto"

    config.export = ml_collections.ConfigDict()
    # --mode=export output: an .onnx (a .json beside it; "" = WORKDIR/export/model.onnx),
    # or a new folder for the weights and meta alone, as pretrained/ holds them.
    config.export.path = ""
    # Also write its INT8 post-training quantization (NNCF; OpenVINO IR, model.int8.xml
    # and .bin beside the .onnx), calibrated on this many slices of the checkpoint's
    # training patients under data.dir (never on patients it is scored on).
    config.export.int8 = False
    config.export.calibration_slices = 600

    # Multi-host: call jax.distributed.initialize (auto-detects SLURM, TPU pods, ...).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; "" = auto-detect
    config.distributed.num_processes = 0  # 0 = auto-detect
    config.distributed.process_id = -1  # -1 = auto-detect

    # Defaults by data source for the fields left None above.
    config.defaults = ml_collections.ConfigDict()
    # The shipped weights' recipe: 3000 steps x 16 slices at 128 px; validation every 250
    # steps picks the best checkpoint.
    config.defaults.lgg = {
        "data": {"image_size": 128},
        "num_train_steps": 3000,
        "eval_every_steps": 250,
    }
    config.defaults.synthetic = {
        "data": {"image_size": 64},
        "num_train_steps": 800,
        "eval_every_steps": 200,
    }
    return config

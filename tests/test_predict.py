import csv
import os

import jax
import numpy as np
import pytest
import tifffile

from configs import tiny
from resunet_jax import (
    checkpointing,
    config_schema,
    errors,
    inference,
    models,
    postprocess,
    predict,
    train,
)


def _export_tiny(path, seed=0, train_patients=(), threshold=None, **data):
    """Exports an untrained tiny model like the shipped weights (params + BN only).

    Args:
        path: export directory.
        seed: parameter init; also sets meta's step (10 + seed) and detection
            threshold (0.4 + seed / 10), so two exports can be told apart.
        train_patients: meta's training patients.
        threshold: meta's detection threshold instead of 0.4 + seed / 10.
        **data: `config.data` overrides (e.g. normalization="volume").

    Returns:
        `path` as a string.
    """
    config = tiny.get_config()
    config.model.detection_head = False  # "tumour" = non-empty mask, so some slices are
    config.data.update(data)
    state = train.create_train_state(
        jax.random.key(seed), config, models.create_model(config.model)
    )
    meta = {
        "step": 10 + seed,
        "config": config_schema.config_json(config),
        "val_metrics": {"detection_threshold": 0.4 + seed / 10 if threshold is None else threshold},
        "train_patients": list(train_patients),
    }
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    checkpointing.export_model(str(path), variables, meta)
    return str(path)


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """An untrained tiny model exported like pretrained weights."""
    return _export_tiny(tmp_path_factory.mktemp("model"))


def _inputs(folder):
    rng = np.random.default_rng(0)
    os.makedirs(folder / "patient", exist_ok=True)
    tifffile.imwrite(folder / "patient" / "gray_2.tif", rng.integers(0, 256, (32, 32), np.uint8))
    tifffile.imwrite(
        folder / "patient" / "deep_10.tif",
        rng.integers(0, 65536, (32, 32, 3), np.uint16),
        compression="zlib",
    )
    tifffile.imwrite(folder / "patient" / "odd_3.tif", rng.integers(0, 256, (50, 37, 3), np.uint8))
    tifffile.imwrite(folder / "patient" / "odd_3_mask.tif", np.zeros((50, 37), np.uint8))
    (folder / "patient" / "broken_4.tif").write_bytes(b"II*\x00garbage")
    (folder / "patient" / "notes_5.tif").write_text("not an image")


def test_predict_handles_user_inputs_and_reports_bad_files(tmp_path, exported_model):
    _inputs(tmp_path / "in")
    config = tiny.get_config()
    config.checkpoint = exported_model
    config.predict.input = str(tmp_path / "in")
    rows = predict.predict(config, str(tmp_path / "work"))
    by_name = {os.path.basename(r["file"]): r for r in rows}
    assert sorted(by_name) == [
        "broken_4.tif",
        "deep_10.tif",
        "gray_2.tif",
        "notes_5.tif",
        "odd_3.tif",
    ]  # masks are skipped
    for name in ("broken_4.tif", "notes_5.tif"):
        assert by_name[name]["error"].startswith(str(tmp_path / "in" / "patient" / name))
    out = tmp_path / "work" / "predict" / "patient"
    for name, shape in (("gray_2", (32, 32)), ("deep_10", (32, 32)), ("odd_3", (50, 37))):
        mask = tifffile.imread(out / f"{name}_pred_mask.tif")
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        row = by_name[f"{name}.tif"]
        assert row["error"] == "" and row["predicted_area_pixels"] == int((mask > 0).sum())
        assert os.path.exists(out / f"{name}_overlay.png") == row["tumor"]
    with open(tmp_path / "work" / "predict" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    # The folder is one patient: its three readable slices, lesion in pixels.
    with open(tmp_path / "work" / "predict" / "patients.csv") as f:
        (patient,) = list(csv.DictReader(f))
    assert patient["patient"] == "patient" and patient["num_slices"] == "3"
    assert patient["lesion_volume_unit"] == "pixels"
    assert int(patient["lesion_volume"]) == sum(
        by_name[n]["predicted_area_pixels"] for n in ("gray_2.tif", "deep_10.tif", "odd_3.tif")
    )
    # Predicting another input moves this output aside instead of mixing with it.
    config.predict.input = str(tmp_path / "in" / "patient" / "gray_2.tif")
    config.predict.save_probabilities = True
    predict.predict(config, str(tmp_path / "work"))
    (kept,) = [p for p in (tmp_path / "work").iterdir() if p.name.startswith("predict_")]
    with open(kept / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    overlay = ["gray_2_overlay.png"] if by_name["gray_2.tif"]["tumor"] else []
    assert sorted(os.listdir(tmp_path / "work" / "predict")) == [
        *overlay,
        "gray_2_pred_mask.tif",
        "gray_2_pred_prob.tif",
        "gray_2_preview.png",
        "index.html",
        "patients.csv",
        "patients.json",
        "predictions.csv",
    ]
    probs = tifffile.imread(tmp_path / "work" / "predict" / "gray_2_pred_prob.tif")
    assert probs.shape == (32, 32) and probs.dtype == np.float32
    mask = tifffile.imread(tmp_path / "work" / "predict" / "gray_2_pred_mask.tif") > 0
    assert (mask <= (probs >= 0.5)).all()  # the mask is the gated probability map


def test_inputs_are_found_through_links_and_a_link_cycle_ends(tmp_path):
    _inputs(tmp_path / "store")
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "store" / "patient", tmp_path / "in" / "linked")
    os.symlink(tmp_path / "in", tmp_path / "in" / "linked_again")  # a cycle
    found = predict.find_inputs(str(tmp_path / "in")).slices
    names = [os.path.relpath(f, tmp_path / "in") for f in found]
    assert names == [
        "linked/broken_4.tif",
        "linked/deep_10.tif",
        "linked/gray_2.tif",
        "linked/notes_5.tif",
        "linked/odd_3.tif",
    ]


def test_load_slice_normalises_channels_and_depth(tmp_path):
    gray = tmp_path / "g.tif"
    tifffile.imwrite(gray, np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    image = predict.load_slice(str(gray))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    chw = tmp_path / "c.tif"
    tifffile.imwrite(chw, np.zeros((3, 20, 24), np.uint8), photometric="minisblack")
    assert predict.load_slice(str(chw)).shape == (20, 24, 3)


def test_load_slice_names_the_file_and_the_problem(tmp_path):
    nan = np.ones((16, 16), np.float32)
    nan[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((16, 16, 2), np.uint8))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((4, 16, 16, 3), np.uint8))
    for name, problem in (
        ("nan.tif", "1 non-finite values (NaN or inf)"),
        ("two.tif", "not a 2-D slice (shape (16, 16, 2);"),
        ("stack.tif", "not a 2-D slice (shape (4, 16, 16, 3);"),
    ):
        with pytest.raises(errors.DataError) as e:
            predict.load_slice(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: {problem}")


def test_predict_errors_on_empty_or_missing_input(tmp_path, exported_model):
    config = tiny.get_config()
    config.checkpoint = exported_model
    (tmp_path / "empty").mkdir()
    for path, message in (
        (tmp_path / "empty", "no .tif slices, NIfTI"),
        (tmp_path / "nope", "no such"),
    ):
        config.predict.input = str(path)
        with pytest.raises(errors.DataError, match=message):
            predict.predict(config, str(tmp_path / "work"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tif").write_text("nope")
    config.predict.input = str(tmp_path / "bad")
    with pytest.raises(errors.DataError, match="none of the 1"):
        predict.predict(config, str(tmp_path / "work"))


def test_shipped_weights_restore_and_call_an_empty_slice_tumour_free(tmp_path):
    shipped = os.path.join(os.path.dirname(__file__), "..", "pretrained", "resunet_lgg")
    variables, meta = checkpointing.restore_model(shipped)
    assert set(variables) == {"params", "batch_stats"}  # no optimizer state
    assert meta["config"]["data"]["image_size"] == 128
    assert meta["config"]["model"]["no_contrast_expert"]  # two networks, routed per slice
    assert set(variables["params"]) == {"complete", "no_contrast"}
    os.makedirs(tmp_path / "in")
    tifffile.imwrite(tmp_path / "in" / "blank_1.tif", np.zeros((256, 256, 3), np.uint8))
    config = tiny.get_config()
    config.checkpoint = shipped
    config.predict.input = str(tmp_path / "in" / "blank_1.tif")
    (row,) = predict.predict(config, str(tmp_path / "work"))
    assert not row["error"] and row["tumor"] is False and row["predicted_area_pixels"] == 0


def test_volume_normalised_model_predicts_a_folder_the_same_at_any_gain(tmp_path):
    """ "volume" statistics come from the slice's folder, so a patient scanned at twice
    the gain gets the same predictions."""
    _export_tiny(tmp_path / "model", normalization="volume")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 128, (3, 32, 32, 3), np.uint8)
    images[:, :6] = 0  # background
    for folder, factor in (("dim", 1), ("bright", 2)):
        os.makedirs(tmp_path / "in" / folder)
        for k, image in enumerate(images):
            tifffile.imwrite(tmp_path / "in" / folder / f"s_{k}.tif", image * factor)
    config = tiny.get_config()
    config.checkpoint = str(tmp_path / "model")
    config.predict.input = str(tmp_path / "in")
    rows = predict.predict(config, str(tmp_path / "work"))
    probs = {os.path.relpath(r["file"], tmp_path / "in"): r["tumor_probability"] for r in rows}
    assert len(probs) == 6
    for k in range(3):
        assert probs[f"dim/s_{k}.tif"] == pytest.approx(probs[f"bright/s_{k}.tif"], abs=1e-4)
    # Statistics are the folder's, not the slice's: one slice alone is normalised apart.
    config.predict.input = str(tmp_path / "in" / "dim" / "s_0.tif")
    (alone,) = predict.predict(config, str(tmp_path / "work2"))
    assert alone["tumor_probability"] != pytest.approx(probs["dim/s_0.tif"], abs=1e-6)


def test_context_model_takes_neighbours_from_the_folder_in_natural_order(tmp_path):
    """A 2.5-D model (data.context_slices=1) sees each slice with the slices before and
    after it in its folder: s_2 and s_10 are neighbours, s_1 and s_10 are not."""
    variables, _ = checkpointing.restore_model(_export_tiny(tmp_path / "model", context_slices=1))
    assert variables["params"]["stem_conv1"]["kernel"].shape[2] == 9
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
    for folder, last in (("a", images[2]), ("b", images[3])):  # only s_10 differs
        os.makedirs(tmp_path / "in" / folder)
        for name, image in (("s_1", images[0]), ("s_2", images[1]), ("s_10", last)):
            tifffile.imwrite(tmp_path / "in" / folder / f"{name}.tif", image)
    config = tiny.get_config()  # context_slices comes from the checkpoint
    config.checkpoint = str(tmp_path / "model")
    config.predict.input = str(tmp_path / "in")
    rows = predict.predict(config, str(tmp_path / "work"))
    probs = {os.path.relpath(r["file"], tmp_path / "in"): r["tumor_probability"] for r in rows}
    assert len(probs) == 6 and not any(r["error"] for r in rows)
    assert probs["a/s_1.tif"] == pytest.approx(probs["b/s_1.tif"], abs=1e-6)
    assert probs["a/s_2.tif"] != pytest.approx(probs["b/s_2.tif"], abs=1e-4)


def test_largest_component_post_processing_applies_per_folder_as_in_evaluation(
    tmp_path, exported_model, monkeypatch
):
    # A stand-in model whose pixel probability is the input's first channel, so each
    # slice's prediction is the bright squares drawn into it.
    def probabilities(self, inputs):
        probs = inputs[..., 0]
        return probs, probs.max(axis=(-2, -1)), np.zeros_like(probs)

    monkeypatch.setattr(inference.Predictor, "_probabilities", probabilities)
    folder = tmp_path / "in" / "patient"
    os.makedirs(folder)
    for i in range(1, 5):
        image = np.zeros((32, 32, 3), np.uint8)
        image[4:20, 4:20] = 255  # one lesion through all slices ...
        if i == 3:
            image[26:29, 26:29] = 255  # ... and a separate speck on one
        tifffile.imwrite(folder / f"slice_{i}.tif", image)
    masks = {}
    for method in ("none", "largest_component"):
        config = tiny.get_config()
        config.checkpoint = exported_model
        config.predict.input = str(tmp_path / "in")
        config.eval.postprocess = method
        predict.predict(config, str(tmp_path / method))
        out = tmp_path / method / "predict" / "patient"
        masks[method] = np.stack(
            [tifffile.imread(out / f"slice_{i}_pred_mask.tif") > 0 for i in range(1, 5)]
        )
    assert masks["none"][2, 27, 27] and not masks["largest_component"][2, 27, 27]
    np.testing.assert_array_equal(
        masks["largest_component"], postprocess.largest_component_3d(masks["none"])
    )
    assert masks["largest_component"][:, 10, 10].all()


def test_joined_model_predicts_flair_only_slices_with_its_no_contrast_model(tmp_path):
    complete = _export_tiny(tmp_path / "complete", 0, ["a", "b"])
    no_contrast = _export_tiny(tmp_path / "no_contrast", 1, ["b", "c"])
    variables, meta = checkpointing.join_no_contrast_expert(complete, no_contrast)
    checkpointing.export_model(str(tmp_path / "joined"), variables, meta)
    _, meta = checkpointing.restore_model(str(tmp_path / "joined"))
    assert meta["config"]["model"]["no_contrast_expert"] is True
    assert meta["train_patients"] == ["a", "b", "c"]  # evaluation skips all of them
    assert meta["val_metrics"]["detection_threshold"] == 0.4  # the complete model's
    assert meta["no_contrast_expert"]["step"] == 11

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "in")
    tifffile.imwrite(tmp_path / "in" / "rgb_1.tif", rng.integers(0, 256, (32, 32, 3), np.uint8))
    tifffile.imwrite(tmp_path / "in" / "flair_2.tif", rng.integers(0, 256, (32, 32), np.uint8))

    def tumor_probs(checkpoint):
        config = tiny.get_config()
        config.checkpoint = checkpoint
        config.predict.input = str(tmp_path / "in")
        rows = predict.predict(config, str(tmp_path / "work" / os.path.basename(checkpoint)))
        return {os.path.basename(r["file"]): r["tumor_probability"] for r in rows}

    joined, alone = tumor_probs(str(tmp_path / "joined")), tumor_probs(complete)
    expert = tumor_probs(no_contrast)
    assert joined["rgb_1.tif"] == pytest.approx(alone["rgb_1.tif"], abs=1e-6)
    assert joined["flair_2.tif"] == pytest.approx(expert["flair_2.tif"], abs=1e-6)
    assert expert["flair_2.tif"] != pytest.approx(alone["flair_2.tif"], abs=1e-4)


def test_join_refuses_models_that_read_different_inputs_or_are_joined(tmp_path):
    complete = _export_tiny(tmp_path / "complete", 0, ["a"])
    other = _export_tiny(tmp_path / "other", 1, ["a"], normalization="volume")
    with pytest.raises(errors.CheckpointError, match="data.normalization: 'scale' vs"):
        checkpointing.join_no_contrast_expert(complete, other)
    variables, meta = checkpointing.join_no_contrast_expert(complete, complete)
    checkpointing.export_model(str(tmp_path / "joined"), variables, meta)
    with pytest.raises(errors.CheckpointError, match="joined already|already a joined"):
        checkpointing.join_no_contrast_expert(str(tmp_path / "joined"), complete)
    config = tiny.get_config()
    config.model.no_contrast_expert = True
    with pytest.raises(errors.ConfigError, match="no_contrast_expert=True: .*join_no_"):
        config_schema.validate(config, "train")

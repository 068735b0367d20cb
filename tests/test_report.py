"""The console command, progress lines, the config key check, previews and the HTML
report (rendered by a real headless browser)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image
from scipy import ndimage
from selenium import webdriver
from selenium.webdriver.common.by import By
from test_predict import _export_tiny
from test_volumes import _patient, _write_nifti

from resunet_jax import cli, config_schema, errors, progress, visualize
from resunet_jax.data import volumes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two NIfTI patients (three sequences each) and a tiny exported model."""
    root = tmp_path_factory.mktemp("report")
    for seed, name in enumerate(("P1", "P2")):
        stack = _patient(seed)
        os.makedirs(root / "in" / name)
        for channel, role in enumerate(volumes.SEQUENCES):
            _write_nifti(stack[..., channel], root / "in" / name / f"{name}_{role}.nii.gz")
    return root, _export_tiny(root / "model")


def _run(*args, cwd=REPO):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def _rows(path, root):
    """A CSV's rows with the output folder in paths replaced by "OUT"."""
    with open(path) as f:
        return [{k: v.replace(str(root), "OUT") for k, v in r.items()} for r in csv.DictReader(f)]


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def test_console_command_writes_what_mode_predict_writes(study):
    root, model = study
    command = os.path.join(os.path.dirname(sys.executable), "resunet-predict")
    console = _run(command, "-i", str(root / "in"), "-o", str(root / "out"), "--model", model)
    assert console.returncode == 0, console.stderr
    launch = _run(
        sys.executable,
        "launch.py",
        "--config=configs/resunet.py",
        f"--workdir={root / 'work'}",
        "--mode=predict",
        f"--config.checkpoint={model}",
        f"--config.predict.input={root / 'in'}",
        "--config.eval.flip_tta=True",  # resunet-predict's default
    )
    assert launch.returncode == 0, launch.stderr
    out, work = root / "out", root / "work" / "predict"
    assert _files(out) == _files(work)
    assert "P1_pred_mask.nii.gz" in _files(out) and "index.html" in _files(out)
    for name in ("predictions.csv", "patients.csv"):
        assert _rows(out / name, out) == _rows(work / name, work)
    # Progress goes to a non-terminal log as plain lines, first and last.
    assert "predict: 0/2 patients (0%)" in console.stderr
    assert "predict: 2/2 patients (100%)" in console.stderr
    # A second run keeps the first one's output.
    again = _run(command, "-i", str(root / "in" / "P1"), "-o", str(out), "--model", model)
    assert again.returncode == 0, again.stderr
    kept = [p for p in os.listdir(root) if p.startswith("out_")]
    assert len(kept) == 1 and "P2_pred_mask.nii.gz" in os.listdir(root / kept[0])


def test_console_command_defaults_and_options():
    """Flip TTA on (the calibrated rules and the review flag need it), the config's
    backend and precision (auto) unless named."""
    config = cli.predict_config(cli.parser().parse_args(["-i", "x.nii", "-o", "out"]))
    assert config.eval.flip_tta is True
    assert (config.inference.backend, config.inference.precision) == ("auto", "auto")
    assert config.checkpoint == cli.MODEL and config.predict.input == "x.nii"
    args = ["-i", "x", "-o", "o", "--no-flip-tta", "--backend", "onnx", "--precision", "f32"]
    config = cli.predict_config(cli.parser().parse_args(args))
    assert config.eval.flip_tta is False
    assert (config.inference.backend, config.inference.precision) == ("onnx", "f32")


def test_console_command_bad_input_is_one_line(study, tmp_path):
    root, model = study
    command = os.path.join(os.path.dirname(sys.executable), "resunet-predict")
    missing = str(tmp_path / "nothing")
    run = _run(command, "-i", missing, "-o", str(tmp_path / "o"), "--model", model)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and missing in run.stderr


def test_unknown_config_key_is_one_line_naming_the_nearest():
    run = _run(
        sys.executable,
        "launch.py",
        "--config=configs/resunet.py",
        "--workdir=/tmp/unused",
        "--mode=predict",
        "--config.predict.inptu=x.nii",
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "launch.py: config.predict.inptu: no such config key; did you mean predict.input?"
    ]
    with pytest.raises(errors.ConfigError, match=r"config\.augment\.skullstrip: .*skull_strip"):
        config_schema.check_key(
            config_schema.load_config_file("configs/resunet.py"), "augment.skullstrip"
        )
    config_schema.check_key(config_schema.load_config_file("configs/resunet.py"), "data.dir")


def test_progress_lines_in_a_log(caplog, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    clock = iter([0.0, 10.0, 40.0, 45.0, 80.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level("INFO"):
        assert list(progress.track([1, 2, 3, 4], "eval", unit="patients")) == [1, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records] == [
        "eval: 0/4 patients (0%), 0:00:00 elapsed",
        "eval: 2/4 patients (50%), 0:00:40 elapsed, ETA 0:00:40",  # 30 s after the last
        "eval: 4/4 patients (100%), 0:01:20 elapsed",
    ]


def test_preview_shows_the_slices_with_tumour(tmp_path):
    masks = np.zeros((20, 16, 16), bool)
    masks[[3, 4, 5, 9, 10, 11, 12, 13], 4:8, 4:8] = True
    masks[12, 2:14, 2:14] = True  # the largest
    shown = visualize.preview_slices(masks, max_slices=3)
    assert len(shown) == 3 and 12 in shown and set(shown) <= {3, 4, 5, 9, 10, 11, 12, 13}
    assert list(visualize.preview_slices(np.zeros((7, 4, 4), bool))) == [2, 3, 4]
    flair = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
    visualize.volume_preview(flair, masks, str(tmp_path / "p.png"), "P: 1 mL", masks)
    picture = image.imread(tmp_path / "p.png")
    green = (picture[..., 1] > 0.8) & (picture[..., 0] < 0.3) & (picture[..., 2] < 0.3)
    assert picture.shape[1] > picture.shape[0] and green.sum() > 20  # outlines drawn
    red = (picture[..., 0] > 0.8) & (picture[..., 1] < 0.3) & (picture[..., 2] < 0.3)
    assert red.sum() == 0  # the reference is drawn under the prediction, which covers it
    # A title longer than the picture wraps onto more lines instead of running off it.
    long_title = "P: 1 mL\n" + " ".join(["a note that runs on"] * 40)
    visualize.volume_preview(flair, masks, str(tmp_path / "q.png"), long_title)
    wrapped = image.imread(tmp_path / "q.png")
    assert wrapped.shape[1] == picture.shape[1] and wrapped.shape[0] > picture.shape[0] + 30


def test_outline_is_the_band_across_the_mask_border_up_to_the_image_edge():
    mask = np.zeros((12, 10), bool)
    mask[0:4, 5:10] = True  # touches the top and right edges
    mask[8, 2] = True
    expected = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    np.testing.assert_array_equal(visualize._outline(mask), expected)
    assert visualize._outline(mask)[0, 9] and not visualize._outline(mask)[2, 7]
    assert not visualize._outline(np.zeros((4, 4), bool)).any()


def test_html_report_renders_in_a_browser(study):
    """The predict report opened in headless Chromium: a row per patient, every picture
    loaded, the lesion volumes shown. CI installs Chromium; elsewhere the test is skipped
    unless RESUNET_REQUIRE_BROWSER is set."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("RESUNET_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium)")
        pytest.skip("no chromium")
    root, model = study
    out = root / "browser"
    command = os.path.join(os.path.dirname(sys.executable), "resunet-predict")
    run = _run(command, "-i", str(root / "in"), "-o", str(out), "--model", model)
    assert run.returncode == 0, run.stderr
    with open(out / "patients.json") as f:
        patients = json.load(f)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get((out / "index.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "tbody.patient")
        assert len(rows) == len(patients) == 2
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded == [True, True]
        for row, patient in zip(rows, patients, strict=True):
            text = row.text
            assert patient["patient"] in text
            assert f"{patient['lesion_volume']} mL" in text
            link = row.find_element(By.LINK_TEXT, "mask")
            assert link.get_attribute("href").endswith(f"{patient['patient']}_pred_mask.nii.gz")
    finally:
        driver.quit()

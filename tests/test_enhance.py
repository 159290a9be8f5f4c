"""python -m dxr.enhance: DDPM-HQ restores radiographs of any size through blended tiles, DICOM in, DICOM out."""

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")
pydicom = pytest.importorskip("pydicom", reason="the data extra (pydicom) is not installed")
pytest.importorskip("tqdm", reason="tqdm is not installed")

from dxr import enhance  # noqa: E402
from dxr.cli import run  # noqa: E402
from dxr.data.io import read_image, write_png16  # noqa: E402
from dxr.diffusion import ddim_sample  # noqa: E402
from dxr.inference import to_signed, to_unit  # noqa: E402

from tiny import SIZE, radiograph, trained_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny dataset, its stage-1 models, MUNIT-LQ pairs and DDPM-HQ trained on them (two steps each)."""
    return trained_runs(tmp_path_factory.mktemp("enhance"), "hq-ddpm-munit")


@pytest.fixture(scope="module")
def restorer(runs):
    return enhance.Restorer.from_checkpoint(runs[1] / "hq-ddpm-munit", device="cpu", steps=3, seed=1)


def _monochrome1_dicom(path, image01):
    """A 16-bit MONOCHROME1 radiograph (bright = low values) with patient and study attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientSex = "Test^Patient", "DXR-0042", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyID, ds.AccessionNumber, ds.Modality = "20260101", "7", "ACC7", "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = image01.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelData = np.round((1 - image01) * 65535).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_dicom_in_dicom_out_keeps_patient_and_study(tmp_path, runs):
    image, _ = radiograph(np.random.default_rng(5), 24)
    source = _monochrome1_dicom(tmp_path / "chest.dcm", image)
    np.testing.assert_allclose(read_image(tmp_path / "chest.dcm"), image, atol=2e-5)  # MONOCHROME1 read upright
    out = tmp_path / "out"
    assert enhance.main(["--checkpoint", str(runs[1] / "hq-ddpm-munit"), str(tmp_path / "chest.dcm"), "--out", str(out),
                         "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    written = pydicom.dcmread(out / "chest.dcm")
    written.pixel_array  # decodes: a valid image
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID",
                    "AccessionNumber"):
        assert written.get(keyword) == source.get(keyword), keyword
    assert written.SOPInstanceUID != source.SOPInstanceUID and written.SeriesInstanceUID != source.SeriesInstanceUID
    assert "DERIVED" in list(written.ImageType)
    assert (written.Rows, written.Columns) == image.shape
    restored = read_image(out / "chest.dcm")
    assert restored.shape == image.shape and np.isfinite(restored).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_scale_two_doubles_the_size_and_writes_16_bit_png(tmp_path, runs):
    from PIL import Image

    image, _ = radiograph(np.random.default_rng(6), 20)
    write_png16(tmp_path / "in" / "a.png", image)
    out = tmp_path / "out"
    assert enhance.main(["--checkpoint", str(runs[1] / "hq-ddpm-munit"), str(tmp_path / "in"), "--out", str(out),
                         "--scale", "2", "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    with Image.open(out / "a.png") as written:
        assert written.size == (40, 40) and written.mode.startswith("I")


def test_cuda_graph_falls_back_on_a_cpu_and_a_torch_profile_traces_every_step(tmp_path, runs):
    import json

    image, _ = radiograph(np.random.default_rng(8), 20)
    write_png16(tmp_path / "in" / "a.png", image)
    base = ["--checkpoint", str(runs[1] / "hq-ddpm-munit"), str(tmp_path / "in"), "--steps", "3", "--eta", "0.5",
            "--device", "cpu", "--no-progress"]
    assert enhance.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert enhance.main([*base, "--out", str(tmp_path / "graph"), "--cuda-graph", "--profile", "torch"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "graph" / "a.png"), read_image(tmp_path / "plain" / "a.png"))
    trace = json.loads((tmp_path / "graph" / "trace.json").read_text())
    assert sum(e.get("name") == "sample.step" for e in trace["traceEvents"]) == 3  # one batch of tiles, three DDIM steps
    assert not (tmp_path / "plain" / "trace.json").exists()
    parsed = enhance._parser().parse_args(["--checkpoint", "c", "x.png", "--out", "o", "--cuda-graph",
                                           "--profile", "nvtx"])
    assert parsed.cuda_graph and parsed.profile == "nvtx"
    assert enhance._parser().parse_args(["--checkpoint", "c", "x.png", "--out", "o"]).profile == "none"
    with pytest.raises(SystemExit):
        enhance._parser().parse_args(["--checkpoint", "c", "x.png", "--out", "o", "--profile", "perf"])


def test_one_tile_equals_the_untiled_sampler(restorer):
    image = torch.from_numpy(radiograph(np.random.default_rng(7))[0]).float()[None, None]
    tiled = restorer(image)
    # untiled: the same noise, the whole image in one network call
    canvas = restorer._canvas(image, 0)
    direct = ddim_sample(restorer.net.denoiser, canvas.noise, restorer.net.alphas_cumprod("cpu"), steps=3,
                         cond=to_signed(image), seed=restorer.seed * 1_000_003, prediction=restorer.net.prediction,
                         backend=restorer.net.backend)
    torch.testing.assert_close(tiled, to_unit(restorer.net.to_image(direct, to_signed(image))), atol=1e-5, rtol=0)


class _EdgeErrors(torch.nn.Module):
    """A stand-in denoiser that restores every tile to its condition except for an error in a band along
    the tile's own edges (as a network's zero padding makes): what blending must hide."""

    prediction, backend = "eps", "torch"

    def __init__(self, band: int = 2, error: float = 0.4):
        super().__init__()
        from dxr.diffusion import make_schedule

        self.alphas, self.band, self.error = make_schedule("linear", 50), band, error
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the restorer looks for the device

    def alphas_cumprod(self, device):
        return self.alphas.to(device)

    def to_image(self, sample, cond=None):
        return sample

    def denoiser(self, x, t, cond):
        edge = torch.zeros_like(cond)
        b = self.band
        edge[..., :b, :] = edge[..., -b:, :] = edge[..., :, :b] = edge[..., :, -b:] = 1
        alpha = self.alphas.to(x.device)[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - alpha.sqrt() * (cond + self.error * edge)) / (1 - alpha).sqrt()  # the ε that lands there


def _border_steps(image: torch.Tensor, tile: int, overlap: int) -> list[tuple[float, float]]:
    """Per axis: (mean step between neighbouring columns across a tile's edge, 90th percentile of the
    steps between the other columns away from the image's own edges)."""
    side = image.shape[-1]
    starts = enhance.tile_starts(side, tile, overlap)
    borders = sorted({s - 1 for s in starts[1:]} | {s + tile - 1 for s in starts[:-1]})
    result = []
    for axis in (0, 1):
        steps = image.diff(dim=1 - axis).abs().mean(dim=axis)
        elsewhere = torch.ones_like(steps, dtype=torch.bool)
        elsewhere[borders] = False
        elsewhere[:3] = elsewhere[-3:] = False
        result.append((float(steps[borders].mean()), float(steps[elsewhere].quantile(0.9))))
    return result


def test_tile_borders_are_no_steeper_than_elsewhere(runs, restorer):
    image = torch.from_numpy(radiograph(np.random.default_rng(8), 44)[0]).float()[None, None]
    # a network that errs along tile edges: blended tiles hide it, abutting tiles show it
    blended = enhance.Restorer(_EdgeErrors(), restorer.config, steps=3, overlap=6)(image)[0, 0].double()
    for across, elsewhere in _border_steps(blended, SIZE, 6):
        assert across <= elsewhere
    abutting = enhance.Restorer(_EdgeErrors(), restorer.config, steps=3, overlap=0)(image)[0, 0].double()
    for across, elsewhere in _border_steps(abutting, SIZE, 0):
        assert across > 2 * elsewhere  # the check sees a seam when there is one
    # the trained model, and its result does not depend on how tiles are batched
    model = enhance.Restorer(restorer.net, restorer.config, steps=3, seed=2, overlap=4, batch_size=3)
    out = model(image)[0, 0].double()
    for across, elsewhere in _border_steps(out, SIZE, 4):
        assert across <= elsewhere
    one_by_one = enhance.Restorer(restorer.net, restorer.config, steps=3, seed=2, overlap=4, batch_size=1)
    torch.testing.assert_close(one_by_one(image)[0, 0].double(), out, atol=1e-5, rtol=0)


def test_tiles_and_window():
    assert enhance.tile_starts(16, 16, 2) == [0]
    for length, tile, overlap in ((44, 16, 4), (100, 32, 8), (33, 16, 0)):
        starts = enhance.tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # every seam overlaps enough
    window = enhance.blend_window(16, 12, 4)
    assert window.shape == (16, 12) and window.min() > 0 and window.max() == 1
    torch.testing.assert_close(window, window.flip(0).flip(1))


def _fails(capsys, argv, *words):
    status = run(enhance.main, argv, prog="python -m dxr.enhance")
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, runs, capsys):
    from PIL import Image

    _, run_dir = runs
    good = tmp_path / "good.png"
    write_png16(good, radiograph(np.random.default_rng(9))[0])
    out = tmp_path / "out"
    common = ["--out", str(out), "--device", "cpu", "--no-progress"]
    checkpoint = ["--checkpoint", str(run_dir / "hq-ddpm-munit")]
    _fails(capsys, ["--checkpoint", str(tmp_path / "nothing"), str(good), *common], "nothing")
    _fails(capsys, ["--checkpoint", str(run_dir / "lq-ddpm"), str(good), *common], "lq-ddpm", "hq-ddpm")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "colour.png")
    _fails(capsys, [*checkpoint, str(good), str(tmp_path / "colour.png"), *common], "colour.png", "channel")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [*checkpoint, str(tmp_path / "empty"), *common], "empty")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _fails(capsys, [*checkpoint, str(tmp_path / "broken.png"), *common], "broken.png")
    _fails(capsys, [*checkpoint, str(good), "--tile", "15", *common], "--tile")
    write_png16(tmp_path / "tiny.png", np.zeros((4, 4)))
    _fails(capsys, [*checkpoint, str(tmp_path / "tiny.png"), *common], "tiny.png")
    assert not out.exists()

"""dxr.data.drr: DRR geometry against analytic phantoms and an independent trilinear ray marcher; the
fused Triton kernel (interpreter) against the torch path for every volume dtype."""

import math

import numpy as np
import pytest
import torch

from helpers import DTYPES, assert_close

scipy_ndimage = pytest.importorskip("scipy.ndimage", reason="the data extra (scipy) is not installed")
from scipy.spatial.transform import Rotation  # noqa: E402

from dxr.data import drr  # noqa: E402


# --------------------------------------------------------------------------------------------------
# an independent reference: rays built from the geometry's definition, trilinear samples by scipy


def reference_drr(mu, spacing, geometry, rotation_deg, translation, n_samples):
    """Line integrals (H, W), float64: samples where each ray crosses n_samples equally spaced planes
    across the volume along the axis nearest the central ray, trilinear with zeros outside."""
    mu = np.asarray(mu, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = np.asarray(mu.shape)
    rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    h, w = geometry.height, geometry.width
    dv, du = geometry.pixel_spacing
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    x = ((w - 1) / 2 - jj) * du
    z = ((h - 1) / 2 - ii) * dv
    if geometry.parallel:
        det = np.stack([x, np.zeros_like(x), z], -1)
        src = det - np.array([0.0, 1.0, 0.0])
    else:
        det = np.stack([x, np.full_like(x, geometry.sdd - geometry.sod), z], -1)
        src = np.broadcast_to(np.array([0.0, -geometry.sod, 0.0]), det.shape)
    det_w = det @ rot.T + translation
    src_w = src @ rot.T + translation
    det_i = det_w / spacing + (shape - 1) / 2
    src_i = src_w / spacing + (shape - 1) / 2
    a = int(np.argmax(np.abs(rot[:, 1]) / spacing))
    planes = (np.arange(n_samples) + 0.5) * shape[a] / n_samples - 0.5
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            s, d = src_i[i, j], det_i[i, j] - src_i[i, j]
            t = (planes - s[a]) / d[a]
            if not geometry.parallel:
                t = t[(t >= 0) & (t <= 1)]
            points = s[None] + t[:, None] * d[None]
            values = scipy_ndimage.map_coordinates(mu, points.T, order=1, mode="grid-constant", cval=0.0)
            step = np.linalg.norm(det_w[i, j] - src_w[i, j]) * (shape[a] / n_samples) / abs(d[a])
            out[i, j] = values.sum() * step
    return out


def random_volume(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return 0.005 + 0.03 * torch.rand(*shape, generator=gen)


SMALL = drr.Geometry(sdd=120.0, sod=80.0, height=7, width=9, pixel_spacing=(1.7, 1.5))
CASES = [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 11),
    ((7.0, -4.0, 12.0), (1.5, -2.0, 0.7), 23),
    ((-20.0, 15.0, 35.0), (-1.0, 0.5, 2.0), 16),
    ((0.0, 0.0, 90.0), (0.0, 1.0, 0.0), 13),  # lateral view: sweeps along x
]


@pytest.mark.parametrize("rotation,translation,n_samples", CASES)
def test_cone_beam_matches_independent_trilinear_marcher(rotation, translation, n_samples):
    mu = random_volume((14, 16, 12), seed=1)
    spacing = (1.1, 0.9, 1.3)
    out = drr.render_drr(mu, spacing, SMALL, rotation, translation, n_samples=n_samples, backend="torch")
    assert out.shape == (1, 7, 9) and out.dtype == torch.float32
    expected = reference_drr(mu.numpy(), spacing, SMALL, rotation, translation, n_samples)
    assert_close(out[0], torch.from_numpy(expected), dtype=torch.float32)


def test_parallel_beam_and_clipped_segment_match_reference():
    mu = random_volume((10, 12, 9), seed=2)
    spacing = (1.0, 1.2, 0.8)
    parallel = drr.Geometry(height=5, width=6, pixel_spacing=(1.1, 0.9), parallel=True)
    out = drr.render_drr(mu, spacing, parallel, (5.0, 3.0, -8.0), (0.3, 0.0, -0.4), n_samples=12, backend="torch")
    expected = reference_drr(mu.numpy(), spacing, parallel, (5.0, 3.0, -8.0), (0.3, 0.0, -0.4), 12)
    assert_close(out[0], torch.from_numpy(expected), dtype=torch.float32)
    # detector 2 mm past the isocentre: the far half of the volume must not count
    cut = drr.Geometry(sdd=62.0, sod=60.0, height=5, width=6, pixel_spacing=(0.7, 0.7))
    out = drr.render_drr(mu, spacing, cut, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), n_samples=12, backend="torch")
    expected = reference_drr(mu.numpy(), spacing, cut, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 12)
    assert_close(out[0], torch.from_numpy(expected), dtype=torch.float32)
    full = drr.render_drr(mu, spacing, drr.Geometry(sdd=160.0, sod=60.0, height=5, width=6, pixel_spacing=(1.9, 1.9)), n_samples=12, backend="torch")
    assert (out[0, 2:4, 2:4] < 0.75 * full[0, 2:4, 2:4]).all()


# --------------------------------------------------------------------------------------------------
# analytic phantoms


def test_uniform_slab_line_integral_is_mu_times_path_length():
    mu_value, thickness_voxels, spacing = 0.021, 8, (1.0, 1.5, 1.0)
    mu = torch.zeros(24, 20, 24)
    mu[:, 6 : 6 + thickness_voxels, :] = mu_value
    thickness = thickness_voxels * spacing[1]
    geometry = drr.Geometry(sdd=400.0, sod=300.0, height=9, width=9, pixel_spacing=(1.0, 1.0))
    out = drr.render_drr(mu, spacing, geometry, n_samples=20, backend="torch")[0]
    jj, ii = np.meshgrid(np.arange(9), np.arange(9))
    x, z = (4 - jj) * 1.0, (4 - ii) * 1.0
    secant = np.sqrt(x**2 + z**2 + geometry.sdd**2) / geometry.sdd  # path length per unit depth
    assert_close(out, torch.from_numpy(mu_value * thickness * secant), dtype=torch.float32)
    assert abs(float(out[4, 4]) - mu_value * thickness) < 1e-6

    tilted = drr.render_drr(mu, spacing, geometry, (0.0, 0.0, 25.0), n_samples=20, backend="torch")[0]
    assert abs(float(tilted[4, 4]) - mu_value * thickness / math.cos(math.radians(25.0))) < 1e-5

    parallel = drr.Geometry(height=5, width=5, pixel_spacing=(1.0, 1.0), parallel=True)
    flat = drr.render_drr(mu, spacing, parallel, n_samples=20, backend="torch")[0]
    assert_close(flat, torch.full((5, 5), mu_value * thickness), dtype=torch.float32)


def _sphere(shape, spacing, centre_mm, radius_mm, value):
    """Anti-aliased sphere: each voxel holds value × the fraction of a 1-voxel shell inside the radius."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    xx, yy, zz = np.meshgrid(*axes, indexing="ij")
    dist = np.sqrt((xx - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (zz - centre_mm[2]) ** 2)
    return torch.from_numpy(value * np.clip(radius_mm - dist + 0.5, 0.0, 1.0)).float()


def test_sphere_projects_to_disk_of_cone_beam_magnified_radius():
    radius, value = 12.0, 0.02
    mu = _sphere((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), radius, value)
    geometry = drr.Geometry(sdd=200.0, sod=120.0, height=64, width=64, pixel_spacing=(1.0, 1.0))
    out = drr.render_drr(mu, (1.0, 1.0, 1.0), geometry, n_samples=64, backend="torch")[0]
    # a tangent ray meets the sphere at distance r from its centre: sin α = r / sod on the detector
    predicted = geometry.sdd * radius / math.sqrt(geometry.sod**2 - radius**2)
    disk = out > 0.1 * out.max()  # chord ≥ 0.1·2r ⇔ ray within 0.995 r of the centre
    measured = math.sqrt(float(disk.sum()) / math.pi)
    assert abs(measured - 0.995 * predicted) < 0.6
    assert predicted - radius > 7  # the test tells cone-beam magnification from none
    centre = out[31:33, 31:33].mean()
    assert abs(float(centre) - value * 2 * radius) < 0.01 * value * 2 * radius
    rows, cols = torch.nonzero(disk, as_tuple=True)
    assert abs(float(rows.float().mean()) - 31.5) < 0.1 and abs(float(cols.float().mean()) - 31.5) < 0.1


def test_pa_orientation_and_projected_points_match_rendered_blobs():
    spacing = (1.0, 1.0, 1.0)
    centre = (10.0, 5.0, 8.0)  # patient right (+x), superior (+z)
    mu = _sphere((48, 48, 48), spacing, centre, 3.0, 0.05)
    geometry = drr.Geometry(sdd=300.0, sod=200.0, height=48, width=48, pixel_spacing=(1.0, 1.0))
    for rotation, translation in [((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), ((6.0, -4.0, 10.0), (2.0, 3.0, -1.0))]:
        out = drr.render_drr(mu, spacing, geometry, rotation, translation, n_samples=48, backend="torch")[0]
        rows, cols = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
        weight = out / out.sum()
        blob = torch.stack([(weight * cols).sum(), (weight * rows).sum()])
        projected = drr.project_points(torch.tensor([centre]), geometry, rotation, translation)[0, 0]
        assert float((blob - projected.float()).norm()) < 0.25
        if rotation == (0.0, 0.0, 0.0):
            assert projected[0] < 23.5 and projected[1] < 23.5  # patient right on image left, superior on top


def test_renderer_batches_poses_and_update_matches_a_fresh_renderer():
    mu = random_volume((12, 14, 10), seed=3)
    spacing = (1.0, 1.0, 1.2)
    rotations = torch.tensor([[0.0, 0.0, 0.0], [5.0, 2.0, -7.0], [0.0, 0.0, 80.0]])
    translations = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.2], [0.0, 0.0, 0.0]])
    renderer = drr.DRRRenderer(mu.clone(), spacing, SMALL, n_samples=9, backend="torch")
    batch = renderer.render(rotations, translations)
    for i in range(3):
        single = drr.render_drr(mu, spacing, SMALL, rotations[i], translations[i], n_samples=9, backend="torch")
        assert_close(batch[i], single[0], dtype=torch.float32)
    box = (slice(3, 7), slice(5, 9), slice(2, 5))
    values = 0.05 + 0.02 * torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(4))
    renderer.update(box, values)
    changed = mu.clone()
    changed[box] = values
    assert_close(renderer.render(rotations, translations), drr.render_drr(changed, spacing, SMALL, rotations, translations, n_samples=9, backend="torch"), dtype=torch.float32)
    assert (renderer.render(rotations, translations) - batch).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU) against the torch path


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_matches_torch_for_every_volume_dtype(dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    mu = random_volume((13, 17, 11), seed=5).to(dtype)
    geometry = drr.Geometry(sdd=150.0, sod=100.0, height=13, width=17, pixel_spacing=(1.3, 1.1))
    rotations = torch.tensor([[0.0, 0.0, 0.0], [30.0, -20.0, 15.0], [0.0, 10.0, 95.0]])
    translations = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 3.0], [-1.5, 0.0, 0.5]])  # 663 rays: ragged blocks
    spacing = (1.0, 1.2, 0.9)
    torch_out = drr.DRRRenderer(mu, spacing, geometry, n_samples=19, backend="torch").render(rotations, translations)
    triton_out = drr.DRRRenderer(mu, spacing, geometry, n_samples=19, backend="triton").render(rotations, translations)
    assert triton_out.dtype == torch.float32
    assert_close(triton_out, torch_out, dtype=torch.float32)
    # low-precision planes stay within the dtype's rounding of the float32 result
    full = drr.DRRRenderer(mu.float(), spacing, geometry, n_samples=19, backend="torch").render(rotations, translations)
    assert_close(triton_out, full, dtype=dtype)


def test_triton_kernel_clips_the_segment_and_handles_rays_off_the_volume():
    pytest.importorskip("triton", reason="triton is not installed")
    mu = random_volume((9, 10, 8), seed=6)
    cut = drr.Geometry(sdd=42.0, sod=40.0, height=11, width=7, pixel_spacing=(2.5, 3.0))  # detector inside; edge rays miss
    rotations = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, -12.0]])
    a = drr.DRRRenderer(mu, (1.0, 1.0, 1.0), cut, n_samples=10, backend="torch").render(rotations)
    b = drr.DRRRenderer(mu, (1.0, 1.0, 1.0), cut, n_samples=10, backend="triton").render(rotations)
    assert_close(b, a, dtype=torch.float32)
    assert (a == 0).any() and (a > 0).any()


# --------------------------------------------------------------------------------------------------
# CT preparation, display, validation


def test_hu_to_mu_and_contrast_suppression():
    hu = torch.tensor([-3000.0, -1024.0, -1000.0, 0.0, 40.0, 1000.0])
    assert_close(drr.hu_to_mu(hu), torch.tensor([0.0, 0.0, 0.0, 0.02, 0.0208, 0.04]), dtype=torch.float32)
    assert_close(drr.hu_to_mu(hu, bone_scale=2.0)[-1:], torch.tensor([0.06]), dtype=torch.float32)

    hu = np.full((6, 6, 6), 40.0, dtype=np.float32)
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    hu[0, 0, 0], labels[0, 0, 0] = 1200.0, 52  # contrast in the aorta
    hu[5, 5, 5], labels[5, 5, 5] = 900.0, 30  # a vertebra
    hu[5, 0, 5] = 600.0  # dense, unlabelled, far from bone
    hu[4, 5, 5], labels[4, 5, 5] = 2500.0, 30  # denser than bone: undiluted contrast beside it
    out = drr.suppress_contrast(hu, labels)
    assert out[0, 0, 0] == 40.0 and out[5, 0, 5] == 40.0 and out[4, 5, 5] == 40.0
    assert out[5, 5, 5] == 900.0 and hu[0, 0, 0] == 1200.0  # bone kept, input untouched


def test_display_window_is_monotone_and_bone_white():
    values = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(7)) * 3
    out = drr.display_window(values, low=2, high=98, gamma=1.2)
    assert out.shape == values.shape and out.min() >= 0 and out.max() <= 1
    flat_v, flat_o = values[0].flatten(), out[0].flatten()
    order = torch.argsort(flat_v)
    assert (flat_o[order].diff() >= 0).all()
    fixed = drr.display_window(values, reference=(0.5, 2.5))
    assert_close(fixed, ((values - 0.5) / 2.0).clamp(0, 1), dtype=torch.float32)


def test_chest_framing_centres_the_lungs_inside_the_scan():
    mask = np.zeros((40, 30, 50), dtype=bool)
    mask[8:32, 10:20, 10:45] = True
    (x, y, z), fov = drr.chest_framing(mask, (2.0, 2.0, 2.0), margin=1.2, clearance_mm=10.0)
    # lungs 70 mm tall → 84 mm view, but the 100 mm scan less 10 mm each end leaves 80 mm, centred
    assert x == pytest.approx(0.0) and y == pytest.approx(0.0) and fov == pytest.approx(80.0) and z == pytest.approx(0.0)
    (_, _, z), fov = drr.chest_framing(mask, (2.0, 2.0, 2.0), margin=1.0, clearance_mm=10.0)
    assert fov == pytest.approx(70.0) and z == pytest.approx(5.0)  # room to spare: centred on the lungs


def test_invalid_arguments_raise():
    mu = random_volume((6, 6, 6), seed=8)
    with pytest.raises(ValueError, match="sod < sdd"):
        drr.Geometry(sdd=100.0, sod=150.0)
    with pytest.raises(ValueError, match="3-D"):
        drr.DRRRenderer(mu[0], (1, 1, 1), SMALL)
    with pytest.raises(TypeError, match="float32"):
        drr.DRRRenderer(mu.double(), (1, 1, 1), SMALL)
    with pytest.raises(ValueError, match="spacing"):
        drr.DRRRenderer(mu, (1, 1), SMALL)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        drr.render_drr(mu, (1, 1, 1), SMALL, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch"):
        drr.render_drr(mu, (1, 1, 1), SMALL, torch.zeros(2, 3), torch.zeros(3, 3))


def _bilinear_march(planes: torch.Tensor, rays: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    # a plain reference: at plane k, a bilinear tap at (b0 + k·db, c0 + k·dc) with zeros outside, for k in
    # [k_min, k_max]; unlike grid_sample it has no 1 / (n - 1) normalisation, so a plane of size 1 works
    n, n_b, n_c = planes.shape
    b0, db, c0, dc, k_min, k_max = rays.double()
    padded = torch.nn.functional.pad(planes.double(), (1, 1, 1, 1))
    total = torch.zeros_like(b0)
    for k in range(n):
        b, c = b0 + k * db, c0 + k * dc
        bf, cf = b.floor(), c.floor()
        fb, fc = b - bf, c - cf
        value = torch.zeros_like(b)
        for ob, wb in ((0, 1 - fb), (1, fb)):
            for oc, wc in ((0, 1 - fc), (1, fc)):
                ib, ic = (bf + ob).long() + 1, (cf + oc).long() + 1
                ok = (ib >= 0) & (ib < n_b + 2) & (ic >= 0) & (ic < n_c + 2)
                tap = padded[k, ib.clamp(0, n_b + 1), ic.clamp(0, n_c + 1)]
                value += torch.where(ok, tap, 0.0) * wb * wc
        total += torch.where((k >= k_min) & (k <= k_max), value, 0.0)
    return (total * step.double()).float()


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 7), (3, 9, 1), (4, 6, 5)])
def test_triton_kernel_with_unit_plane_dimensions_matches_a_bilinear_reference(shape):
    # a plane dimension of 1 is an integer argument equal to 1, which Triton would specialise into a
    # constant; the kernel keeps them runtime values (bench/gpu_ready.py compiles these shapes for sm_90/80)
    pytest.importorskip("triton", reason="triton is not installed")
    from dxr.kernels.triton.drr import march_planes

    gen = torch.Generator().manual_seed(11)
    planes = torch.rand(shape, generator=gen)
    rays_n = 37
    n, n_b, n_c = shape
    b0 = torch.rand(rays_n, generator=gen) * (n_b + 1) - 1
    c0 = torch.rand(rays_n, generator=gen) * (n_c + 1) - 1
    db, dc = (torch.rand(rays_n, generator=gen) - 0.5) * 0.6, (torch.rand(rays_n, generator=gen) - 0.5) * 0.6
    k_min = torch.rand(rays_n, generator=gen) * 2 - 1
    k_max = k_min + torch.rand(rays_n, generator=gen) * (n + 1)
    rays = torch.stack([b0, db, c0, dc, k_min, k_max])
    step = torch.rand(rays_n, generator=gen) + 0.5
    expected = _bilinear_march(planes, rays, step)
    assert expected.abs().sum() > 0
    assert_close(march_planes(planes, rays, step), expected, dtype=torch.float32)

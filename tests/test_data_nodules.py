"""dxr.data.nodules: threshold lung segmentation, nodule sites and shapes, insertion, and their DRR footprint."""

import numpy as np
import pytest
import torch

pytest.importorskip("scipy.ndimage", reason="the data extra (scipy) is not installed")

from dxr.data import drr  # noqa: E402
from dxr.data.nodules import NoduleSites, insert_nodule, insert_nodules, project_nodules, random_nodules, segment_lungs  # noqa: E402

SPACING = (2.0, 2.0, 2.5)
SHAPE = (56, 44, 36)


def chest_phantom(seed=0):
    """(hu, true lungs): soft-tissue body in air, two air-filled lungs with vessels, a table below."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    body = (x / 48) ** 2 + (y / 34) ** 2 <= 1
    hu[body] = 40.0
    lungs = np.zeros(SHAPE, dtype=bool)
    for side in (-1, 1):
        lungs |= ((x - side * 22) / 17) ** 2 + (y / 24) ** 2 + (z / 38) ** 2 <= 1
    hu[lungs] = -850.0 + rng.normal(0, 15, size=int(lungs.sum()))
    vessels = lungs & (rng.uniform(size=SHAPE) < 0.01)
    hu[vessels] = 40.0  # dense specks inside the lungs belong to them
    hu[(y < -38) & (y > -42) & (np.abs(x) < 50)] = 200.0  # the table, outside the body
    return hu, lungs


def test_threshold_segmentation_recovers_the_lungs():
    hu, truth = chest_phantom()
    found = segment_lungs(hu, SPACING)
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.97
    with pytest.raises(ValueError, match="no air enclosed"):
        segment_lungs(np.full((8, 8, 8), 40.0, dtype=np.float32), SPACING)


def test_random_nodules_fit_inside_the_lungs_without_overlap():
    _, lungs = chest_phantom()
    lobes = lungs.astype(np.uint8) * 12
    sites = NoduleSites(lungs, SPACING, lobes, {12: "lung_upper_lobe_right"})
    nodules = random_nodules(sites, 4, np.random.default_rng(1), radius_mm=(3.0, 9.0))
    assert len(nodules) == 4
    centre_index = (np.asarray(SHAPE) - 1) / 2
    for i, nodule in enumerate(nodules):
        assert 3.0 * 0.8**8 <= nodule.radius_mm <= 9.0 and nodule.lobe == "lung_upper_lobe_right"
        surface = nodule.surface_points()
        assert np.linalg.norm(surface - nodule.center_mm, axis=1).max() <= nodule.bound_mm + 1e-9
        index = np.round(surface / np.asarray(SPACING) + centre_index).astype(int)
        assert lungs[tuple(index.T)].all()
        for other in nodules[i + 1 :]:
            assert np.linalg.norm(np.subtract(nodule.center_mm, other.center_mm)) > nodule.bound_mm + other.bound_mm
    with pytest.raises(ValueError, match="no room"):
        random_nodules(sites, 1, np.random.default_rng(2), radius_mm=(60.0, 60.0))


def test_insert_nodule_sets_its_core_and_undoes_exactly():
    hu, lungs = chest_phantom()
    sites = NoduleSites(lungs, SPACING)
    (nodule,) = random_nodules(sites, 1, np.random.default_rng(3), radius_mm=(7.0, 7.0), hu=(45.0, 45.0))
    work = hu.copy()
    box, before = insert_nodule(work, SPACING, nodule)
    centre = tuple(np.round(np.asarray(nodule.center_mm) / np.asarray(SPACING) + (np.asarray(SHAPE) - 1) / 2).astype(int))
    assert work[centre] == pytest.approx(45.0, abs=1.0)
    changed = np.argwhere(work != hu)
    assert len(changed) > 0
    offsets = (changed - (np.asarray(SHAPE) - 1) / 2) * np.asarray(SPACING) - np.asarray(nodule.center_mm)
    assert np.linalg.norm(offsets, axis=1).max() <= nodule.bound_mm + 3.0
    assert (work >= hu).all()  # never darkens what was there
    original = hu.copy()
    np.testing.assert_array_equal(insert_nodules(hu, SPACING, [nodule]), work)  # the copying form agrees
    np.testing.assert_array_equal(hu, original)
    work[box] = before
    np.testing.assert_array_equal(work, hu)


@pytest.mark.parametrize("rotation,translation", [((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), ((5.0, -3.0, 9.0), (4.0, 6.0, -3.0))])
def test_nodule_raises_the_drr_at_its_recorded_centre_and_only_near_it(rotation, translation):
    hu, lungs = chest_phantom()
    sites = NoduleSites(lungs, SPACING)
    nodules = random_nodules(sites, 1, np.random.default_rng(4), radius_mm=(8.0, 8.0))
    with_nodule = insert_nodules(hu, SPACING, nodules)
    geometry = drr.Geometry.framing(110.0, 48, sdd=900.0, sod=800.0)
    before = drr.render_drr(drr.hu_to_mu(hu), SPACING, geometry, rotation, translation, n_samples=44, backend="torch")[0]
    after = drr.render_drr(drr.hu_to_mu(with_nodule), SPACING, geometry, rotation, translation, n_samples=44, backend="torch")[0]
    (record,) = project_nodules(nodules, geometry, rotation, translation)[0]
    assert record["in_view"]
    col, row = record["center_px"]
    x0, y0, x1, y1 = record["box_px"]
    assert x0 < col < x1 and y0 < row < y1
    diff = (after - before).numpy()
    # at the centre: about Δμ × the nodule's depth (2r), here ≥ half of that
    delta_mu = 0.02 * (nodules[0].hu + 850.0) / 1000.0
    assert diff[round(row), round(col)] > 0.5 * delta_mu * 2 * nodules[0].radius_mm
    peak_row, peak_col = np.unravel_index(np.argmax(diff), diff.shape)
    assert abs(peak_row - row) <= 1.5 and abs(peak_col - col) <= 1.5
    rows, cols = np.mgrid[0:48, 0:48]
    outside = (cols < x0 - 2) | (cols > x1 + 2) | (rows < y0 - 2) | (rows > y1 + 2)
    assert np.abs(diff[outside]).max() < 1e-6
    assert diff[~outside].max() > 0.1


def test_project_nodules_shapes_and_empty_list():
    _, lungs = chest_phantom()
    nodules = random_nodules(NoduleSites(lungs, SPACING), 2, np.random.default_rng(5))
    geometry = drr.Geometry.framing(110.0, 32)
    records = project_nodules(nodules, geometry, torch.zeros(3, 3), torch.zeros(3, 3))
    assert len(records) == 3 and all(len(r) == 2 for r in records)
    assert {"center_mm", "radius_mm", "center_px", "box_px", "in_view", "lobe"} <= set(records[0][0])
    assert project_nodules([], geometry, torch.zeros(2, 3)) == [[], []]

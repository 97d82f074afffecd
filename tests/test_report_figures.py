"""The pictures people read: the engine's trends plot and the titled overlay panels (engine report, segany-finetune)."""

import numpy as np
import pytest

from data_engine.report import AutomaticExample, save_overlays, trends_figure
from segany_train.inference.overlay_panels import GAP, NEGATIVE, POSITIVE, TITLE_HEIGHT, Panel, match_to_objects, render_panels


def _rows():
    def evaluation(m):
        return {"miou_1": m, "miou_1_ci": [m - 0.02, m + 0.02], "miou_5": m + 0.1, "miou_5_ci": [m + 0.08, m + 0.12]}

    return [
        {"stage": "seed", "round": None, **evaluation(0.450)},
        {"stage": "stage1", "round": 1, "images": 10, "masks_per_image": 4.0, "seconds_per_mask": 22.0, **evaluation(0.452)},
        {"stage": "stage2", "round": 1, "images": 10, "masks_per_image": 4.1, "seconds_per_mask": float("nan"), **evaluation(0.451)},
        {"stage": "final", "round": None, **evaluation(0.453)},
        {"stage": "control", "round": None, **evaluation(0.449)},
    ]


def test_the_trends_plot_has_a_legend_and_fixed_labelled_axes():
    import matplotlib.pyplot as plt

    fig = trends_figure(_rows())
    try:
        axes = {ax.get_title(): ax for ax in fig.axes}
        for title in ("held-out mIoU after 1 click", "held-out mIoU after 5 clicks"):
            # mIoU from 0 to 1 whatever the values: 0.449-0.453 must look flat, not like movement
            assert axes[title].get_ylim() == (0.0, 1.0) and "mIoU" in axes[title].get_ylabel()
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_ylim()[0] == 0.0
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert labels == ["seed model", "stage 1 (assisted-manual)", "stage 2 (semi-automatic)", "stage 3 / final retrain", "control (seed split only)", "95% interval over images"]
    finally:
        plt.close(fig)


def _disc(size, cx, cy, r):
    yy, xx = np.mgrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_panels_are_titled_enlarged_and_keep_each_objects_colour_with_clicks_drawn():
    image = np.full((64, 64, 3), 30, np.uint8)
    a, b = _disc(64, 16, 16, 8), _disc(64, 46, 44, 10)
    # the second panel lists the objects the other way round: the colours must follow the objects
    picture = render_panels(
        image,
        [Panel("GT", [a, b]), Panel("model", [b, a], objects=[1, 0], scores=[0.9, 0.8], clicks=[(16.5, 16.5, True), (60.5, 4.5, False)])],
        min_side=256,
    )
    scale = 4  # 64 px enlarged to at least 256
    assert picture.shape == (TITLE_HEIGHT + 64 * scale, 2 * 64 * scale + GAP, 3)
    assert (picture[:TITLE_HEIGHT] < 128).any() and (picture[:TITLE_HEIGHT] == 255).mean() > 0.8  # a title, in black on white
    left, right = picture[TITLE_HEIGHT:, : 64 * scale], picture[TITLE_HEIGHT:, 64 * scale + GAP :]
    at = lambda panel, x, y: tuple(panel[y * scale, x * scale])  # noqa: E731
    # object b (off its score label) has one colour in both panels; a and b differ
    assert at(left, 40, 50) == at(right, 40, 50) != at(left, 12, 20)
    assert at(right, 16, 16) == POSITIVE and at(right, 60, 4) == NEGATIVE
    assert at(left, 16, 16) != POSITIVE  # the GT panel has no clicks


def test_automatic_masks_take_the_colour_of_the_gt_object_they_match(tmp_path):
    a, b = _disc(64, 16, 16, 8), _disc(64, 46, 44, 10)
    junk = np.zeros((64, 64), bool)
    junk[:4, 50:] = True
    assert match_to_objects([b, junk, a], [a, b]) == [1, 2, 0]
    assert match_to_objects([junk], []) == [0]
    image = np.full((64, 64, 3), 30, np.uint8)
    (path,) = save_overlays([AutomaticExample("sa_1", image, [a, b], [b, junk], [0.91, 0.42])], tmp_path)
    from PIL import Image

    assert Image.open(path).size == (2 * 64 * 6 + GAP, TITLE_HEIGHT + 64 * 6)  # 384 px panels


@pytest.mark.parametrize("count", [0, 3])
def test_a_panel_without_masks_draws_the_image(count):
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    masks = [np.zeros((20, 30), bool)] * count
    picture = render_panels(image, [Panel("empty", masks)], min_side=20)
    assert np.array_equal(picture[TITLE_HEIGHT:], image)

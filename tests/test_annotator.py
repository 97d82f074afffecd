"""The simulated annotator: click protocol, brush fallback, time accounting, prefilled masks, 30-s rule.

Most tests replace the network with `ScriptedPredictor`, a stand-in with SamPredictor's interface
whose answers the test fixes, so that clicks, masks and seconds can be checked exactly; one test
runs the real (tiny, random) SamPredictor end to end on a synthetic image.
"""

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from data_engine.annotator import Annotator, Click, ImageAnnotation, SimulatedAnnotator, TimeModel, correction_click
from segany_train.data.mask_iou import dense_mask_iou
from segany_train.data.synthetic import generate_image
from segany_train.inference.predictor import SamPredictor
from segany_train.model import build_sam
from segany_train.prompting import center_correction_clicks
from tests.conftest import TINY, randomized

H, W = 40, 48
IMAGE = np.zeros((H, W, 3), np.uint8)
TIME = TimeModel()


def disc(cy: float, cx: float, r: float, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


Response = Callable[[np.ndarray, np.ndarray], tuple[list[np.ndarray], list[float]]]


class ScriptedPredictor:
    """Stand-in for the network with SamPredictor's set_image/predict: `respond(coords, labels)`
    gives the candidate masks and predicted IoUs. Records every call. The low-res logits of call i
    are filled with i * 10 + candidate index, so the fed-back mask_input identifies its origin."""

    def __init__(self, respond: Response) -> None:
        self.respond = respond
        self.calls: list[dict] = []
        self.images_set = 0

    def set_image(self, image: np.ndarray) -> None:
        self.images_set += 1

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True,
                return_logits=False):
        masks, iou = self.respond(point_coords, point_labels)
        n = len(self.calls)
        self.calls.append(dict(coords=point_coords.copy(), labels=point_labels.copy(), mask_input=mask_input,
                               multimask=multimask_output))
        low_res = np.stack([np.full((1, 4, 4), n * 10 + c, np.float32)[0] for c in range(len(masks))])
        return np.stack(masks), np.asarray(iou, np.float32), low_res


def answer(mask: np.ndarray) -> Response:
    """A model that always returns `mask` (three identical candidates on a first click)."""
    return lambda coords, labels: ([mask] * (3 if len(labels) == 1 else 1), [0.5] * (3 if len(labels) == 1 else 1))


def after_clicks(k: int, early: np.ndarray, late: np.ndarray) -> Response:
    """`early` for fewer than k clicks, `late` from the k-th click on."""
    def respond(coords, labels):
        mask = late if len(labels) >= k else early
        return [mask] * (3 if len(labels) == 1 else 1), [0.5] * (3 if len(labels) == 1 else 1)
    return respond


def object_under_click(gts: list[np.ndarray]) -> Response:
    """A perfect model: the GT object under the first click."""
    def respond(coords, labels):
        x, y = coords[0].astype(int)
        mask = next(m for m in gts if m[y, x])
        return [mask] * (3 if len(labels) == 1 else 1), [0.5] * (3 if len(labels) == 1 else 1)
    return respond


def brute_force_deepest(region: np.ndarray) -> tuple[int, int, float]:
    """(row, col, distance) of the first pixel in row-major order with the largest Euclidean distance to
    the nearest pixel outside the region, everything outside the array counting as outside."""
    padded = np.pad(region, 1)
    outside = np.argwhere(~padded) - 1
    best = (-1, -1, 0.0)
    for r, c in np.argwhere(region):  # row-major
        d = math.sqrt(((outside - (r, c)) ** 2).sum(1).min())
        if d > best[2]:
            best = (int(r), int(c), d)
    return best


def test_is_an_annotator():
    assert isinstance(SimulatedAnnotator(ScriptedPredictor(answer(disc(20, 20, 5))), [disc(20, 20, 5)]), Annotator)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_stops_at_the_target_iou(k):
    gt = rect(5, 35, 5, 45)
    half = rect(5, 35, 5, 25)  # IoU 0.5
    predictor = ScriptedPredictor(after_clicks(k, half, gt))
    result = SimulatedAnnotator(predictor, [gt], max_clicks=8).annotate(IMAGE, [])
    (record,) = result.records
    assert record.num_clicks == k and len(predictor.calls) == k
    assert record.seconds == pytest.approx(TIME.object_seconds + k * (TIME.click_seconds + TIME.response_seconds))
    assert result.seconds == record.seconds
    assert not record.brush_used and record.brush_strokes == 0
    assert record.iou_to_gt == record.iou_before_brush == 1.0
    np.testing.assert_array_equal(result.masks[0], gt)
    assert predictor.images_set == 1
    # multimask only for the first click; each later call gets the previous chosen logits
    assert [c["multimask"] for c in predictor.calls] == [True] + [False] * (k - 1)
    assert predictor.calls[0]["mask_input"] is None
    for i in range(1, k):
        mask_input = predictor.calls[i]["mask_input"]
        assert mask_input.shape == (1, 4, 4) and np.all(mask_input == (i - 1) * 10)
        # all clicks so far are sent, in order
        np.testing.assert_array_equal(predictor.calls[i]["coords"][:i], predictor.calls[i - 1]["coords"])
    assert [c.label for c in record.clicks] == [1] * k  # the error was always a false negative


def test_stops_at_a_lower_target_with_an_imperfect_mask():
    gt = rect(0, 20, 0, 20)
    close = rect(0, 20, 0, 19)  # IoU 0.95
    result = SimulatedAnnotator(ScriptedPredictor(answer(close)), [gt], target_iou=0.9).annotate(IMAGE, [])
    assert result.records[0].num_clicks == 1 and not result.records[0].brush_used
    assert result.records[0].iou_to_gt == pytest.approx(0.95)
    np.testing.assert_array_equal(result.masks[0], close)  # the model's mask is kept, not the GT


def test_first_click_shows_the_candidate_with_the_highest_predicted_iou():
    gt = disc(20, 24, 10)
    wrong = disc(20, 24, 4)

    def respond(coords, labels):
        return ([gt, wrong, gt], [0.2, 0.9, 0.5]) if len(labels) == 1 else ([gt], [0.5])

    predictor = ScriptedPredictor(respond)
    record = SimulatedAnnotator(predictor, [gt]).annotate(IMAGE, []).records[0]
    assert record.num_clicks == 2  # the tool showed `wrong`, so the annotator had to click again
    assert np.all(predictor.calls[1]["mask_input"] == 1)  # candidate 1 of call 0 was fed back


def test_first_click_is_the_deepest_gt_pixel():
    gt = disc(18, 15, 9) | rect(10, 30, 20, 44) | disc(30, 40, 6)
    predictor = ScriptedPredictor(answer(gt))
    record = SimulatedAnnotator(predictor, [gt]).annotate(IMAGE, []).records[0]
    row, col, _ = brute_force_deepest(gt)
    assert record.clicks[0] == Click(x=col, y=row, label=1)
    np.testing.assert_array_equal(predictor.calls[0]["coords"], [[col, row]])
    np.testing.assert_array_equal(predictor.calls[0]["labels"], [1])


@pytest.mark.parametrize("error", ["false_negative", "false_positive"])
def test_correction_click_label_and_place_follow_the_error(error):
    gt = rect(5, 35, 5, 30)
    if error == "false_negative":  # the model misses a notch and adds a thin strip
        wrong = (gt & ~rect(20, 35, 15, 30)) | rect(5, 35, 30, 32)
    else:  # the model adds a block and misses a thin strip
        wrong = (gt & ~rect(5, 35, 5, 7)) | rect(10, 30, 30, 45)
    predictor = ScriptedPredictor(after_clicks(3, wrong, gt))
    record = SimulatedAnnotator(predictor, [gt]).annotate(IMAGE, []).records[0]
    fn, fp = gt & ~wrong, wrong & ~gt
    larger, label = (fn, 1) if error == "false_negative" else (fp, 0)
    row, col, _ = brute_force_deepest(larger)
    assert record.clicks[1] == Click(x=col, y=row, label=label)
    assert record.num_clicks == 3 and record.clicks[2] == record.clicks[1]  # same error, same click


def test_correction_click_on_the_error_box_equals_the_full_image_click():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        gt = torch.rand(1, 30, 37, generator=gen) < 0.6
        pred = torch.rand(1, 30, 37, generator=gen) < 0.5
        pred[:, :3] = gt[:, :3]  # errors away from some borders, so the box is smaller than the image
        pred[:, :, -4:] = gt[:, :, -4:]
        coords, labels, _ = center_correction_clicks(pred, gt)
        click = correction_click(pred[0].numpy(), gt[0].numpy())
        assert (click.x + 0.5, click.y + 0.5, click.label) == (*coords[0].tolist(), int(labels[0]))
    assert correction_click(gt[0].numpy(), gt[0].numpy()) is None


def test_brush_fallback_for_missing_pixels():
    gt = rect(2, 38, 2, 46)
    predictor = ScriptedPredictor(answer(np.zeros((H, W), bool)))
    result = SimulatedAnnotator(predictor, [gt], max_clicks=4, max_seconds_per_mask=1000).annotate(IMAGE, [])
    record = result.records[0]
    strokes = math.ceil(gt.sum() / TIME.brush_stroke_area)
    assert record.num_clicks == 4 and all(c.label == 1 for c in record.clicks)
    assert record.brush_used and record.brush_strokes == strokes
    assert record.iou_before_brush == 0.0 and record.iou_to_gt == 1.0
    np.testing.assert_array_equal(result.masks[0], gt)
    assert record.seconds == pytest.approx(
        TIME.object_seconds + 4 * (TIME.click_seconds + TIME.response_seconds) + strokes * TIME.brush_stroke_seconds
    )


def test_brush_and_eraser_strokes_add_up():
    gt = rect(0, 20, 0, 20)
    wrong = rect(0, 20, 0, 10) | rect(25, 40, 0, 48)  # misses 200 px, adds 720 px
    time_model = TimeModel(brush_width=2, brush_stroke_length=50)  # 100 px a stroke
    result = SimulatedAnnotator(
        ScriptedPredictor(answer(wrong)), [gt], max_clicks=2, time_model=time_model, max_seconds_per_mask=1000
    ).annotate(IMAGE, [])
    record = result.records[0]
    assert record.brush_strokes == 2 + 8
    assert record.iou_before_brush == pytest.approx(200 / 1120)
    np.testing.assert_array_equal(result.masks[0], gt)


def test_objects_in_order_of_prominence_and_time_sums():
    gts = [rect(0, 5, 0, 5), rect(10, 30, 10, 30), disc(30, 40, 6), rect(0, 5, 40, 45)]
    predictor = ScriptedPredictor(object_under_click(gts))
    result = SimulatedAnnotator(predictor, gts).annotate(IMAGE, [])
    assert [r.gt_index for r in result.records] == [1, 2, 0, 3]  # 400, 113, 25, 25 px (tie: GT order)
    for mask, record in zip(result.masks, result.records):
        np.testing.assert_array_equal(mask, gts[record.gt_index])
    per_mask = TIME.object_seconds + TIME.click_seconds + TIME.response_seconds
    assert result.seconds == pytest.approx(4 * per_mask)
    assert not result.moved_on and predictor.images_set == 1


def test_min_area_skips_small_objects():
    gts = [rect(0, 5, 0, 5), rect(10, 30, 10, 30)]
    result = SimulatedAnnotator(ScriptedPredictor(object_under_click(gts)), gts, min_area=26).annotate(IMAGE, [])
    assert [r.gt_index for r in result.records] == [1]


def test_moves_on_after_a_mask_over_the_time_limit():
    big, small = rect(2, 38, 2, 30), rect(2, 12, 34, 46)
    predictor = ScriptedPredictor(answer(np.zeros((H, W), bool)))
    result = SimulatedAnnotator(predictor, [big, small]).annotate(IMAGE, [])
    # 6 clicks (19 s) then ceil(1008 / 256) = 4 strokes (10 s) = 29 s: not over 30 s
    assert len(result.records) == 2 and not result.moved_on
    result = SimulatedAnnotator(predictor, [big, small], max_seconds_per_mask=25).annotate(IMAGE, [])
    (record,) = result.records  # the first mask is kept, brushed to the GT; the small object is left
    assert record.gt_index == 0 and record.over_time and record.brush_used and result.moved_on
    np.testing.assert_array_equal(result.masks[0], big)


def test_time_limit_stops_the_clicking():
    gt = rect(2, 38, 2, 46)
    slow = TimeModel(object_seconds=4, click_seconds=4, response_seconds=1)
    predictor = ScriptedPredictor(answer(rect(2, 38, 2, 20)))
    record = SimulatedAnnotator(predictor, [gt], max_clicks=100, time_model=slow).annotate(IMAGE, []).records[0]
    # after 5 clicks 29 s (go on), after 6 clicks 34 s: over 30, brush
    assert record.num_clicks == 6 and record.brush_used and record.over_time


def test_prefilled_masks_matching_gt_are_accepted_and_not_annotated():
    gts = [rect(0, 10, 0, 10), rect(10, 30, 10, 30), disc(30, 40, 6)]
    near = gts[1].copy()
    near[10, 10:30] = False  # IoU 0.95 with gts[1]
    junk = rect(0, 40, 40, 48)
    rough = gts[0] & ~rect(0, 10, 0, 2)  # IoU 0.8 with gts[0]: below the threshold
    predictor = ScriptedPredictor(object_under_click(gts))
    result = SimulatedAnnotator(predictor, gts).annotate(IMAGE, [junk, near, gts[1], rough])
    assert result.accepted_prefilled == [2]  # the exact one wins; its duplicate is not accepted twice
    assert result.num_accepted_prefilled == 1
    assert [r.gt_index for r in result.records] == [2, 0]
    all_done = SimulatedAnnotator(predictor, gts).annotate(IMAGE, [gts[2], near, gts[0]])
    assert all_done.accepted_prefilled == [0, 1, 2] and all_done.records == [] and all_done.seconds == 0
    assert predictor.images_set == 1  # nothing left to label: the image is not even embedded


def test_one_prefilled_mask_covers_one_object_only():
    whole = rect(10, 30, 10, 30)
    part = whole & ~rect(10, 11, 10, 30)  # a part nearly as large as the whole (IoU 0.95)
    predictor = ScriptedPredictor(answer(part))
    result = SimulatedAnnotator(predictor, [whole, part]).annotate(IMAGE, [whole])
    assert result.accepted_prefilled == [0]
    assert [r.gt_index for r in result.records] == [1]  # the part is still labelled


def test_bad_input_is_rejected():
    gt = rect(0, 10, 0, 10)
    annotator = SimulatedAnnotator(ScriptedPredictor(answer(gt)), [gt])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        annotator.annotate(np.zeros((H, W), np.uint8), [])
    with pytest.raises(ValueError, match="GT masks"):
        annotator.annotate(np.zeros((H + 1, W, 3), np.uint8), [])
    with pytest.raises(ValueError, match="prefilled mask 0"):
        annotator.annotate(IMAGE, [gt.astype(np.uint8)])
    with pytest.raises(ValueError, match="mask 1"):
        SimulatedAnnotator(ScriptedPredictor(answer(gt)), [gt, gt[:5]])
    with pytest.raises(ValueError, match="target_iou"):
        SimulatedAnnotator(ScriptedPredictor(answer(gt)), [gt], target_iou=0)
    with pytest.raises(ValueError, match="brush"):
        TimeModel(brush_width=0)


@pytest.fixture
def one_torch_thread():
    """The tiny model's ops are so small that, on a busy 2-core machine, thread hand-offs cost more
    than the arithmetic (measured: 0.3 s with one thread, 4 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_end_to_end_with_the_tiny_sam_predictor(one_torch_thread):
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY)).eval()
    image, gts = generate_image(0, size=96, min_objects=2, max_objects=3)
    for model in (SamPredictor(sam), sam):  # a predictor, or a model the annotator wraps
        result = SimulatedAnnotator(model, gts).annotate(image, [])
        assert isinstance(result, ImageAnnotation) and len(result.masks) == len(result.records) >= 1
        areas = [gts[r.gt_index].sum() for r in result.records]
        assert areas == sorted(areas, reverse=True)
        assert len({r.gt_index for r in result.records}) == len(result.records)
        for mask, record in zip(result.masks, result.records):
            gt = gts[record.gt_index]
            assert mask.shape == gt.shape and mask.dtype == bool
            assert record.iou_to_gt == pytest.approx(float(dense_mask_iou(torch.from_numpy(mask), torch.from_numpy(gt)))) and record.iou_to_gt >= 0.9
            assert 1 <= record.num_clicks <= 6
            first = record.clicks[0]
            assert first.label == 1 and gt[first.y, first.x]
            assert record.seconds == pytest.approx(
                TIME.object_seconds
                + record.num_clicks * (TIME.click_seconds + TIME.response_seconds)
                + record.brush_strokes * TIME.brush_stroke_seconds
            )
        assert result.moved_on == result.records[-1].over_time
        if not result.moved_on:
            assert len(result.records) == len(gts)

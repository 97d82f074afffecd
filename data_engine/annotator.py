"""Annotators for the data engine: the interface a real annotation tool implements, and a simulated one.

The engine hands an annotator an image and the masks already on it (none in the assisted-manual
stage, the detector's confident masks in the semi-automatic stage) and gets back the new masks with
a record of how each was made (masks in, masks out). `Annotator` is that contract; a real tool
(a web UI with a human) can implement it without anything else from this module.

`SimulatedAnnotator` stands in for the human (SAM paper section 4 and appendix B): it sees the
ground truth, which the model never does, and follows the interactive evaluation protocol (SAM
section 7.1 / RITM) in a tool powered by the current model:

- objects are labelled in order of prominence (largest GT area first); a GT object that a prefilled
  mask already matches is done, and that prefilled mask is accepted;
- per object: the first click is the GT pixel farthest from the object's boundary (positive); the
  model answers with three masks and the tool shows the one with the highest predicted IoU; every
  next click is the pixel farthest from the boundary of the largest error region (positive in a
  false negative, negative in a false positive) and the model answers with one mask, fed its
  previous low-res logits; clicking stops at the target IoU or when the click budget is spent;
- if the target is not reached, the rest is painted with the brush/eraser: the mask becomes the GT,
  at a cost in strokes computed from the remaining error area;
- every action costs simulated seconds (`TimeModel`); once a mask takes over `max_seconds_per_mask`
  the annotator stops clicking, finishes that mask with the brush, keeps it and moves to the next
  image ("proceed to the next image once annotation of a mask took over 30 seconds").

Everything is deterministic: the protocol has no random choices.

Clicks are pixel indices (x = column, y = row) of the original image, the convention of the
official predictor's `point_coords` (SAM's prompt encoder adds the half pixel itself).
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from segany_train.data.mask_iou import dense_mask_iou, encode_masks, rle_iou_matrix
from segany_train.inference.predictor import SamPredictor
from segany_train.model.sam import Sam
from segany_train.prompting import center_correction_clicks


class Click(NamedTuple):
    """One click: pixel indices x (column), y (row) of the original image and label (1 fg, 0 bg)."""

    x: int
    y: int
    label: int


@dataclass(frozen=True)
class MaskRecord:
    """How one new mask was made.

    gt_index: the GT object the annotator meant (index into the GT list); clicks: in order;
    brush_strokes: brush/eraser strokes of the fallback (0 if the clicks reached the target);
    seconds: simulated time spent on this mask; iou_before_brush: IoU of the model's last mask with
    the GT (0.0 if no click was made); iou_to_gt: IoU of the kept mask; over_time: the mask took over
    `max_seconds_per_mask`, so the annotator left the image after it.
    """

    gt_index: int
    clicks: tuple[Click, ...]
    brush_strokes: int
    seconds: float
    iou_before_brush: float
    iou_to_gt: float
    over_time: bool

    @property
    def num_clicks(self) -> int:
        return len(self.clicks)

    @property
    def brush_used(self) -> bool:
        return self.brush_strokes > 0


@dataclass
class ImageAnnotation:
    """An annotator's output for one image.

    masks: the new HxW bool masks, in the order they were made, one `MaskRecord` each in `records`;
    accepted_prefilled: indices of the prefilled masks the annotator kept (the others were wrong
    and are dropped); moved_on: the annotator left the image because a mask took too long, so
    objects may remain unlabelled.
    """

    masks: list[np.ndarray] = field(default_factory=list)
    records: list[MaskRecord] = field(default_factory=list)
    accepted_prefilled: list[int] = field(default_factory=list)
    moved_on: bool = False

    @property
    def seconds(self) -> float:
        """Total simulated time spent on the image (the sum over its new masks)."""
        return sum(record.seconds for record in self.records)

    @property
    def num_accepted_prefilled(self) -> int:
        return len(self.accepted_prefilled)


@runtime_checkable
class Annotator(Protocol):
    """Anything that annotates an image: a simulated annotator or a real annotation tool."""

    def annotate(self, image: np.ndarray, prefilled: list[np.ndarray]) -> ImageAnnotation:
        """image: HxWx3 uint8 RGB; prefilled: HxW bool masks already on the image (may be empty).

        Returns the new masks and, per mask, how it was made; says which prefilled masks it kept.
        """
        ...


class MaskPredictor(Protocol):
    """The part of `SamPredictor`'s interface the simulated annotator's tool uses."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks CxHxW bool, predicted IoU C, low-res logits Cxhxw."""
        ...


@dataclass(frozen=True)
class TimeModel:
    """Simulated seconds per annotation action.

    A mask costs object_seconds + clicks * (click_seconds + response_seconds)
    + brush strokes * brush_stroke_seconds. The defaults are chosen to reproduce the SAM paper's
    stage-1 range (34 s per mask with the first model, 14 s with the last):

    - a good model reaches the target in 3-4 clicks: 4 + 3 * 2.5 = 11.5 s to 4 + 4 * 2.5 = 14 s;
    - a poor model spends the 6-click budget (19 s) and leaves, say, 1,500 px of error on a mid-sized
      object: ceil(1500 / 256) = 6 strokes = 15 s more, 34 s in all.

    Brush sizes are in image pixels and assume images of roughly 500-1500 px (SA-1B's are shown at
    about 1500 px; the synthetic corpus is 512 px); a stroke paints brush_width x brush_stroke_length
    pixels.
    """

    object_seconds: float = 4.0  # find the next object, judge its extent, accept the final mask
    click_seconds: float = 1.5  # aim at and click a point
    response_seconds: float = 1.0  # wait for and inspect the model's new mask
    brush_stroke_seconds: float = 2.5  # one brush or eraser stroke, aimed along the error
    brush_width: int = 8  # pixels
    brush_stroke_length: int = 32  # pixels

    def __post_init__(self) -> None:
        for name in ("object_seconds", "click_seconds", "response_seconds", "brush_stroke_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"TimeModel.{name} must be >= 0, got {getattr(self, name)}")
        if self.brush_width < 1 or self.brush_stroke_length < 1:
            raise ValueError(
                f"TimeModel brush sizes must be >= 1 pixel, got {self.brush_width} x {self.brush_stroke_length}"
            )

    @property
    def brush_stroke_area(self) -> int:
        """Pixels one brush or eraser stroke paints."""
        return self.brush_width * self.brush_stroke_length

    def brush_strokes(self, false_negative_area: int, false_positive_area: int) -> int:
        """Strokes to fix an error: brush over the missing part, eraser over the extra part."""
        stroke = self.brush_stroke_area
        return math.ceil(false_negative_area / stroke) + math.ceil(false_positive_area / stroke)


def correction_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The evaluation protocol's next click for HxW bool masks, or None if pred == gt.

    The pixel farthest from the boundary of the largest error region (see
    `segany_train.prompting.center_correction_clicks`), label 1 in the false negative, 0 in the
    false positive. With pred all False it is the GT pixel farthest from the object boundary.

    The distance transform runs on the bounding box of the error only. That is exact: the
    transform counts everything outside its input as outside the region, which is true of every
    pixel outside that box, and row-major order (the tie-break) is the same within the box.
    """
    error = pred ^ gt
    rows, cols = np.flatnonzero(error.any(axis=1)), np.flatnonzero(error.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    coords, labels, _ = center_correction_clicks(
        torch.from_numpy(pred[None, r0:r1, c0:c1]), torch.from_numpy(gt[None, r0:r1, c0:c1])
    )
    # coords are pixel centres (col + 0.5, row + 0.5) of the box
    col, row = (int(v) for v in coords[0].floor().tolist())
    return Click(x=c0 + col, y=r0 + row, label=int(labels[0]))


class SimulatedAnnotator:
    """A simulated annotator that knows one image's ground truth and uses a SAM-powered tool.

    predictor: a `SamPredictor` (or a `Sam`, wrapped in one), or anything with the same
    `set_image` / `predict`; it only ever receives the image, the clicks and its own previous
    logits. gt_masks: the image's ground-truth objects, HxW bool each; one annotator is made per
    image and the predictor is shared.

    target_iou: clicking stops once the model's mask reaches this IoU with the GT object.
    max_clicks: click budget per object before the brush/eraser fallback (6: a human gives up on
        the model after a handful of corrections; with the default `TimeModel` 6 clicks take 19 s).
    max_seconds_per_mask: once a mask takes longer, it is finished with the brush and kept and the
        annotator moves to the next image (the paper's 30-second instruction).
    min_area: GT objects smaller than this many pixels are not labelled.
    prefilled_iou: a prefilled mask with at least this IoU with a GT object is accepted and that
        object is done; each prefilled mask matches at most one object and vice versa.
    """

    def __init__(
        self,
        predictor: SamPredictor | Sam | MaskPredictor,
        gt_masks: list[np.ndarray],
        *,
        target_iou: float = 0.9,
        max_clicks: int = 6,
        max_seconds_per_mask: float = 30.0,
        min_area: int = 0,
        prefilled_iou: float = 0.9,
        time_model: TimeModel = TimeModel(),
    ) -> None:
        if not 0.0 < target_iou <= 1.0:
            raise ValueError(f"target_iou must be in (0, 1], got {target_iou}")
        if not 0.0 < prefilled_iou <= 1.0:
            raise ValueError(f"prefilled_iou must be in (0, 1], got {prefilled_iou}")
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
        if max_seconds_per_mask <= 0:
            raise ValueError(f"max_seconds_per_mask must be > 0, got {max_seconds_per_mask}")
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {min_area}")
        gt = [np.asarray(m) for m in gt_masks]
        for k, m in enumerate(gt):
            if m.ndim != 2 or m.dtype != bool or m.shape != gt[0].shape:
                raise ValueError(
                    f"gt_masks must be HxW bool masks of one size; mask {k} is {m.dtype} {m.shape}"
                )
        self.predictor = SamPredictor(predictor) if isinstance(predictor, Sam) else predictor
        self.gt_masks = gt
        self.target_iou = target_iou
        self.max_clicks = max_clicks
        self.max_seconds_per_mask = max_seconds_per_mask
        self.min_area = min_area
        self.prefilled_iou = prefilled_iou
        self.time_model = time_model

    def annotate(self, image: np.ndarray, prefilled: list[np.ndarray]) -> ImageAnnotation:
        """image: HxWx3 uint8 RGB, the image whose GT this annotator holds; prefilled: HxW bool masks.

        Returns the new masks in the order they were made, largest GT object first.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8, got {image.dtype} {image.shape}")
        size = image.shape[:2]
        if self.gt_masks and self.gt_masks[0].shape != size:
            raise ValueError(f"image is {size[0]}x{size[1]} but the GT masks are {self.gt_masks[0].shape}")
        prefilled = [np.asarray(m) for m in prefilled]
        for k, m in enumerate(prefilled):
            if m.shape != size or m.dtype != bool:
                raise ValueError(f"prefilled mask {k} must be {size[0]}x{size[1]} bool, got {m.dtype} {m.shape}")

        accepted, done = self._match_prefilled(prefilled)
        result = ImageAnnotation(accepted_prefilled=accepted)
        todo = [k for k in self._prominence_order() if k not in done]
        if todo:
            self.predictor.set_image(image)
        for k in todo:
            mask, record = self._annotate_object(k)
            result.masks.append(mask)
            result.records.append(record)
            if record.over_time:
                result.moved_on = True
                break
        return result

    def _prominence_order(self) -> list[int]:
        """Indices of the GT objects to label, largest area first (ties: GT order)."""
        areas = [int(np.count_nonzero(m)) for m in self.gt_masks]
        labelled = [k for k, area in enumerate(areas) if area >= max(self.min_area, 1)]
        return sorted(labelled, key=lambda k: -areas[k])

    def _match_prefilled(self, prefilled: list[np.ndarray]) -> tuple[list[int], set[int]]:
        """(indices of the prefilled masks accepted, sorted; the GT objects they cover).

        Greedy one-to-one matching, highest IoU first: a duplicate prefilled mask of an object is
        not accepted twice, and one prefilled mask does not cover both a whole and a part that is
        nearly all of it.
        """
        if not prefilled or not self.gt_masks:
            return [], set()
        # as RLEs: full-resolution matrices of every pre-filled and GT mask would not fit an SA-1B image
        iou = rle_iou_matrix(encode_masks(prefilled), encode_masks(self.gt_masks))
        accepted: set[int] = set()
        done: set[int] = set()
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), len(self.gt_masks))
            if iou[i, j] < self.prefilled_iou:
                break
            if i not in accepted and j not in done:
                accepted.add(i)
                done.add(j)
        return sorted(accepted), done

    def _annotate_object(self, gt_index: int) -> tuple[np.ndarray, MaskRecord]:
        """Clicks until the target IoU, the click budget or the time limit; then brush if needed."""
        gt = self.gt_masks[gt_index]
        tm = self.time_model
        seconds = tm.object_seconds
        clicks: list[Click] = []
        mask = np.zeros_like(gt)
        logits: np.ndarray | None = None  # the previous low-res logits, 1xhxw
        iou = 0.0
        while len(clicks) < self.max_clicks and seconds <= self.max_seconds_per_mask:
            click = correction_click(mask, gt)
            assert click is not None  # mask != gt: its IoU is below the target
            clicks.append(click)
            coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32)
            labels = np.array([c.label for c in clicks], dtype=np.int64)
            # one click is ambiguous: three candidates, the tool shows the most confident; after
            # that the clicks decide the object, and the previous mask guides the model
            multimask = len(clicks) == 1
            masks, iou_predictions, low_res = self.predictor.predict(
                point_coords=coords, point_labels=labels, mask_input=logits, multimask_output=multimask
            )
            best = int(np.argmax(iou_predictions))
            mask, logits = np.asarray(masks[best], dtype=bool), low_res[best][None]
            seconds += tm.click_seconds + tm.response_seconds
            iou = float(dense_mask_iou(torch.from_numpy(mask), torch.from_numpy(gt)))
            if iou >= self.target_iou:
                break
        strokes = 0
        if iou < self.target_iou:  # clicks did not get there: brush/eraser the rest to the GT
            strokes = tm.brush_strokes(int(np.count_nonzero(gt & ~mask)), int(np.count_nonzero(mask & ~gt)))
            seconds += strokes * tm.brush_stroke_seconds
            mask = gt.copy()
        record = MaskRecord(
            gt_index=gt_index,
            clicks=tuple(clicks),
            brush_strokes=strokes,
            seconds=seconds,
            iou_before_brush=iou,
            iou_to_gt=float(dense_mask_iou(torch.from_numpy(mask), torch.from_numpy(gt))),
            over_time=seconds > self.max_seconds_per_mask,
        )
        return mask, record

"""Interactive evaluation (SAM paper section 7.1): mIoU after k center clicks, oracle mIoU, NoC.

Every GT mask of every image is segmented with simulated clicks: the first at the GT's most interior
point, each next at the deepest point of the largest error region between the shown mask and the GT
(foreground in a false negative, background in a false positive), the previous logits fed back as
the mask prompt. This is `RolloutConfig(click_mode="center")` of the training rollout, so training
validation and this evaluation run the same protocol.

IoU is measured at each image's own resolution by default, as the SAM paper and the click-protocol
literature do: the logits are upsampled the way the predictor returns masks (`Sam.postprocess_masks`)
and compared with the GT decoded from its RLE at full size. `iou_resolution="low_res"` measures in
the decoder's low-resolution frame instead (image_size / 4 per side, 256 for SAM), against the GT
sampled to it by nearest neighbour, inside the image: cheaper, and what training's validation logs;
thin and small objects score differently there. Either way the clicks are placed on the error in
the low-resolution frame, where the rollout works.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segany_train.data.mask_iou import dense_mask_iou
from segany_train.data.pipeline import SkipLog, collate_sam_samples, sam_sample_pipeline
from segany_train.data.rle import decode_rles_at
from segany_train.data.sam_sample import SamSampleConfig, valid_region
from segany_train.evaluation.periodic_report import PeriodicReport
from segany_train.model import Sam
from segany_train.prompting.rollout import RolloutConfig, interactive_ious

REPORT_CLICKS = (1, 2, 3, 5, 9)
NOC_THRESHOLDS = (0.85, 0.90)
IOU_RESOLUTIONS = ("full", "low_res")


@dataclass(frozen=True)
class InteractiveEvalConfig:
    """The protocol's settings. 20 clicks is the cap of the interactive segmentation literature's NoC."""

    max_clicks: int = 20
    mask_feedback: bool = True  # feed the previous logits back as the mask prompt (as in training)
    max_masks_per_image: int | None = None  # None: every mask; else a seeded random subset
    max_area_fraction: float = 1.0  # masks covering more of the image are left out
    batch_size: int = 1  # images per encoder batch
    num_workers: int = 0
    seed: int = 0
    iou_resolution: str = "full"  # "full": at the image's size; "low_res": in the decoder's mask frame

    def __post_init__(self) -> None:
        if self.max_clicks < 1:
            raise ValueError(f"max_clicks must be at least 1, got {self.max_clicks}")
        if self.iou_resolution not in IOU_RESOLUTIONS:
            raise ValueError(f"iou_resolution must be one of {IOU_RESOLUTIONS}, got {self.iou_resolution!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def rollout(self) -> RolloutConfig:
        """The click schedule: the first click and max_clicks - 1 correction clicks, no refinement-only steps."""
        return RolloutConfig(
            num_iterations=self.max_clicks,
            num_correction_clicks=self.max_clicks - 1,
            box_probability=0.0,
            click_mode="center",
            mask_feedback=self.mask_feedback,
        )


class FullResolutionIoU:
    """IoU of low-res logits with the GT at each image's own size, for the N masks of one batch.

    The GT (N RLEs) is decoded once at full size; each call upsamples the logits as the predictor
    does (to the input frame, cropped to the image, resized to HxW) in chunks of masks, so an SA-1B
    image (~1500x2250, 100+ masks) never holds all of its outputs at full size at once.
    """

    def __init__(
        self,
        sam: Sam,
        *,
        segmentations: list[dict],
        image_index: torch.Tensor,
        input_size: torch.Tensor,
        original_size: torch.Tensor,
        max_elements: int = 2**25,
    ) -> None:
        if len(segmentations) != image_index.numel():
            raise ValueError(f"{len(segmentations)} segmentations for {image_index.numel()} masks")
        self.sam = sam
        self.max_elements = max_elements
        self.images = []  # (rows of the image's masks, input size, original size, GT KxHxW bool)
        for i, ((h, w), size) in enumerate(zip(original_size.tolist(), input_size.tolist())):
            rows = (image_index == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rles = [segmentations[r] for r in rows.tolist()]
            gt = decode_rles_at(rles, np.arange(h), np.arange(w))  # K x H x W
            self.images.append((rows, tuple(size), (h, w), torch.from_numpy(gt).to(image_index.device)))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Nx3xhxw low-res logits -> Nx3 IoU (1 where prediction and GT are both empty)."""
        out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        for rows, input_size, (h, w), gt in self.images:
            chunk = max(1, self.max_elements // (logits.shape[1] * h * w))
            for start in range(0, rows.numel(), chunk):
                part = rows[start : start + chunk]
                full = self.sam.postprocess_masks(logits[part].float(), input_size, (h, w))  # c x 3 x H x W
                out[part] = dense_mask_iou(full > self.sam.mask_threshold, gt[start : start + chunk])
        return out


def _mean_counting_vanished(shown: torch.Tensor, vanished: int, miou: dict[str, float | None]) -> dict[str, float | None]:
    """mIoU after k clicks over the evaluated masks and the vanished ones, each of those counted 0."""
    total = shown.shape[0] + vanished
    return {k: float(shown[:, int(k) - 1].double().sum()) / total if total else None for k in miou}


def _no_click_reached(reached: torch.Tensor, max_clicks: int) -> torch.Tensor:
    """NxK bool "IoU >= threshold after k clicks" -> N clicks needed (K where never reached)."""
    first = reached.to(torch.uint8).argmax(dim=1) + 1  # argmax: the first True
    return torch.where(reached.any(dim=1), first, torch.full_like(first, max_clicks)).float()


def summarize_interactive(
    shown: torch.Tensor,
    oracle: torch.Tensor,
    *,
    report_clicks: tuple[int, ...] = REPORT_CLICKS,
    noc_thresholds: tuple[float, ...] = NOC_THRESHOLDS,
) -> dict:
    """Aggregates per-mask IoUs (NxK each: column k-1 is the IoU after k clicks) into the report.

    miou / oracle_miou: mean over masks after k clicks, for each reported k <= K. noc: mean number of
    clicks to reach IoU >= t (a mask that never reaches it counts K, the click cap); nof: how many
    masks never reach it. Keys of the per-threshold dicts are percentages ("85", "90"). Values are
    None when there is no mask.
    """
    if shown.shape != oracle.shape or shown.dim() != 2:
        raise ValueError(f"shown and oracle must both be NxK, got {tuple(shown.shape)} and {tuple(oracle.shape)}")
    n, k_max = shown.shape

    def mean(values: torch.Tensor) -> float | None:
        return float(values.double().mean()) if n else None

    clicks = [k for k in report_clicks if k <= k_max]
    out: dict = {
        "max_clicks": k_max,
        "masks": n,
        "miou": {str(k): mean(shown[:, k - 1]) for k in clicks},
        "oracle_miou": {str(k): mean(oracle[:, k - 1]) for k in clicks},
        "noc": {},
        "nof": {},
    }
    for t in noc_thresholds:
        name = f"{round(t * 100):d}"
        reached = shown >= t
        out["noc"][name] = mean(_no_click_reached(reached, k_max))
        out["nof"][name] = int((~reached.any(dim=1)).sum())
    return out


def _first_images(batch: dict, count: int) -> dict:
    """The batch cut to its first `count` images (and their masks)."""
    keep = batch["image_index"] < count
    cut = {k: batch[k][:count] for k in ("image", "input_size", "valid_size", "original_size", "num_annotations", "masks_vanished")}
    cut.update(keys=batch["keys"][:count], skipped=batch["skipped"], masks_per_image=batch["masks_per_image"][:count])
    cut.update({k: batch[k][keep] for k in ("masks", "image_index")})
    if "segmentations" in batch:
        cut["segmentations"] = [rle for rle, k in zip(batch["segmentations"], keep.tolist()) if k]
    return cut


@torch.no_grad()
def evaluate_interactive(
    sam: Sam,
    urls: list[str],
    cfg: InteractiveEvalConfig = InteractiveEvalConfig(),
    *,
    max_images: int | None = None,
    progress: bool = True,
    per_mask: bool = False,
    report_every: int = 0,
) -> dict:
    """Runs the protocol over every sample of the shards, each read once (in order when num_workers is 0).

    Returns `summarize_interactive`'s report plus images (evaluated), images_skipped ({reason: n}:
    undecodable samples, corrupt shard members, images with no usable mask), masks_in_images (GT
    masks of the evaluated images), masks_skipped (of those, not evaluated: over max_area_fraction,
    empty, invisible at the low-res size or beyond max_masks_per_image), masks_vanished (the invisible
    ones), miou_every_mask (mIoU after k clicks with each vanished mask counted 0, beside `miou` over
    the evaluated masks), the IoU resolution and the low-res frame size. `report_every`: a line on
    stderr every that many images (`PeriodicReport`; 0: none), for runs without the progress bar.
    """
    sam = sam.eval()
    device = next(sam.parameters()).device
    img_size = sam.image_encoder.img_size
    mask_size = sam.prompt_encoder.mask_input_size[0]
    sample_cfg = SamSampleConfig(
        image_size=img_size,
        mask_size=mask_size,
        max_masks=cfg.max_masks_per_image or 2**62,
        max_area_fraction=cfg.max_area_fraction,
        keep_segmentations=cfg.iou_resolution == "full",
    )
    loader = DataLoader(
        sam_sample_pipeline(urls, sample_cfg, mode="once", seed=cfg.seed),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_sam_samples,
    )
    rollout = cfg.rollout()
    SkipLog.take()  # forget skips of earlier readers in this process
    skipped: Counter = Counter()
    shown, oracle, predicted_1, mask_image = [], [], [], []
    images = masks_in_images = vanished = 0
    bar = tqdm(total=max_images, desc="interactive", unit="img", disable=not progress)
    lines = PeriodicReport("interactive", report_every, total=max_images)
    for batch in loader if max_images is None or max_images > 0 else ():
        if max_images is not None:
            batch = _first_images(batch, max_images - images)
        skipped.update(batch["skipped"])
        gt = batch["masks"].to(device)
        image_index = batch["image_index"].to(device)
        embeddings = sam.image_encoder(sam.normalize_padded(batch["image"].to(device), batch["input_size"].to(device)))
        valid = valid_region(batch["valid_size"].to(device), mask_size)[image_index]
        # center clicks are deterministic; the seeded generator keeps the rollout's unused draws off the global RNG
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        measure = None
        if cfg.iou_resolution == "full":
            measure = FullResolutionIoU(
                sam,
                segmentations=batch["segmentations"],
                image_index=image_index,
                input_size=batch["input_size"],
                original_size=batch["original_size"],
            )
        ious = interactive_ious(sam, embeddings, gt, image_index, rollout, valid=valid, generator=generator, measure=measure)
        shown.append(torch.stack([ious[k].shown for k in range(1, cfg.max_clicks + 1)], dim=1).cpu())
        oracle.append(torch.stack([ious[k].oracle for k in range(1, cfg.max_clicks + 1)], dim=1).cpu())
        predicted_1.append(ious[1].predicted.float().cpu())
        mask_image.append(image_index.cpu() + images)
        n_images = batch["image"].shape[0]
        images += n_images
        masks_in_images += int(batch["num_annotations"].sum())
        vanished += int(batch["masks_vanished"].sum())
        bar.update(n_images)
        lines.update(n_images)
        if max_images is not None and images >= max_images:
            break
    bar.close()
    lines.close()
    if cfg.num_workers == 0 and (max_images is None or images < max_images):
        skipped.update(SkipLog.take())  # skips after the last delivered sample
    empty = torch.zeros(0, cfg.max_clicks)
    shown_all = torch.cat(shown) if shown else empty
    predicted_all = torch.cat(predicted_1) if predicted_1 else torch.zeros(0)
    report = summarize_interactive(shown_all, torch.cat(oracle) if oracle else empty)
    report.update(
        images=images,
        images_skipped=dict(skipped),
        masks_in_images=masks_in_images,
        masks_skipped=masks_in_images - report["masks"],
        # masks chosen but without a pixel in the low-res frame (no click can find them): each counts 0
        masks_vanished=vanished,
        miou_every_mask=_mean_counting_vanished(shown_all, vanished, report["miou"]),
        iou_resolution=cfg.iou_resolution,
        # the frame the clicks are placed in, and the IoU's with iou_resolution "low_res"
        low_res_frame=[mask_size, mask_size],
        mask_feedback=cfg.mask_feedback,
        iou_head_spearman=spearman(predicted_all, shown_all[:, 0]),
    )
    if per_mask:
        report["per_mask"] = {
            "shown": shown_all.tolist(),
            "predicted_1": predicted_all.tolist(),
            "image": (torch.cat(mask_image) if mask_image else torch.zeros(0, dtype=torch.long)).tolist(),
        }
    return report


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """N values -> their ranks 1..N as float64, tied values sharing the mean of their ranks."""
    order = values.argsort(stable=True)
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    _, groups = torch.unique(values, return_inverse=True)
    sums = torch.zeros(int(groups.max()) + 1 if values.numel() else 0, dtype=torch.float64).index_add_(0, groups, ranks)
    counts = torch.bincount(groups).double()
    return (sums / counts)[groups]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two N-vectors (Pearson on average ranks); None when N < 2 or
    either side is constant."""
    if a.numel() < 2:
        return None
    ra, rb = _average_ranks(a.flatten().double()), _average_ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else None

"""The LightningModule: SAM trained with simulated interactive prompting (SAM paper, appendix A)."""

from collections import Counter
from dataclasses import asdict

import lightning as L
import torch

from segany_train.model import Sam
from segany_train.training.losses import LossWeights, mask_iou, sam_loss
from segany_train.training.optim import OptimConfig, build_optimizer
from segany_train.training.rollout import IterationOutput, RolloutConfig, run_rollout

# the evaluation protocol: first click at the GT's most interior point, then 8 center clicks
EVAL_ROLLOUT = RolloutConfig(num_iterations=9, num_correction_clicks=8, box_probability=0.0, click_mode="center")
EVAL_CLICKS = (1, 3, 5, 9)


def normalize_images(sam: Sam, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
    """Bx3xSxS uint8 padded images -> normalised, with zeros in the padding (as `Sam.preprocess`)."""
    x = (images.to(sam.pixel_mean.dtype) - sam.pixel_mean) / sam.pixel_std
    side = images.shape[-1]
    coords = torch.arange(side, device=images.device)
    inside = (coords[None, :, None] < input_size[:, 0, None, None]) & (coords[None, None, :] < input_size[:, 1, None, None])
    return x * inside[:, None]


class SamTrainingModule(L.LightningModule):
    """Trains a `Sam` on SA-1B-format batches (see `segany_train.data.pipeline.collate_training_samples`)."""

    def __init__(
        self,
        sam: Sam,
        *,
        optim: OptimConfig = OptimConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        loss: LossWeights = LossWeights(),
        eval_rollout: RolloutConfig = EVAL_ROLLOUT,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.optim_cfg, self.rollout_cfg, self.loss_cfg, self.eval_rollout = optim, rollout, loss, eval_rollout
        self.seed = seed
        self.skipped: Counter = Counter()
        self.save_hyperparameters(
            {"sam": asdict(sam.config), "optim": asdict(optim), "rollout": asdict(rollout), "loss": asdict(loss)}
        )

    def _generator(self) -> torch.Generator:
        # per rank and step, so ranks draw different prompts and a resumed run draws the same ones
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank)
        return g

    def _mask_count(self, n: int) -> float:
        """Masks per rank averaged over ranks: with DDP's gradient averaging, loss/this = sum over all masks."""
        count = torch.tensor(float(n), device=self.device)
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")
        return max(count.item(), 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        for reason, n in batch["skipped"].items():
            self.skipped[reason] += n
        embeddings = self.sam.image_encoder(normalize_images(self.sam, batch["image"], batch["input_size"]))
        gt, image_index = batch["masks"], batch["image_index"]
        parts: list = []

        def on_iteration(out: IterationOutput) -> None:
            parts.append((out.step, sam_loss(out.logits, out.iou_pred, gt, self.loss_cfg), out.iou_pred.detach()))

        run_rollout(self.sam, embeddings, gt, image_index, self.rollout_cfg, on_iteration, self._generator())
        norm = self._mask_count(gt.shape[0])
        total = sum(p.total for _, p, _ in parts) / norm
        log = {
            "train/loss": total,
            "train/focal": sum(p.focal for _, p, _ in parts) / norm,
            "train/dice": sum(p.dice for _, p, _ in parts) / norm,
            "train/iou_head": sum(p.iou for _, p, _ in parts) / norm,
            "train/lr": self.trainer.optimizers[0].param_groups[-1]["lr"] if self.trainer.optimizers else 0.0,
        }
        for step, p, iou_pred in parts:
            log[f"train/miou_iter{step}"] = p.true_iou.mean()
            log[f"train/iou_pred_error_iter{step}"] = (iou_pred.gather(1, p.best[:, None])[:, 0] - p.true_iou).abs().mean()
        for reason, n in self.skipped.items():
            log[f"data/skipped_{reason}"] = float(n)
        self.log_dict(log, prog_bar=False, batch_size=batch["image"].shape[0])
        self.log("loss", total, prog_bar=True, logger=False, batch_size=batch["image"].shape[0])
        return total

    @torch.no_grad()
    def interactive_miou(self, batch: dict, rollout: RolloutConfig = EVAL_ROLLOUT) -> dict[int, torch.Tensor]:
        """Per-mask IoU after k interactions under the evaluation protocol: {k: N}."""
        embeddings = self.sam.image_encoder(normalize_images(self.sam, batch["image"], batch["input_size"]))
        gt = batch["masks"]
        ious: dict[int, torch.Tensor] = {}

        def on_iteration(out: IterationOutput) -> None:
            best = out.iou_pred.argmax(dim=1)  # the mask a user would be shown
            chosen = out.logits[torch.arange(gt.shape[0], device=gt.device), best][:, None]
            ious[out.interactions] = mask_iou(chosen, gt)[:, 0]

        run_rollout(self.sam, embeddings, gt, batch["image_index"], rollout, on_iteration, self._generator())
        return ious

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ious = self.interactive_miou(batch, self.eval_rollout)
        for k in EVAL_CLICKS:
            if k in ious:
                self.log(f"val/miou_{k}_clicks", ious[k].mean(), batch_size=ious[k].shape[0], sync_dist=True)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.sam, self.optim_cfg, self.sam.config.encoder_depth)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

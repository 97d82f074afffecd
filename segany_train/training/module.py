"""The LightningModule: SAM trained with simulated interactive prompting (SAM paper, appendix A)."""

from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace

import lightning as L
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from segany_train.data.sam_sample import valid_region
from segany_train.model import Sam
from segany_train.prompting.rollout import IterationOutput, RolloutConfig, interactive_ious, run_rollout
from segany_train.training.gradient_all_reduce import GradientAllReduce
from segany_train.training.losses import IterationLoss, LossWeights, grouped_sam_loss
from segany_train.training.optim import OptimConfig, build_optimizer

# the evaluation protocol: first click at the GT's most interior point, then 8 center clicks
EVAL_ROLLOUT = RolloutConfig(num_iterations=9, num_correction_clicks=8, box_probability=0.0, click_mode="center")
EVAL_CLICKS = (1, 3, 5, 9)
# the independent random streams of a step (see SamTrainingModule._generator)
PROMPTS, DROP_PATH = range(2)


def _detached(loss: IterationLoss) -> IterationLoss:
    return replace(
        loss,
        total=loss.total.detach(),
        focal=loss.focal.detach(),
        dice=loss.dice.detach(),
        iou=loss.iou.detach(),
        predicted_iou=loss.predicted_iou.detach(),
    )


class SamTrainingModule(L.LightningModule):
    """Trains a `Sam` on SA-1B-format batches (see `segany_train.data.pipeline.collate_sam_samples`)."""

    def __init__(
        self,
        sam: Sam,
        *,
        optim: OptimConfig = OptimConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        loss: LossWeights = LossWeights(),
        eval_rollout: RolloutConfig = EVAL_ROLLOUT,
        seed: int = 0,
        overlay_every_n_steps: int = 0,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.optim_cfg, self.rollout_cfg, self.loss_cfg, self.eval_rollout = optim, rollout, loss, eval_rollout
        self.seed = seed
        self.overlay_every_n_steps = overlay_every_n_steps
        self.last_visual: dict | None = None  # read (and cleared) by MaskOverlayCallback
        self.skipped: Counter = Counter()
        self.automatic_optimization = False  # see training_step: several backward passes per step
        self.save_hyperparameters(
            {"sam": asdict(sam.config), "optim": asdict(optim), "rollout": asdict(rollout), "loss": asdict(loss)}
        )

    def train(self, mode: bool = True) -> "SamTrainingModule":
        """Lightning's train/eval switch, except that a part with no trainable parameter (frozen by
        `model.freeze`) stays in eval mode: a frozen encoder must not keep drop path on."""
        super().train(mode)
        for part in (self.sam.image_encoder, self.sam.prompt_encoder, self.sam.mask_decoder):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def _generator(self, stream: int = PROMPTS) -> torch.Generator:
        """A generator on the module's device keyed on (seed, step, rank, stream): ranks draw apart, a
        resumed run continues the draws instead of replaying step 0's, and each stream (the prompts,
        the drop path) is independent of the others."""
        key = np.random.SeedSequence([self.seed, self.global_step, self.global_rank, stream]).generate_state(1, np.uint64)[0]
        g = torch.Generator(device=self.device)
        g.manual_seed(int(key))
        return g

    def _mask_count(self, n: int) -> float | torch.Tensor:
        """Masks per rank averaged over ranks: with DDP's gradient averaging, loss/this = sum over all
        masks. Over several ranks a tensor, never read back to the host (a sync on CUDA)."""
        if self.trainer.world_size == 1:
            return float(max(n, 1))
        count = torch.full((), float(n), device=self.device)
        return self.trainer.strategy.reduce(count, reduce_op="mean").clamp(min=1.0)

    def _unsynced(self) -> AbstractContextManager:
        """DDP's per-backward reduction off: a step runs several backward passes (one per decoder
        iteration, then the encoder's), and gradients are all-reduced once at the end."""
        wrapper = self.trainer.strategy.model
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else nullcontext()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimiser step: the encoder once, the decoder once per rollout iteration.

        Each iteration's loss is backpropagated as soon as it exists, into a detached copy of the
        embeddings, so only one iteration's decoder graph is alive at a time; the summed embedding
        gradient then goes through the encoder in one last backward pass.
        """
        for reason, n in batch["skipped"].items():
            self.skipped[reason] += n
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        keep_visual = bool(self.overlay_every_n_steps) and self.global_step % self.overlay_every_n_steps == 0
        optimizer.zero_grad()
        embeddings = self.sam.image_encoder(
            self.sam.normalize_padded(batch["image"], batch["input_size"]), generator=self._generator(DROP_PATH)
        )
        leaf = embeddings.detach().requires_grad_(embeddings.requires_grad)
        gt, image_index = batch["masks"], batch["image_index"]
        norm = self._mask_count(gt.shape[0])
        parts: list[tuple[int, IterationLoss]] = []
        first_prompts: list[tuple[torch.Tensor, torch.Tensor]] = []  # the prompts alone, not the logits
        last_shown: list[torch.Tensor] = []

        def on_iteration(out: IterationOutput) -> None:
            loss = grouped_sam_loss(out.groups, gt, self.loss_cfg)
            if loss.total.requires_grad:
                with self._unsynced():
                    self.manual_backward(loss.total / norm)  # scaled by fp16's loss scale, if any
            parts.append((out.step, _detached(loss)))
            if not first_prompts:
                first_prompts.append((out.point_coords, out.point_labels))
            last_shown[:] = [out.shown]

        # no click in the padding of a non-square image: a user never sees it
        valid = self._valid(batch)
        # image_index's run lengths on the host (collate_sam_samples gives them): the decoder groups
        # prompts by image without reading image_index back from the device
        counts = batch.get("masks_per_image")
        host_index = None if counts is None else np.repeat(np.arange(len(counts)), counts)
        run_rollout(
            self.sam, leaf, gt, image_index, self.rollout_cfg, on_iteration, self._generator(), valid=valid, host_image_index=host_index
        )
        # gradients averaged over ranks once (gradient_all_reduce.py): the decoder's and prompt
        # encoder's are final now and go while the encoder's backward pass runs, the encoder's as it
        # finishes each bucket of them
        reduce = GradientAllReduce(self.trainer.world_size)
        encoder = set(self.sam.image_encoder.parameters())
        trainable = [p for p in self.parameters() if p.requires_grad]
        reduce.send([p for p in trainable if p not in encoder])
        with reduce.during_backward([p for p in trainable if p in encoder]):
            if leaf.grad is not None:
                # leaf.grad carries fp16's loss scale already: through autograd as it is (manual_backward
                # would multiply the encoder's gradients by the scale a second time)
                with self._unsynced():
                    embeddings.backward(leaf.grad)
        reduce.finish()
        optimizer.step()  # clips in on_before_optimizer_step
        scheduler.step()
        if keep_visual:
            self._keep_visual(batch, first_prompts[0], last_shown[0])
        total = sum(p.total for _, p in parts) / norm
        log = {
            "train/loss": total,
            "train/focal": sum(p.focal for _, p in parts) / norm,
            "train/dice": sum(p.dice for _, p in parts) / norm,
            "train/iou_head": sum(p.iou for _, p in parts) / norm,
            "train/lr": optimizer.param_groups[-1]["lr"],
        }
        for step, p in parts:
            log[f"train/miou_iter{step}"] = p.true_iou.mean()
            log[f"train/iou_pred_error_iter{step}"] = (p.predicted_iou - p.true_iou).abs().mean()
        for reason, n in self.skipped.items():
            log[f"data/skipped_{reason}"] = float(n)
        self.log_dict(log, prog_bar=False, batch_size=batch["image"].shape[0])
        self.log("loss", total, prog_bar=True, logger=False, batch_size=batch["image"].shape[0])
        return total

    def _valid(self, batch: dict) -> torch.Tensor:
        """NxMxM bool: the image part of each mask's low-res frame (segany-eval clears the rest too)."""
        return valid_region(batch["valid_size"], batch["masks"].shape[-1])[batch["image_index"]]

    def _keep_visual(self, batch: dict, first_prompts: tuple[torch.Tensor, torch.Tensor], shown: torch.Tensor) -> None:
        """The first image's GT, final prediction and first prompts, for MaskOverlayCallback."""
        rows = (batch["image_index"] == 0).nonzero().squeeze(1)
        final = shown[rows] > self.sam.mask_threshold
        self.last_visual = {
            "image": batch["image"][0],
            "gt": batch["masks"][rows],
            "pred": final,
            "point_coords": first_prompts[0][rows],
            "point_labels": first_prompts[1][rows],
        }

    @torch.no_grad()
    def interactive_miou(self, batch: dict, rollout: RolloutConfig = EVAL_ROLLOUT) -> dict[int, torch.Tensor]:
        """Per-mask IoU after k interactions under the evaluation protocol: {k: N}."""
        embeddings = self.sam.image_encoder(self.sam.normalize_padded(batch["image"], batch["input_size"]))
        ious = interactive_ious(
            self.sam, embeddings, batch["masks"], batch["image_index"], rollout, valid=self._valid(batch), generator=self._generator()
        )
        return {k: v.shown for k, v in ious.items()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ious = self.interactive_miou(batch, self.eval_rollout)
        # masks without a pixel in the low-res frame cannot be clicked: each counts 0 in the second figure
        every = ious[EVAL_CLICKS[0]].shape[0] + int(batch["masks_vanished"].sum())
        for k in EVAL_CLICKS:
            if k in ious:
                self.log(f"val/miou_{k}_clicks", ious[k].mean(), batch_size=ious[k].shape[0], sync_dist=True)
                self.log(f"val/miou_{k}_clicks_every_mask", ious[k].sum() / every, batch_size=every, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradient clipping. Lightning calls this inside `optimizer.step()` once fp16's loss scale is
        out of the gradients (before `step()` they still carry it, and the clipped norm would be the
        scaled one); with bf16 or fp32 there is no scale and this is the same point."""
        if self.optim_cfg.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.gradient_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.sam, self.optim_cfg, self.sam.config.encoder_depth)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

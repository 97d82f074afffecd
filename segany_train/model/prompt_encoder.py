"""SAM's prompt encoder: points and boxes to sparse tokens, a mask prompt to a dense embedding."""

import torch
from torch import nn

from segany_train.model.layer_norm_2d import LayerNorm2d
from segany_train.model.position_encoding import PositionEmbeddingRandom

# Point labels. The first five are the official ones (2/3 are the box corners, as in the official
# ONNX model); IGNORE_LABEL marks padding added only to batch prompts of different lengths: such a
# token is masked out of attention, so it changes nothing, unlike NOT_A_POINT which is a real token.
NOT_A_POINT, BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3
IGNORE_LABEL = -10


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Sparse tokens: BxNx(embed_dim) for points/box corners. Dense: Bx(embed_dim)x(h)x(w) from a
    Bx1x(4h)x(4w) mask prompt, or the learned "no mask" embedding broadcast over the grid.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=embed_dim // 2)
        # background point, foreground point, box top-left, box bottom-right
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: 1x(embed_dim)x(h)x(w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_labelled_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BxNx2 pixel coords (input frame) and BxN labels -> BxNx(embed_dim) tokens.

        Labels: -1 not a point, 0 background, 1 foreground, 2/3 box corners; IGNORE_LABEL tokens are
        zero (the decoder masks them out).
        """
        coords = coords + 0.5  # to the pixel centre
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where((labels == NOT_A_POINT) | (labels == IGNORE_LABEL), torch.zeros_like(emb), emb)
        emb = emb + (labels == NOT_A_POINT) * self.not_a_point_embed.weight
        for label, table in zip((BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT), self.point_embeddings):
            emb = emb + (labels == label) * table.weight
        return emb

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:
            # Without a box, the official model appends one "not a point" token.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), NOT_A_POINT)], dim=1)
        return self.embed_labelled_points(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device).expand(corners.shape[0], 2)
        return self.embed_labelled_points(corners, labels)

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Bx1x(4h)x(4w) mask logits -> Bx(embed_dim)x(h)x(w)."""
        if masks.shape[-2:] != torch.Size(self.mask_input_size):
            raise ValueError(
                f"mask prompt must be Bx1x{self.mask_input_size[0]}x{self.mask_input_size[1]} low-res logits, "
                f"got {tuple(masks.shape)}"
            )
        return self.mask_downscaling(masks)

    def no_mask_dense(self, batch_size: int) -> torch.Tensor:
        """The "no mask" embedding as a Bx(embed_dim)x(h)x(w) broadcast view (no copies)."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official interface: (BxNx2 coords, BxN labels), Bx4 boxes, Bx1xHxW masks -> (sparse, dense)."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = [torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(bs)
        return torch.cat(sparse, dim=1), dense

"""SAM's mask decoder: two-way transformer, upscaling, hypernetwork mask heads and the IoU head."""

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from segany_train.model.layer_norm_2d import LayerNorm2d
from segany_train.model.mlp import MLP
from segany_train.model.two_way_transformer import SharedImageKeys, TwoWayTransformer

# On CPU, prompts x image tokens decoded per call: 4 prompts on a 64x64 embedding stay in cache.
CPU_CHUNK_TOKENS = 4 * 64 * 64


class MaskDecoder(nn.Module):
    """Predicts low-res mask logits and IoU for every prompt.

    Image embeddings Bx(C)x(h)x(w); prompts NxTxC sparse and (1 or N)xCxhxw dense; each prompt
    belongs to one image (`image_index`, N). Output: N x M x 4h x 4w logits and N x M IoU, where M is
    1 (single-mask token) or `num_multimask_outputs`. Prompts are decoded `prompt_chunk_size` at a
    time, which bounds memory for large batches; left at None that is, on CPU, as many prompts as
    hold 4 prompts' worth of a 64x64 embedding (4 for vit_b at 1024 px, 64 at 256 px), whose
    activations then stay in cache (vit_b, 64 prompts on 2 cores: 1.4x faster than one big batch in
    16s, and 4s 1.1x faster again than 16s; the 256-px engine seed's automatic masks 1.9x faster in
    64s than in 4s, whose many small calls cost more than the cache saves), and 16 elsewhere (fewer
    kernel launches).

    Two paths compute the same maths: the fast one (default), and with `reference` set (or inside
    `reference_path()`) the official algorithm, `predict_masks`, which the ONNX export traces and the
    benchmarks time as their baseline.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        prompt_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.prompt_chunk_size = prompt_chunk_size
        self.reference = False  # True: `forward` runs the reference path (see the class docstring)
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(input_dim=transformer_dim, hidden_dim=transformer_dim, output_dim=transformer_dim // 8, num_layers=3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_index: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        shared_keys: SharedImageKeys | None = None,
        host_image_index: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official call plus batching: returns (NxMx4hx4w logits, NxM IoU).

        image_index: N image indices; when omitted, a single image serves every prompt or image i
        serves prompt i (the official conventions). token_mask: NxT, False for batch padding tokens.
        shared_keys: `prepare_shared_keys` output to reuse across calls on the same images; used only
        when the dense prompt is the "no mask" embedding they were made from (ignored otherwise, and
        by the reference path). host_image_index: `image_index` as a host array, when the caller has it:
        the prompts are then grouped by image from it, without reading `image_index` back from the
        device (a host sync per call on CUDA).
        """
        outputs = self._output_slice(multimask_output)
        if self.reference:
            masks, iou = self.predict_masks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index, token_mask
            )
            return masks[:, outputs], iou[:, outputs]
        n = sparse_prompt_embeddings.shape[0]
        image_index = self._resolve_image_index(
            image_embeddings.shape[0], n, image_index, sparse_prompt_embeddings.device
        )
        tokens, token_mask = self._prompt_tokens(sparse_prompt_embeddings, token_mask)
        shared = self._dense_is_shared(dense_prompt_embeddings)
        if shared_keys is not None and not self._dense_is_no_mask(dense_prompt_embeddings):
            # the keys were made without a mask prompt and this dense carries one: a single-row
            # mask prompt is still shared by the prompts, but through keys made from it
            shared_keys = None
        if shared and shared_keys is None:
            # No mask prompt: every prompt of an image sees the same image tokens in the first layer,
            # worth preparing once there are enough prompts per image to pay for it
            if self._sharing_pays(n, image_embeddings.shape[0], tokens.shape[1]):
                shared_keys = self.prepare_shared_keys(image_embeddings, image_pe, dense_prompt_embeddings[:1])
            else:
                shared = False
        masks, iou = [], []
        chunk = self.prompt_chunk_size or self._default_chunk(image_embeddings)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            mask_rows = None if token_mask is None else token_mask[rows]
            if shared:
                host_rows = None if host_image_index is None else host_image_index[rows]
                hs, src = self._decode_grouped_by_image(tokens[rows], mask_rows, image_index[rows], shared_keys, host_rows)
            else:
                dense = dense_prompt_embeddings
                src = image_embeddings[image_index[rows]] + (dense if dense.shape[0] == 1 else dense[rows])
                hs, src = self.transformer(src, image_pe, tokens[rows], mask_rows)
            chunk_masks, chunk_iou = self._heads(hs, src, image_embeddings.shape[-2:], outputs)
            masks.append(chunk_masks)
            iou.append(chunk_iou)
        if len(masks) == 1:
            return masks[0], iou[0]
        return torch.cat(masks), torch.cat(iou)

    @staticmethod
    def _default_chunk(image_embeddings: torch.Tensor) -> int:
        if image_embeddings.device.type != "cpu":
            return 16
        return max(4, CPU_CHUNK_TOKENS // (image_embeddings.shape[-2] * image_embeddings.shape[-1]))

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference path: the official algorithm, for every mask token.

        Arguments as `forward`'s. Each prompt gets its own copy of its image's embedding plus its
        dense prompt and of the positional encoding, every attention is the plain one, the upscaling
        runs the transposed convolutions; nothing is chunked or shared between prompts. Returns
        NxKx4hx4w logits and NxK IoU for all K mask tokens (token 0 the single-mask output).
        """
        n = sparse_prompt_embeddings.shape[0]
        image_index = self._resolve_image_index(
            image_embeddings.shape[0], n, image_index, sparse_prompt_embeddings.device
        )
        tokens, token_mask = self._prompt_tokens(sparse_prompt_embeddings, token_mask)
        src = image_embeddings[image_index] + dense_prompt_embeddings
        # copied per prompt as officially, so that the benchmarks' baseline does the official work
        pos_src = image_pe.expand(n, -1, -1, -1).contiguous()
        hs, keys = self.transformer(src, pos_src, tokens, token_mask, reference=True)
        _, c, h, w = src.shape
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))  # N x C/8 x 4h x 4w
        hyper_in = torch.stack(
            [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # N x K x C/8
        masks = (hyper_in @ upscaled.flatten(2)).view(n, -1, *upscaled.shape[-2:])
        return masks, self.iou_prediction_head(hs[:, 0, :])

    @contextmanager
    def reference_path(self) -> Iterator["MaskDecoder"]:
        """`with decoder.reference_path():` every call decodes with `predict_masks` (see `reference`)."""
        previous, self.reference = self.reference, True
        try:
            yield self
        finally:
            self.reference = previous

    def _output_slice(self, multimask_output: bool) -> slice:
        """The mask tokens returned: the ambiguity masks 1.., or the single-mask token 0."""
        return slice(1, self.num_mask_tokens) if multimask_output else slice(0, 1)

    def _prompt_tokens(
        self, sparse: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sparse prompts NxTxC -> the output tokens and the prompts N x (1 + K + T) x C, and the token
        mask (NxT) extended over the output tokens."""
        n = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).expand(n, -1, -1)
        tokens = torch.cat([output_tokens, sparse], dim=1)
        if token_mask is not None:
            token_mask = torch.cat([token_mask.new_ones(n, 1 + self.num_mask_tokens), token_mask], dim=1)
        return tokens, token_mask

    @staticmethod
    def _resolve_image_index(
        num_images: int, num_prompts: int, image_index: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        if image_index is not None:
            if image_index.shape != (num_prompts,):
                raise ValueError(f"image_index must have one entry per prompt ({num_prompts}), got {tuple(image_index.shape)}")
            return image_index
        if num_images == 1:
            return torch.zeros(num_prompts, dtype=torch.long, device=device)
        if num_images == num_prompts:
            return torch.arange(num_prompts, device=device)
        raise ValueError(
            f"{num_images} image embeddings for {num_prompts} prompts: pass image_index to say which image each prompt is on"
        )

    @staticmethod
    def _dense_is_shared(dense: torch.Tensor) -> bool:
        """True when the dense prompt is one per-channel vector for all prompts (the "no mask" embedding)."""
        return dense.shape[0] == 1 or (dense.stride(0) == 0 and dense.stride(2) == 0 and dense.stride(3) == 0)

    @staticmethod
    def _dense_is_no_mask(dense: torch.Tensor) -> bool:
        """True when the dense prompt is constant over the grid and the prompts: the "no mask"
        embedding (broadcast, as `PromptEncoder.no_mask_dense` gives it, or 1xCx1x1); a mask
        prompt's embedding varies over the grid."""
        per_cell = dense.shape[-2:] == (1, 1) or (dense.stride(2) == 0 and dense.stride(3) == 0)
        return per_cell and (dense.shape[0] == 1 or dense.stride(0) == 0)

    def _sharing_pays(self, num_prompts: int, num_images: int, num_tokens: int) -> bool:
        """Whether preparing the shared image keys costs fewer multiply-adds than the prompts save.

        Per pixel: preparing projects the image tokens three times (3*C*Ci per image); a prompt's first
        layer then costs 3*T*Ci + h*T*C instead of 4*h*T*C (its cross-attentions folded into its
        tokens, `Attention.tokens_to_image` and `image_to_tokens`). For SAM: from 3 prompts per image.
        """
        c = self.transformer_dim
        attention = self.transformer.layers[0].cross_attn_token_to_image
        ci, heads = attention.internal_dim, attention.num_heads
        saved_per_prompt = num_tokens * (4 * heads * c - 3 * ci - heads * c)
        return num_prompts * saved_per_prompt > num_images * 3 * c * ci

    def prepare_shared_keys(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> SharedImageKeys:
        """Prompt-independent decoder work for B images without mask prompts (dense: 1xCx(1 or h)x(1 or w))."""
        return self.transformer.prepare_shared_keys(image_embeddings + dense, image_pe)

    def _decode_grouped_by_image(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
        image_index: torch.Tensor,
        shared_keys: SharedImageKeys,
        host_image_index: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if host_image_index is not None:
            # runs of consecutive prompts on one image (one run per image when sorted, as batches are):
            # slices, no index read from the device
            starts = [0, *(np.flatnonzero(np.diff(host_image_index)) + 1).tolist()]
            ends = starts[1:] + [len(host_image_index)]
            parts = [
                self.transformer.forward_shared(
                    shared_keys, int(host_image_index[a]), tokens[a:b], None if token_mask is None else token_mask[a:b]
                )
                for a, b in zip(starts, ends)
            ]
            if len(parts) == 1:
                return parts[0]
            return torch.cat([hs for hs, _ in parts]), torch.cat([src for _, src in parts])
        images = torch.unique(image_index).tolist()
        if len(images) == 1:
            return self.transformer.forward_shared(shared_keys, images[0], tokens, token_mask)
        hs = torch.empty_like(tokens)
        src = tokens.new_empty(tokens.shape[0], shared_keys.keys.shape[1], tokens.shape[2])
        for image in images:
            rows = (image_index == image).nonzero().squeeze(1)
            mask = None if token_mask is None else token_mask[rows]
            hs_i, src_i = self.transformer.forward_shared(shared_keys, image, tokens[rows], mask)
            hs = hs.index_copy(0, rows, hs_i)
            src = src.index_copy(0, rows, src_i)
        return hs, src

    def _heads(
        self, hs: torch.Tensor, src: torch.Tensor, grid: tuple[int, int], outputs: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens NxTxC and image tokens NxHWxC -> masks NxMx4hx4w and IoU NxM of the `outputs` tokens."""
        iou_pred = self.iou_prediction_head(hs[:, 0, :])
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(self.num_mask_tokens)[outputs]], dim=1
        )  # N x M x C/8
        masks = self._upscale_and_project(src, grid, hyper_in)
        return masks, iou_pred[:, outputs]

    def _upscale_and_project(self, src: torch.Tensor, grid: tuple[int, int], hyper_in: torch.Tensor) -> torch.Tensor:
        """output_upscaling and the hypernetwork product, channels-last: src NxHWxC -> NxMx4hx4w.

        A kernel-2 stride-2 transposed convolution is one matmul per pixel. Everything between the
        two is per pixel too, so the sub-pixel outputs stay where the matmuls put them
        (h, w, dy1, dx1, dy2, dx2) and only the M final channels are reordered into the image.
        """
        n, _, c = src.shape
        h, w = grid
        up1, norm, act1, up2, act2 = self.output_upscaling
        c1, c2 = up1.out_channels, up2.out_channels
        # ConvTranspose weight Cin x Cout x 2 x 2 -> (dy, dx, Cout) x Cin, a linear layer's weight
        w1 = up1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)
        x = self._linear_then(None, src.reshape(-1, c), w1, up1.bias.repeat(4))  # (N*h*w) x (2*2*C1)
        x = act1(F.layer_norm(x.view(-1, c1), (c1,), norm.weight, norm.bias, norm.eps))
        w2 = up2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
        x = self._linear_then(act2, x, w2, up2.bias.repeat(4))  # (N*h*w*4) x (2*2*C2)
        m = hyper_in.shape[1]
        masks = hyper_in @ x.view(n, -1, c2).transpose(1, 2)  # N x M x (h w dy1 dx1 dy2 dx2)
        # into the image's order (h dy1 dy2) x (w dx1 dx2) in two moves of whole runs: one 7-d
        # permutation with 2-element runs costs more than the hypernetwork product
        masks = masks.view(n * m * h, w, 2, 8).transpose(1, 2).contiguous()  # (N M h) dy1 w (dx1 dy2 dx2)
        masks = masks.view(n * m * h * 2, w, 2, 2, 2).permute(0, 3, 1, 2, 4)  # (N M h dy1) dy2 w dx1 dx2
        return masks.reshape(n, m, 4 * h, 4 * w)

    @staticmethod
    def _linear_then(act: nn.Module | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """act(F.linear(x, weight, bias)) (no act: None). On CPU inference in float32 the bias, and an
        exact GELU, are fused into oneDNN's matmul: no separate passes over the output (2x faster at
        the upscaling's second product); else the plain ops (autograd, autocast, CUDA)."""
        fusable = (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and (act is None or (isinstance(act, nn.GELU) and act.approximate == "none"))
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # a private op: absent, the plain ops
        )
        if fusable:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none" if act is None else "gelu", [], "none")
        x = F.linear(x, weight, bias)
        return x if act is None else act(x)

"""Averaging the gradients over ranks once per training step, outside DDP's reducer.

A step runs several backward passes (one per decoder iteration, then the encoder's) under DDP's
`no_sync`; this sends each gradient once, at the end, in buckets of about 25 MB (DDP's default) whose
all-reduces run asynchronously: the decoder's and the prompt encoder's as soon as the last decoder
iteration has left them final, the encoder's each as soon as the encoder's backward pass has
accumulated its last gradient, in bucket order on every rank (collectives must match across ranks).

A parameter that no rank gave a gradient keeps none, as in one process, so that AdamW leaves it alone
(weight decay included); one with a gradient on some ranks only gets the average with zeros for the
others, which is what one process over the global batch computes. Knowing which had none reads one
flag per parameter back to the host per step (several processes only).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

BUCKET_BYTES = 25 * 2**20


@dataclass
class _Sent:
    """An asynchronous all-reduce in flight."""

    params: list[nn.Parameter]
    values: torch.Tensor  # the flat gradients of `params`, or their had-a-gradient flags
    work: "torch.distributed.Work"
    flags: bool = False


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive groups of about `bucket_bytes`."""
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if size >= bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return [b for b in buckets if b]


class GradientAllReduce:
    """One step's all-reduce over `world_size` ranks (nothing to do with one)."""

    def __init__(self, world_size: int, *, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world_size, self.bucket_bytes = world_size, bucket_bytes
        self.sent: list[_Sent] = []

    def send(self, params: list[nn.Parameter]) -> None:
        """All-reduces gradients that are final already."""
        if self.world_size == 1 or not params:
            return
        for bucket in _buckets(params, self.bucket_bytes):
            self._send_bucket(bucket)
        self._send_flags(params)

    @contextmanager
    def during_backward(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Around a backward pass that finishes `params`' gradients: each bucket (built from the last
        parameter back, the order backward reaches them) is sent from the hook of its last gradient's
        accumulation, in bucket order; those without a gradient in this pass go after it."""
        if self.world_size == 1 or not params:
            yield
            return
        buckets = _buckets(list(reversed(params)), self.bucket_bytes)
        bucket_of = {id(p): k for k, bucket in enumerate(buckets) for p in bucket}
        waiting = [{id(p) for p in bucket} for bucket in buckets]
        next_bucket = 0

        def accumulated(p: nn.Parameter) -> None:
            nonlocal next_bucket
            waiting[bucket_of[id(p)]].discard(id(p))
            while next_bucket < len(buckets) and not waiting[next_bucket]:
                self._send_bucket(buckets[next_bucket])
                next_bucket += 1

        handles = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for bucket in buckets[next_bucket:]:
            self._send_bucket(bucket)
        self._send_flags(params)

    def finish(self) -> None:
        """Waits for every all-reduce sent and gives each parameter its averaged gradient (a view into
        its bucket), or none where no rank had one."""
        unused: list[nn.Parameter] = []
        for sent in self.sent:
            sent.work.wait()
            if sent.flags:
                unused += [p for p, n in zip(sent.params, sent.values.tolist()) if n == 0]
                continue
            sent.values.div_(self.world_size)
            for p, part in zip(sent.params, sent.values.split([p.numel() for p in sent.params])):
                p.grad = part.view_as(p)
        for p in unused:
            p.grad = None
        self.sent = []

    def _send_bucket(self, bucket: list[nn.Parameter]) -> None:
        # a parameter without a gradient here contributes zeros: every rank packs the same layout
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in bucket])
        self.sent.append(_Sent(bucket, flat, torch.distributed.all_reduce(flat, async_op=True)))

    def _send_flags(self, params: list[nn.Parameter]) -> None:
        had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32).to(params[0].device)
        self.sent.append(_Sent(params, had, torch.distributed.all_reduce(had, async_op=True), flags=True))

"""The embedded backbones' pre-training loop (BLIP-2, BLIP, the text default): one place for the optimizer, the
schedule and the step, so the three cached defaults are trained the same way."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

import torch
from torch import nn

from ptscale.console import progress

log = logging.getLogger(__name__)


def pretrain_steps(model: nn.Module, next_batch: Callable[[random.Random], dict], steps: int, lr: float, seed: int,
                   desc: str) -> None:
    """``steps`` AdamW steps (betas 0.9 / 0.99, weight decay 0.01, gradients clipped at 1.0) with a linear warm-up
    over the first 5 % and a cosine decay to zero; ``next_batch(rng)`` draws each batch from one ``Random(seed)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    model.train()
    bar = progress(total=steps, desc=desc)
    for step in range(steps):
        loss = model(**next_batch(rng)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 500 == 0 or step == steps - 1:  # for logs without a terminal (the bar is not in them)
            log.debug("%s: step %d/%d loss %.4f", desc, step + 1, steps, loss.item())
    bar.close()
    model.eval()

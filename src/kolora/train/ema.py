"""An exponential moving average of the LoRA weights (`train.ema_decay`), as kohya/SimpleTuner/OneTrainer keep one.

After every optimizer step: ema ← decay · ema + (1 − decay) · weight, in float32, for the trainable tensors only
(a few tens of MB for Kolors' LoRA, never the frozen UNet). Its state travels in the training checkpoint
(Lightning's callback state), so a resumed run's EMA is bit-identical to the uninterrupted one; when the option
is on, the exported LoRA is the EMA. (Lightning has no EMA of its own; torch's AveragedModel would copy the
whole 2.6 B-parameter UNet.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch


class LoraEMA(L.Callback):
    def __init__(self, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.step = 0

    @staticmethod
    def _trainable(pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.shadow:  # a fresh run (a resumed one got its state from the checkpoint already)
            self.shadow = {n: p.detach().float().clone() for n, p in self._trainable(pl_module).items()}
        else:
            self.shadow = {n: self.shadow[n].to(p.device) for n, p in self._trainable(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # a micro-batch of gradient accumulation: no update yet
            return
        self.step = trainer.global_step
        with torch.no_grad():
            for n, p in self._trainable(pl_module).items():
                self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = dict(state["shadow"])

    @contextlib.contextmanager
    def applied(self, pl_module) -> Iterator[None]:
        """The EMA weights in the module's LoRA tensors for the duration (to save them), then the trained ones."""
        params = self._trainable(pl_module)
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

"""The training objective: what step k draws and how its loss is weighted.

Every random draw of step k comes from one generator seeded by (seed, k), in a fixed order: the noise, the
timestep (one per batch, as the tutorial's DiffSynth trainer), then, only when their option is on, the noise
offset and the caption-dropout mask. So with every option off the draws are bit-for-bit the tutorial recipe's,
and with any option on a resumed run still repeats the uninterrupted one.

- noise offset (`train.noise_offset`, crosslabs' "diffusion with offset noise", as kohya and diffusers' SDXL
  script add it): noise += offset · N(0, 1) per sample and channel, so the model learns to shift the mean;
- caption dropout (`train.caption_dropout`): each sample's caption is replaced by the empty caption's
  embedding with this probability (what classifier-free guidance at render time contrasts with);
- min-SNR-γ weighting (`train.min_snr_gamma`, Hang et al. 2023, as in diffusers' train scripts for epsilon
  prediction): each sample's MSE is weighted by min(SNR(t), γ) / SNR(t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 2_654_435_761 + step) % (2**63))


@dataclass
class Draws:
    noise: torch.Tensor  # float32, the latents' shape
    timestep: torch.Tensor  # [1], shared by the batch
    drop: torch.Tensor | None  # [batch] bool: captions replaced by the empty one


def draw(seed: int, step: int, shape: tuple[int, ...], num_timesteps: int, noise_offset: float = 0.0,
         caption_dropout: float = 0.0) -> Draws:
    g = step_generator(seed, step)
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    t = torch.randint(0, num_timesteps, (1,), generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=g, dtype=torch.float32)
    drop = torch.rand(shape[0], generator=g) < caption_dropout if caption_dropout else None
    return Draws(noise, t, drop)


def drop_captions(batch: dict[str, torch.Tensor], drop: torch.Tensor | None, empty_embeds: torch.Tensor | None,
                  empty_pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) with the dropped samples' captions replaced by the empty caption's."""
    embeds, pooled = batch["prompt_embeds"], batch["pooled"]
    if drop is None or not bool(drop.any()):
        return embeds, pooled
    mask = drop.to(embeds.device)
    empty_embeds = empty_embeds.to(embeds.device, embeds.dtype).expand_as(embeds)
    empty_pooled = empty_pooled.to(pooled.device, pooled.dtype).expand_as(pooled)
    return torch.where(mask.view(-1, 1, 1), empty_embeds, embeds), torch.where(mask.view(-1, 1), empty_pooled, pooled)


def loss(pred: torch.Tensor, target: torch.Tensor, alpha_cumprod: torch.Tensor,
         min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE of the epsilon prediction; per-sample min-SNR-γ weights when γ is set. `alpha_cumprod`: ᾱ_t per sample."""
    if not min_snr_gamma:
        return torch.nn.functional.mse_loss(pred.float(), target.float())  # the tutorial's loss, unchanged
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    snr = alpha_cumprod.float() / (1 - alpha_cumprod.float())
    weights = torch.clamp(snr, max=min_snr_gamma) / snr
    return (per_sample * weights).mean()

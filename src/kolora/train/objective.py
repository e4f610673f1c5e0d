"""The training objective: what step k draws and how its loss is weighted.

The draws do not depend on how many processes train. Step k's *global batch* is positions
[k·G, (k+1)·G) of the run's sample sequence (G = world size × train.batch_size × gradient accumulation;
kolora.train.samples), and:
- the timestep is drawn once per global batch (the tutorial's DiffSynth trainer draws one per batch), from a
  generator seeded by (seed, k); with `train.timesteps: per_sample` each sample draws its own instead, as
  diffusers' and kohya's SDXL scripts do (at batch 1 the two are the same recipe, different draws);
- everything per sample — its noise, then, only when their option is on, its noise offset, its
  caption-dropout draw and its timestep — comes from a generator seeded by (seed, the sample's position in the
  sequence), in that order, so turning an option on never changes the draws before it.
So a rank draws exactly its own samples' values, a 2-GPU run and a 1-GPU run with the doubled batch compute the
same update up to the all-reduce's summation order, and a resumed run repeats the uninterrupted one.

- noise offset (`train.noise_offset`, crosslabs' "diffusion with offset noise", as kohya and diffusers' SDXL
  script add it): noise += offset · N(0, 1) per sample and channel, so the model learns to shift the mean;
- caption dropout (`train.caption_dropout`): each sample's caption is replaced by the empty caption's
  embedding with this probability (what classifier-free guidance at render time contrasts with);
- min-SNR-γ weighting (`train.min_snr_gamma`, Hang et al. 2023, as in diffusers' train scripts for epsilon
  prediction): each sample's MSE is weighted by min(SNR(t), γ) / SNR(t);
- loss masks (data.mask, kolora.cache.masks), as kohya's masked loss (and OneTrainer's with unmasked_weight 0
  and normalize_masked_area_loss off): each element's squared error times its latent pixel's mask value
  (broadcast over the channels), averaged over *all* the sample's elements — not renormalized by the mask's
  area, so a sample half masked out weighs half as much —; min-SNR-γ then weighs that per-sample value.
The loss is a mean over the rank's samples; DDP averages the ranks' gradients and Lightning divides by the
accumulation count, so the gradient is the mean over the whole global batch, whatever its split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 2_654_435_761 + step) % (2**63))


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at `position` of the run's sample sequence (distinct from step_generator's
    streams: another multiplier and an offset of 2**40 positions)."""
    return torch.Generator().manual_seed((seed * 1_000_000_007 + 2**40 + position) % (2**63))


@dataclass
class Draws:
    noise: torch.Tensor  # float32, the latents' shape
    timestep: torch.Tensor  # [1] shared by the global batch, or [batch] with per-sample timesteps
    drop: torch.Tensor | None  # [batch] bool: captions replaced by the empty one


def draw(seed: int, step: int, positions: list[int], shape: tuple[int, ...], num_timesteps: int,
         noise_offset: float = 0.0, caption_dropout: float = 0.0, per_sample_timesteps: bool = False) -> Draws:
    """The draws of this rank's samples of step `step`: `positions` are their places in the sample sequence,
    `shape` the batch's latents' shape (one sample per position)."""
    if len(positions) != shape[0]:
        raise ValueError(f"{len(positions)} sample positions for a batch of {shape[0]}")
    noise, drop, timesteps = [], [], []
    for position in positions:
        g = sample_generator(seed, int(position))
        n = torch.randn(shape[1:], generator=g, dtype=torch.float32)
        if noise_offset:
            n = n + noise_offset * torch.randn((shape[1], 1, 1), generator=g, dtype=torch.float32)
        noise.append(n)
        if caption_dropout:
            drop.append(bool(torch.rand(1, generator=g) < caption_dropout))
        if per_sample_timesteps:
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=g))
    t = torch.cat(timesteps) if per_sample_timesteps else \
        torch.randint(0, num_timesteps, (1,), generator=step_generator(seed, step))
    return Draws(torch.stack(noise), t, torch.tensor(drop) if caption_dropout else None)


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
         min_snr_gamma: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the epsilon prediction; per-sample min-SNR-γ weights when γ is set. `alpha_cumprod`: ᾱ_t per sample;
    `mask`: [batch, 1, h, w] weights of the latent pixels (None: all 1, the loss as without masks)."""
    if not min_snr_gamma and mask is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())  # the tutorial's loss, unchanged
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        per_sample = per_sample * mask.to(per_sample.device, per_sample.dtype)
    if not min_snr_gamma:  # every sample has as many elements: the mean of their means
        return per_sample.mean()
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    snr = alpha_cumprod.float() / (1 - alpha_cumprod.float())
    weights = torch.clamp(snr, max=min_snr_gamma) / snr
    return (per_sample * weights).mean()

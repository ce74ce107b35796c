"""Timestep samplers for training: uniform, and importance sampling of L_vlb by the
second moment of each term's recent losses (Improved DDPM §3.3).

Same names and behaviour as the reference's ``resample.py``; ``sample`` draws with
numpy's global RNG as the reference does (or a ``numpy.random.Generator`` you pass).
Works with or without torch.distributed: loss histories are all-gathered when a process
group with more than one rank is initialized, and used as they are otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from .errors import UnknownNameError

SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by name: ``"uniform"`` or ``"loss-second-moment"``."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise UnknownNameError(f"name: expected one of {list(SAMPLER_NAMES)}, got {name!r}")


class ScheduleSampler(ABC):
    """A distribution over timesteps, used for unbiased importance sampling of the
    objective: a term drawn with probability p_t is weighted by 1 / (T·p_t)."""

    @abstractmethod
    def weights(self):
        """A numpy array of positive weights, one per diffusion step (not normalized)."""

    def sample(self, batch_size, device, rng=None):
        """Importance-sample timesteps for a batch.

        :param rng: optional numpy.random.Generator (default: numpy's global RNG).
        :return: (timesteps [batch_size] int64, weights [batch_size] float32) on ``device``.
        """
        w = self.weights()
        p = w / np.sum(w)
        if rng is None:
            indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        else:
            indices_np = rng.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Update the reweighting with this rank's (timesteps, losses).

        Under torch.distributed with several ranks every rank must call this; the
        batches are all-gathered so that every rank keeps the same weights.
        """
        local_ts = local_ts.detach()
        local_losses = local_losses.detach()
        if local_ts.shape != local_losses.shape or local_ts.dim() != 1:
            raise ValueError(
                "local_losses: expected a 1-D tensor of the shape of local_ts "
                f"{tuple(local_ts.shape)}, got {tuple(local_losses.shape)}"
            )
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        batch_sizes = [torch.zeros(1, dtype=torch.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=local_ts.device))
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)
        # Pad every rank's batch to the largest one for all_gather.
        pad_ts = torch.zeros(max_bs, dtype=local_ts.dtype, device=local_ts.device)
        pad_ts[: len(local_ts)] = local_ts
        pad_losses = torch.zeros(max_bs, dtype=local_losses.dtype, device=local_losses.device)
        pad_losses[: len(local_losses)] = local_losses
        timestep_batches = [torch.zeros_like(pad_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros_like(pad_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, pad_ts)
        dist.all_gather(loss_batches, pad_losses)
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the reweighting from every rank's (timestep, loss) pairs; deterministic,
        so all ranks stay identical."""


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ √E[L_t²] over the last ``history_per_term`` losses of each t, mixed with
    ``uniform_prob`` of the uniform distribution; uniform until every t has a full history."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if not 0 <= t < self.diffusion.num_timesteps:
                raise ValueError(f"ts: expected timesteps in [0, {self.diffusion.num_timesteps}), got {t}")
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()

    def state_dict(self) -> dict:
        """The loss history, for checkpoints."""
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict):
        hist = np.asarray(state["loss_history"], dtype=np.float64)
        counts = np.asarray(state["loss_counts"], dtype=np.int64)
        if hist.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"state: expected loss_history {self._loss_history.shape} and loss_counts "
                f"{self._loss_counts.shape}, got {hist.shape} and {counts.shape}"
            )
        self._loss_history = hist.copy()
        self._loss_counts = counts.copy()

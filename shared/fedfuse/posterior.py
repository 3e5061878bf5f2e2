"""The personalized weight posterior, in torch.distributions' vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, LowRankMultivariateNormal, constraints

from fedfuse.decoder import WeightDecoder
from fedfuse.architectures import Architecture


@dataclass
class ReadoutGaussian:
    """``N(loc, factor factor^T + diag(diag))`` over each task's readout entries ``(q, p)``
    (the flat indices ``spec.readout_index``); ``factor`` is ``(q, p, r)``."""

    loc: Tensor
    factor: Tensor
    diag: Tensor

    def distribution(self) -> LowRankMultivariateNormal:
        """As a torch distribution (float64; a readout entry no probe input reaches, such as a
        dead unit's, gets a small floor so that the covariance stays positive definite)."""
        floor = 1e-6 * self.variance.double().mean(-1, keepdim=True).clamp_min(1e-12)
        return LowRankMultivariateNormal(self.loc.double(), self.factor.double(),
                                         self.diag.double().clamp_min(0) + floor)

    @property
    def variance(self) -> Tensor:
        return (self.factor**2).sum(-1) + self.diag

    def latent(self, z: Tensor, eta: Tensor) -> Tensor:
        """Readouts ``loc + factor z + sqrt(diag) eta`` for standard normal ``z`` ``(..., q, r)``
        and ``eta`` ``(..., q, p)``: samples, or the variables a MAP fit optimizes."""
        return self.loc + (self.factor @ z[..., None])[..., 0] + self.diag.sqrt() * eta


@dataclass
class DecodedCodes:
    """The paper's weight-space posterior: decoder outputs under the codes' uncertainty."""

    decoder: WeightDecoder
    base_loc: Tensor
    base_scale: Tensor
    code_loc: Tensor
    code_var: Tensor

    def sample(self, shape: torch.Size, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        q = self.code_loc.shape[0]
        eps0 = torch.randn(*shape, 1, self.base_loc.shape[-1], generator=gen)
        eps = torch.randn(*shape, *self.code_loc.shape, generator=gen)
        base = (self.base_loc + self.base_scale * eps0).expand(*shape, q, -1)
        code = self.code_loc + self.code_var.sqrt() * eps
        return self.decoder(torch.cat([base, code], dim=-1))


class WeightPosterior(Distribution):
    """Posterior over new tasks' weights: batch shape ``(q,)`` tasks, event shape ``(d,)``.

    Where the zoo was fitted in function space (probe inputs, or bare vectors), the hidden
    layers are the decoded features (a point estimate) and the readout is Gaussian: the
    calibrated function-space predictive mapped through the readout solve (``readout``). Without
    probe inputs it is the paper's decoded posterior (decoder noise plus code uncertainty).

    ``mean`` is the initializer; ``uncertainty`` its expected error: the relative function
    error learned from the zoo's leave-one-out errors (for class logits, the expected share of
    inputs it misclassifies; the code variance ratio where there is no function space);
    ``novelty`` in ``[0, 1]`` how far the descriptor sits from the zoo (the
    GP's predictive over prior variance); ``distilled`` whether the slower, distilled path made
    ``mean`` (it travels with the initializer).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, spec: Architecture, mean: Tensor, *, code_loc: Tensor, code_variance: Tensor,
                 uncertainty: Tensor, novelty: Tensor, readout: ReadoutGaussian | None = None,
                 decoded: DecodedCodes | None = None, distilled: bool = False,
                 moment_samples: int = 64, seed: int = 0) -> None:
        if (readout is None) == (decoded is None):
            raise ValueError("a WeightPosterior needs exactly one of readout= or decoded=")
        self.spec = spec
        self._mean = mean.detach()
        self.code_loc, self.code_variance = code_loc.detach(), code_variance.detach()
        self.uncertainty, self.novelty = uncertainty.detach(), novelty.detach()
        self.readout, self._decoded = readout, decoded
        self.distilled = distilled
        self._moments = (moment_samples, seed)
        self._variance: Tensor | None = None
        super().__init__(torch.Size([mean.shape[0]]), torch.Size([spec.num_weights]), validate_args=False)

    def low_confidence(self, threshold: float = 0.5) -> Tensor:
        """Tasks the zoo barely constrains: far from every training descriptor, the initializer
        is the population's, not a personal one."""
        return self.novelty > threshold

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def variance(self) -> Tensor:
        """Zero on the hidden weights of the function-space form (they are a point estimate);
        estimated once from seeded samples in the decoded form."""
        if self._variance is None:
            if self.readout is not None:
                var = torch.zeros_like(self._mean)
                var[:, self.spec.readout_index.flatten()] = self.readout.variance.to(var.dtype)
            else:
                samples, seed = self._moments
                with torch.no_grad():
                    m, v = self._decoded.sample(torch.Size([samples]), torch.Generator().manual_seed(seed))
                var = v.mean(0) + m.var(0)
            self._variance = var
        return self._variance

    def rsample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = torch.Size(sample_shape)
        if self.readout is not None:
            q, p = self.readout.loc.shape
            z = torch.randn(*shape, q, self.readout.factor.shape[-1], generator=generator)
            eta = torch.randn(*shape, q, p, generator=generator)
            out = self._mean.expand(*shape, *self._mean.shape).clone()
            out[..., self.spec.readout_index.flatten()] = self.readout.latent(z, eta).to(out.dtype)
            return out
        m, v = self._decoded.sample(shape, generator)
        return m + v.sqrt() * torch.randn(m.shape, generator=generator)

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def unflatten(self) -> list[dict[str, Tensor]]:
        """The initializers as per-task named tensors (``state_dict``-like)."""
        return [self.spec.unflatten(row) for row in self.mean]

"""The personalized weight posterior, in torch.distributions' vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from fedfuse.decoder import WeightDecoder
from fedfuse.layout import MLPSpec


class WeightPosterior(Distribution):
    """``gamma* = m(w_0, w*) + sqrt(v(w_0, w*)) eps`` with ``w_0 ~ q(w_0)`` and ``w*`` from the
    GP predictive: batch shape ``(q,)`` tasks, event shape ``(d,)`` weights.

    ``mean`` is the decoded weights at the codes' means (the paper's initializer ``gamma*``);
    ``variance`` is the total variance (decoder noise plus code uncertainty, estimated once with
    a fixed number of seeded samples); ``code_variance`` is the GP's own predictive variance and
    ``uncertainty`` its ratio to the prior variance (near 1 far from every training task).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        spec: MLPSpec,
        decoder: WeightDecoder,
        base_loc: Tensor,
        base_scale: Tensor,
        code_loc: Tensor,
        code_var: Tensor,
        prior_code_var: Tensor | None = None,
        moment_samples: int = 64,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self._decoder = decoder
        self._base = (base_loc.detach(), base_scale.detach())
        self.code_loc, self.code_variance = code_loc.detach(), code_var.detach()
        prior = code_var.new_ones(code_var.shape[-1]) if prior_code_var is None else prior_code_var
        # 0: the descriptor sits among training tasks; 1: the GP has nothing to say about it
        self.uncertainty = (self.code_variance / prior.detach()).mean(-1).clamp(0, 1)
        q = code_loc.shape[0]
        super().__init__(torch.Size([q]), torch.Size([spec.num_weights]), validate_args=False)
        self._moments = (moment_samples, seed)
        self._variance: Tensor | None = None
        with torch.no_grad():
            self._mean, _ = decoder(self._codes(base_loc.expand(q, -1), code_loc))

    def _codes(self, base: Tensor, code: Tensor) -> Tensor:
        return torch.cat([base, code], dim=-1)

    def _decode_samples(self, shape: torch.Size, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        q = self.code_loc.shape[0]
        loc, scale = self._base
        eps0 = torch.randn(*shape, 1, loc.shape[-1], generator=gen)
        eps = torch.randn(*shape, *self.code_loc.shape, generator=gen)
        base = (loc + scale * eps0).expand(*shape, q, -1)
        code = self.code_loc + self.code_variance.sqrt() * eps
        return self._decoder(self._codes(base, code))

    def low_confidence(self, threshold: float = 0.5) -> Tensor:
        """Tasks whose code the GP barely constrains: far from every training descriptor, the
        initializer is the population's, not a personal one."""
        return self.uncertainty > threshold

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def variance(self) -> Tensor:
        """Estimated on first use, so that asking only for the initializer stays fast."""
        if self._variance is None:
            samples, seed = self._moments
            with torch.no_grad():
                m, v = self._decode_samples(torch.Size([samples]), torch.Generator().manual_seed(seed))
            self._variance = v.mean(0) + m.var(0)
        return self._variance

    def rsample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        m, v = self._decode_samples(torch.Size(sample_shape), generator)
        return m + v.sqrt() * torch.randn(m.shape, generator=generator)

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def unflatten(self) -> list[list[Tensor]]:
        """The initializers as per-task lists of layer tensors."""
        return [self.spec.unflatten(row) for row in self.mean]

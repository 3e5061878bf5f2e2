"""The app's run config (``[tool.flwr.app.config]``): one typed place for keys and defaults.

Flower hands both apps ``context.run_config`` (kebab-case keys); tests that drive the apps
without ``flwr run`` pass overrides instead. A test keeps pyproject's section equal to these
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from fedfuse.errors import FedfuseError

PHASES = ("collect", "fit", "personalize")


@dataclass(frozen=True)
class RunConfig:
    phase: str = "collect,fit,personalize"  # any comma-separated subset of PHASES, in order
    store: str = "runs/store"  # the server's model store (relative paths resolve from cwd)
    family: str = "sine"  # a registered task family or "package.module:object"
    num_clients: int = 20  # simulated devices that train and upload a model
    num_new: int = 5  # simulated new devices that only get personalized
    seed: int = 0
    shots: int = 10  # a new device's examples (per class for classification families)
    train_steps: int = 0  # a zoo device's local training steps (0: the family's recipe)
    finetune_steps: int = 0  # the cold-start baseline's steps (0: the family's recipe)
    finetune_lr: float = 0.0  # and its learning rate (0: the family's recipe)
    quorum: float = 0.8  # fraction of the contacted devices whose valid upload a round needs
    wait_for_nodes: float = 120.0  # seconds to wait for the expected devices to connect
    round_timeout: float = 600.0  # seconds to wait for replies in one exchange
    fit_rounds: int = 0  # meta-model rounds (0: the family's setting)
    fit_steps: int = 0  # Adam steps per round (0: the family's setting)
    fit_mode: str = "full"  # "incremental": fit new and replaced uploads into the stored fit
    # the distilled path's training steps (-1: chosen on the zoo, which trains up to 1,000 steps of
    # up to 32 held-out models: minutes for a CNN zoo; 0: a fit that never serves distilled starts)
    distill_steps: int = -1
    parallel: str = "auto"  # "auto" (Ray for large zoos), "ray" or "serial"
    # torch threads of the ServerApp (0: torch's default, one per core). The fit's many small ops
    # spin across threads: a 20-model fit took 586 s on 2 threads, 18 s on 1 (loaded 2-core machine)
    server_threads: int = 1
    screen: float = 10.0  # robust z-score above which a model is excluded as an outlier (0: off)
    initializer_url: str = ""  # new devices fetch their initializer from this service (fedfuse serve) instead
    distill: bool = False  # new devices get the slower, distilled initializer (MetaModel.personalize)

    def __post_init__(self) -> None:
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise FedfuseError(f"phase {self.phase!r}: use a comma-separated subset of {PHASES}")
        if self.fit_mode not in ("full", "incremental"):
            raise FedfuseError(f"fit-mode={self.fit_mode!r}: use 'full' or 'incremental'")
        if self.parallel not in ("auto", "ray", "serial"):
            raise FedfuseError(f"parallel={self.parallel!r}: use 'auto', 'ray' or 'serial'")
        if self.server_threads < 0:
            raise FedfuseError(f"server-threads={self.server_threads}: use 0 (torch's default) or more")
        if self.distill_steps < -1:
            raise FedfuseError(f"distill-steps={self.distill_steps}: use -1 (chosen on the zoo), 0 or more")
        if not 0.0 < self.quorum <= 1.0:
            raise FedfuseError(f"quorum={self.quorum}: use a fraction in (0, 1]")

    @property
    def phases(self) -> list[str]:
        return [p.strip() for p in self.phase.split(",") if p.strip()]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> "RunConfig":
        """Build from Flower's kebab-case run config; unknown keys are an error, not ignored."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in {**dict(run_config), **{k.replace("_", "-"): v for k, v in overrides.items()}}.items():
            if key not in known:
                raise FedfuseError(f"unknown run-config key {key!r}; known keys: {sorted(known)}")
            f = known[key]
            typ = {"int": int, "float": float, "str": str, "bool": bool}[
                f.type if isinstance(f.type, str) else f.type.__name__]
            if typ is bool and not isinstance(value, bool):  # bool("false") is True: take TOML's booleans only
                raise FedfuseError(f"run-config key {key!r} must be true or false, got {value!r}")
            try:
                values[f.name] = typ(value)
            except (TypeError, ValueError) as exc:
                raise FedfuseError(f"run-config key {key!r} must be {typ.__name__}, got {value!r}") from exc
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

"""Exceptions with messages that tell the user what was wrong and how to fix it."""


class FedfuseError(ValueError):
    """Base class: bad input that fedfuse refuses rather than silently mishandles."""


class ArchitectureError(FedfuseError):
    """Weights that do not match the architecture they claim, or a malformed architecture."""


class ZooError(FedfuseError):
    """A model zoo that cannot be fitted: mismatched models, non-finite weights, bad metadata."""


class DescriptorError(FedfuseError):
    """A task descriptor of the wrong length or with non-finite entries."""


class MessageRejected(FedfuseError):
    """A device's message the server (or a server's message the device) refuses; says why."""


class NotFittedError(FedfuseError, AttributeError):
    """A meta-model used before ``fit`` (same contract as scikit-learn's)."""


class FedfuseFailure(Exception):
    """Base class of failures that are not the caller's bad input (storage, quorum, deployment):
    deliberately not a ValueError, so that no handler of bad input swallows them."""


class StoreError(FedfuseFailure):
    """The model store's folder or index could not be read or written; the message names the path."""


class QuorumError(FedfuseFailure):
    """Too few devices answered a round with a valid reply for it to count."""


class DeploymentError(FedfuseFailure):
    """A deployment's process did not start, stay healthy or answer (the message names its log)."""

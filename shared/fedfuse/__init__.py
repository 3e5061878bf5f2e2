"""fedfuse core: fuse independently trained models into personalized initializers.

Math and formats; neither Flower nor Ray is imported here, except by ``fedfuse.records``
(the mapping of protocol payloads to Flower records, which only the apps import).
"""

from fedfuse.architectures import Architecture, MLPSpec, ModuleSpec, VectorSpec
from fedfuse.errors import (ArchitectureError, DescriptorError, FedfuseError, FedfuseFailure,
                            MessageRejected, NotFittedError, StoreError, ZooError)
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.pic import SparseLocalizedGP
from fedfuse.posterior import WeightPosterior
from fedfuse.zoo import ModelZoo

__all__ = [
    "ArchitectureError", "DescriptorError", "FedfuseError", "FedfuseFailure", "MessageRejected",
    "NotFittedError", "StoreError", "ZooError", "Architecture", "MLPSpec", "ModuleSpec", "VectorSpec",
    "MetaModel", "ParallelMap", "serial_map", "SparseLocalizedGP", "WeightPosterior",
    "ModelZoo",
]
__version__ = "0.1.0"

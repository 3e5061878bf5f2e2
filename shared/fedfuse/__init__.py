"""fedfuse core: fuse independently trained models into personalized initializers.

Math and formats only; neither Flower nor Ray is imported here.
"""

from fedfuse.errors import (ArchitectureError, DescriptorError, FedfuseError, FedfuseFailure,
                            NotFittedError, StoreError, ZooError)
from fedfuse.layout import MLPSpec
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.pic import SparseLocalizedGP
from fedfuse.posterior import WeightPosterior
from fedfuse.zoo import ModelZoo

__all__ = [
    "ArchitectureError", "DescriptorError", "FedfuseError", "FedfuseFailure", "NotFittedError",
    "StoreError", "ZooError",
    "MLPSpec", "MetaModel", "ParallelMap", "serial_map", "SparseLocalizedGP", "WeightPosterior",
    "ModelZoo",
]
__version__ = "0.1.0"

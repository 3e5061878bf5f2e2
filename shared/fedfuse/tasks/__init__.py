"""Task families: a task's architecture, descriptor, devices, training, probe and score.

Registered: ``sine``, ``mnist``, ``mnist-cnn`` and ``movielens``; a user's own family is given
as ``"package.module:object"`` (see :mod:`fedfuse.tasks.family`).
"""

from fedfuse.tasks.family import (DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily,
                                  get_family, register, registered)
from fedfuse.tasks.mnist import MnistCnnFamily, MnistFamily
from fedfuse.tasks.movielens import MovieLensFamily
from fedfuse.tasks.sine import SineFamily

for _family in (SineFamily, MnistFamily, MnistCnnFamily, MovieLensFamily):
    register(_family.name, _family)

__all__ = ["DescriptorSpec", "DeviceConfig", "LocalData", "Recipe", "Score", "TaskFamily", "get_family",
           "register", "registered"]

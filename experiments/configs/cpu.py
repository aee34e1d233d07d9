"""A CPU-sized run: full Fashion-MNIST, 5 coarse primary classes, the small CNN, 10 epochs.

Reads the IDX archives from ``--config.data_dir`` (e.g. ../shared/data/fashion_mnist) when given.
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.dataset = "fashion_mnist_coarse"
    c.primary_level = 0
    c.arch = "small"
    c.width = 16
    c.epochs = 10
    c.decay_every = 50
    c.augment = False
    c.last_k = 3
    return c

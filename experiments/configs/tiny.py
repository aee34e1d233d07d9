"""A seconds-long run for tests and smoke checks: a tiny CNN, a few steps per epoch."""

from experiments.configs import cpu


def get_config():
    c = cpu.get_config()
    c.width = 4
    c.batch_size = 16
    c.eval_batch_size = 64
    c.epochs = 2
    c.max_steps_per_epoch = 3
    c.last_k = 2
    return c

"""A seconds-long run for tests and smoke checks: a tiny CNN, a few steps per epoch, and every
method's meta step often enough to run in an epoch of three steps."""

from experiments.configs import cpu


def get_config():
    c = cpu.get_config()
    c.width = 4
    c.batch_size = 16
    c.eval_batch_size = 64
    c.epochs = 2
    c.max_steps_per_epoch = 3
    c.last_k = 2
    for name in ("auxilearn", "auxilearn_generate", "dtg", "maoal", "maoal_generate"):
        c[name].every = 1
        c[name].held_out_fraction = 0.25
    c.olaux.every = 2
    return c

"""MAXL on CIFAR (and Fashion-MNIST): ``python -m experiments.cifar --xla --workdir runs/maxl``.

Thin glue: flags in, ``maxl_jax.train.train_and_evaluate`` out. Examples::

    python -m experiments.cifar --xla --workdir runs/maxl                         # the reference run
    python -m experiments.cifar --xla --method=single --workdir runs/single
    python -m experiments.cifar --xla --config=experiments/configs/cpu.py \\
        --config.data_dir=../shared/data/fashion_mnist --workdir runs/fmnist
"""

from absl import app, flags, logging
from ml_collections import config_flags

from maxl_jax import steps, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Config file; fields overridable as --config.x=y.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Run directory: checkpoints, metrics.jsonl, summary.json, plot. "
                               "An existing one is resumed.")
_XLA = flags.DEFINE_bool("xla", True, "Compile the steps with XLA across all local devices "
                         "(--noxla runs the same code op by op, for debugging).")
_METHOD = flags.DEFINE_enum("method", None, steps.METHODS, "Overrides config.method.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _METHOD.value:
        config.method = _METHOD.value
    summary = train.train_and_evaluate(config, _WORKDIR.value, xla=_XLA.value,
                                       progress=_PROGRESS.value)
    print(f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
          f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), mean of last "
          f"{summary['last_k']} {summary['last_k_mean_test_accuracy']:.4f}; "
          f"{summary['wall_time_s']:.0f} s. Results in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)

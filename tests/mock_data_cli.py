"""``python -m experiments.cifar`` on TFDS's generated mock data (no download, no shared data):
``python tests/mock_data_cli.py [the entry point's flags]``. The mock examples are generated from
the dataset's features with a fixed seed, so every process sees the same data. Used by the tests
that run the command line end to end in a subprocess. (Importing this module defines no flags.)"""

import os
import pathlib
import sys

NUM_EXAMPLES = int(os.environ.get("MAXL_MOCK_EXAMPLES", "64"))

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import tensorflow_datasets as tfds
    from absl import app

    from experiments import cifar

    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        app.run(cifar.main)

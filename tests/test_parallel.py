"""Data parallelism: 8 devices give the 1-device result; steps compile once; bad batches fail early."""

import json
import pathlib
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxl_jax import methods, models, parallel, steps
from maxl_jax.methods import AuxTask
from maxl_jax.methods.equal import Random
from maxl_jax.methods.maxl import Maxl

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def multidevice(tmp_path_factory):
    """The result of tests/multidevice_check.py with 8 fake CPU devices (JAX's device count is fixed
    at start), run once per session in the background (started by tests/conftest.py when the session
    collected a test that needs it)."""
    from conftest import multidevice_folder, start_multidevice_check
    folder = multidevice_folder(tmp_path_factory)
    start_multidevice_check(folder)  # already started, unless this test was collected alone
    deadline = time.time() + 1800
    while not (folder / "multidevice.rc").exists():
        assert time.time() < deadline, "tests/multidevice_check.py did not finish in 30 minutes"
        time.sleep(1)
    rc = int((folder / "multidevice.rc").read_text())
    assert rc == 0, (folder / "multidevice.err").read_text()[-3000:]
    return json.loads((folder / "multidevice.out").read_text().strip().splitlines()[-1])


def test_train_and_meta_step_on_8_devices_equal_1_device(multidevice):
    assert multidevice["update_norm"] > 1e-4  # the steps really changed the state
    assert multidevice["jit_8_devices"] < 1e-6


def test_shard_map_with_axis_name_equals_1_device(multidevice):
    assert multidevice["shard_map_8_devices"] < 1e-6


def test_meta_gradient_inside_shard_map_equals_1_device(multidevice):
    assert multidevice["meta_gradient_norm"] > 1e-6
    assert multidevice["meta_gradient_shard_map"] < 1e-6


@pytest.mark.parametrize("name", methods.names())
def test_every_methods_steps_on_8_devices_equal_1_device_on_a_batch_they_do_not_divide(
        multidevice, name):
    """30 examples on 8 devices, padded to 32 and masked (losses, BatchNorm statistics, the
    meta-gradient), against the same 30 on one device: a training and a meta step."""
    result = multidevice["methods"][name]
    assert result["update_norm"] > 1e-4  # the steps changed the state
    assert result["rel_diff"] < 1e-5, result


def test_twelve_examples_on_8_devices_equal_1_device_evaluation_included(multidevice):
    assert multidevice["padded_12_on_8_devices"] < 1e-5


PSI = (2, 2)


def tiny_trainer(method="maxl"):
    mt, gen = models.make_networks("small", 2, 4, 4, width=2, head_width=8)
    f_opt, g_opt, inner = steps.reference_optimizers(5)
    if method == "random":
        return Random(multitask=mt, multitask_optimizer=f_opt,
                      aux_tasks=(AuxTask("random", PSI),), weights=(1.0,))
    return Maxl(multitask=mt, multitask_optimizer=f_opt, generator=gen, psi=PSI,
                generator_optimizer=g_opt, inner_lr=inner)


def make_batch(seed, n=8, aux=False):
    rng = np.random.default_rng(seed)
    batch = {"image": jnp.asarray(rng.normal(size=(n, 12, 12, 1)), jnp.float32),
             "primary": jnp.asarray(rng.integers(0, 2, n), jnp.int32)}
    if aux:
        batch["aux"] = batch["primary"] * 2
    return batch


def test_steps_trace_once_across_repeated_calls():
    trainer = tiny_trainer()
    theta1 = chex.assert_max_traces(trainer.train_step, n=1)
    theta2 = chex.assert_max_traces(trainer.meta_step, n=1)
    j1, j2 = jax.jit(theta1, donate_argnums=0), jax.jit(theta2, donate_argnums=0)
    state = trainer.init(jax.random.PRNGKey(0), (12, 12, 1))
    for seed in range(3):  # new data, new step counters and learning rates: no retrace
        state, _ = j1(state, make_batch(seed))
        state, _ = j2(state, {"train": make_batch(seed + 10)})
    assert int(state.step) == 3 and int(state.meta_step) == 3


@pytest.mark.parametrize("batch, match", [
    ({"image": jnp.zeros((8, 12, 12, 3)), "primary": jnp.zeros(8, jnp.int32)},
     r"has shape \(8, 12, 12, 3\); expected \(batch, 12, 12, 1\)"),
    ({"image": jnp.zeros((8, 12, 12)), "primary": jnp.zeros(8, jnp.int32)}, "expected"),
    ({"image": jnp.zeros((8, 12, 12, 1), jnp.uint8), "primary": jnp.zeros(8, jnp.int32)},
     "dtype uint8; expected float"),
    ({"image": jnp.zeros((8, 12, 12, 1)), "primary": jnp.zeros(8)}, "expected integer labels"),
    ({"image": jnp.zeros((8, 12, 12, 1)), "primary": jnp.zeros(7, jnp.int32)},
     r"expected integer labels of shape \(8,\)"),
    ({"image": jnp.zeros((8, 12, 12, 1))}, "missing 'primary'"),
])
def test_bad_batches_raise_a_clear_error(batch, match):
    compiled = parallel.DataParallelSteps(tiny_trainer(), (12, 12, 1))
    state = compiled.place_state(tiny_trainer().init(jax.random.PRNGKey(0), (12, 12, 1)))
    with pytest.raises(ValueError, match=match):
        compiled.train_step(state, batch)


def test_human_and_random_batches_need_aux_labels():
    trainer = tiny_trainer("random")
    compiled = parallel.DataParallelSteps(trainer, (12, 12, 1))
    state = compiled.place_state(trainer.init(jax.random.PRNGKey(0), (12, 12, 1)))
    with pytest.raises(ValueError, match="missing 'aux'"):
        compiled.train_step(state, make_batch(0))
    state, metrics = compiled.train_step(state, make_batch(0, aux=True))
    assert np.isfinite(float(metrics["auxiliary_loss"])) and float(metrics["auxiliary_loss"]) > 0


def test_batch_size_check_names_the_fix():
    parallel.check_batch_size(16, 8)
    with pytest.raises(ValueError, match="batch size 100 is not divisible by the 8 devices"):
        parallel.check_batch_size(100, 8)

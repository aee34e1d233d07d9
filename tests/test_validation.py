"""Library entry points refuse bad inputs before compiling, with messages naming the argument."""

import jax
import numpy as np
import pytest

from maxl_jax import make_networks, generator_meta_gradient, parallel, steps, train, validation
from maxl_jax.methods import AuxTask
from maxl_jax.methods.equal import Human

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_validation")

PSI = [5] * 4


@pytest.fixture(scope="module")
def nets():
    mt, gen = make_networks("small", 4, 20, 20, width=2)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    f = jax.jit(mt.init, static_argnums=2)(jax.random.PRNGKey(0), x, False)
    g = jax.jit(gen.init, static_argnums=2)(jax.random.PRNGKey(1), x, False)
    return mt, gen, f, g, x


@pytest.mark.parametrize("labels, match", [
    ([0, 1, 2, 4], r"y \(primary labels\)\[3\] = 4 is outside \[0, 4\)"),
    ([0, 1, -1, 2], r"y \(primary labels\)\[2\] = -1 is outside \[0, 4\)"),
    ([99, 1, 2, 3], r"y \(primary labels\)\[0\] = 99 is outside"),
    ([0.0, 1.0, 2.0, 3.0], "expected integer class labels"),
    ([0, 1, 2], r"has shape \(3,\); expected \(4,\)"),
])
def test_meta_gradient_refuses_out_of_range_or_malformed_labels(nets, labels, match):
    mt, gen, f, g, x = nets
    with pytest.raises(ValueError, match=match):
        generator_meta_gradient(mt, gen, f, g, x, np.asarray(labels), PSI)


def test_meta_gradient_refuses_uint8_images_and_a_psi_that_does_not_fit(nets):
    mt, gen, f, g, x = nets
    y = np.arange(4)
    with pytest.raises(ValueError, match="x \\(images\\) has dtype uint8; expected float images"):
        generator_meta_gradient(mt, gen, f, g, (x * 0).astype(np.uint8), y, PSI)
    with pytest.raises(ValueError, match="psi has 3 entries but the multi-task network has 4"):
        generator_meta_gradient(mt, gen, f, g, x, y, [5] * 3)
    with pytest.raises(ValueError, match="auxiliary head has 20 outputs but psi needs sum"):
        generator_meta_gradient(mt, gen, f, g, x, y, [4] * 4)


def test_inside_jit_the_static_checks_run_and_validate_false_skips_them(nets):
    mt, gen, f, g, x = nets
    y = np.arange(4)
    r = jax.jit(lambda x, y: generator_meta_gradient(mt, gen, f, g, x, y, PSI).meta_loss)(x, y)
    assert np.isfinite(float(r))
    with pytest.raises(ValueError, match="expected integer class labels"):
        jax.jit(lambda x, y: generator_meta_gradient(mt, gen, f, g, x, y, PSI).meta_loss)(x, y * 1.0)
    r = jax.jit(lambda x, y: generator_meta_gradient(mt, gen, f, g, x, y, PSI,
                                                     validate=False).meta_loss)(x, y)
    assert np.isfinite(float(r))


def test_the_old_name_meta_gradient_warns_and_gives_generator_meta_gradient(nets):
    """``maxl_jax.meta_gradient`` (renamed: ``maxl_jax.meta.meta_gradient`` is the estimators')
    still works, with a DeprecationWarning naming the new name, and returns the same result."""
    import maxl_jax

    mt, gen, f, g, x = nets
    y = np.arange(4)
    new = jax.jit(lambda x, y: generator_meta_gradient(mt, gen, f, g, x, y, PSI).grad)(x, y)
    with pytest.warns(DeprecationWarning, match="maxl_jax.generator_meta_gradient"):
        old = jax.jit(lambda x, y: maxl_jax.meta_gradient(mt, gen, f, g, x, y, PSI).grad)(x, y)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(AttributeError, match="moved to maxl_jax.config_checks.validate_config"):
        validation.validate_config


def test_data_parallel_steps_refuse_labels_outside_their_class_or_block():
    mt, _ = make_networks("small", 2, 5, 5, width=2)
    method = Human(multitask=mt, multitask_optimizer=steps.reference_optimizers(5)[0],
                   aux_tasks=(AuxTask("human", (2, 3)),), weights=(1.0,))
    compiled = parallel.DataParallelSteps(method, (8, 8, 1))
    state = compiled.place_state(method.init(jax.random.PRNGKey(0), (8, 8, 1)))
    image = np.zeros((4, 8, 8, 1), np.float32)
    primary = np.array([0, 1, 1, 0], np.int32)
    with pytest.raises(ValueError, match=r"batch\['primary'\]\[1\] = 7 is outside \[0, 2\)"):
        compiled.train_step(state, {"image": image, "primary": np.array([0, 7, 1, 0], np.int32),
                                    "aux": np.array([0, 2, 3, 1], np.int32)})
    # Auxiliary class 1 belongs to primary class 0 (block [0, 2)), not to class 1 (block [2, 5)).
    with pytest.raises(ValueError, match=r"batch\['aux'\]\[1, 0\] = 1 is outside the auxiliary "
                                         r"block \[2, 5\) of its primary class 1"):
        compiled.train_step(state, {"image": image, "primary": primary,
                                    "aux": np.array([0, 1, 3, 1], np.int32)})
    with pytest.raises(ValueError, match=r"batch\['aux'\] has 2 column\(s\) but the method has 1"):
        compiled.train_step(state, {"image": image, "primary": primary,
                                    "aux": np.zeros((4, 2), np.int32)})
    state, metrics = compiled.train_step(state, {"image": image, "primary": primary,
                                                 "aux": np.array([0, 2, 4, 1], np.int32)})
    assert np.isfinite(float(metrics["loss"]))


def test_a_damaged_line_inside_metrics_jsonl_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1, "tr\n{"epoch": 2}\n')
    with pytest.raises(validation.ConfigError, match=f"{path} line 2 is not a JSON record"):
        train._read_records(path, keep_before=5)
    path.write_text('{"epoch": 0}\n{"epoch": 1, "tr')  # a torn last line is a cut write: dropped
    assert train._read_records(path, keep_before=5) == [{"epoch": 0}]


@pytest.mark.parametrize("text, match", [
    ('{"epoch": 0}\n{"epoch": 2}\n{"epoch": 1}\n{"epoch": 3}\n',
     r"line 3 holds epoch 2 after line 2's epoch 3: the records are out of order"),
    ('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 1}\n', r"line 3 repeats epoch 2"),
    ('{"epoch": 0}\n{"train": {}}\n{"epoch": 1}\n', r"line 2 has no epoch number"),
])
def test_swapped_or_repeated_records_in_metrics_jsonl_are_named(tmp_path, text, match):
    """Two swapped lines, or a repeated one, would make a resume duplicate an epoch's record and
    the summary count too many epochs: they are refused, naming the line, before anything runs."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(validation.ConfigError, match=match):
        train._read_records(path, keep_before=2)
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    assert train._read_records(path, keep_before=2) == [{"epoch": 0}, {"epoch": 1}]

"""Networks: reference parameter counts and initialisation, shapes, BatchNorm as PyTorch computes it."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxl_jax import models


def shapes(module, image_shape):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              jnp.zeros((2, *image_shape)), False))


def test_vgg16_parameter_counts_equal_the_reference():
    multitask, generator = models.make_networks("vgg16", 20, 100, 100)
    assert models.count_params(shapes(multitask, (32, 32, 3))["params"]) == 15_310_008
    assert models.count_params(shapes(generator, (32, 32, 3))["params"]) == 15_037_092


def test_vgg16_structure_13_convs_and_heads():
    multitask, _ = models.make_networks("vgg16", 20, 100, 100)
    p = shapes(multitask, (32, 32, 3))["params"]
    convs = sorted(k for k in p["backbone"] if k.startswith("conv_"))
    assert len(convs) == 13
    assert p["backbone"]["conv_12"]["kernel"].shape == (3, 3, 512, 512)
    assert p["primary_head"]["out"]["kernel"].shape == (512, 20)
    assert p["auxiliary_head"]["out"]["kernel"].shape == (512, 100)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_small_cnn_accepts_fashion_mnist_and_cifar_images(image_shape):
    multitask, generator = models.make_networks("small", 5, 10, 10, width=4)
    x = jnp.ones((3, *image_shape))
    f_vars = jax.jit(multitask.init, static_argnums=2)(jax.random.PRNGKey(0), x, False)
    g_vars = jax.jit(generator.init, static_argnums=2)(jax.random.PRNGKey(1), x, False)
    primary, aux = jax.jit(multitask.apply, static_argnums=2)(f_vars, x, False)
    assert primary.shape == (3, 5) and aux.shape == (3, 10)
    assert generator.apply(g_vars, x, False).shape == (3, 10)


def test_reference_initialisation_xavier_uniform_in_f_and_normal_in_g():
    multitask, generator = models.make_networks("vgg16", 20, 100, 100)
    x = jnp.zeros((1, 32, 32, 3))
    f = jax.jit(multitask.init, static_argnums=2)(jax.random.PRNGKey(0), x, False)["params"]
    g = jax.jit(generator.init, static_argnums=2)(jax.random.PRNGKey(1), x, False)["params"]
    kf = np.asarray(f["backbone"]["conv_3"]["kernel"])     # 3x3x128x128: fan_in = fan_out = 1152
    kg = np.asarray(g["backbone"]["conv_3"]["kernel"])
    bound = np.sqrt(6.0 / (1152 + 1152))
    assert np.abs(kf).max() <= bound and np.abs(kf).max() > 0.99 * bound   # uniform(-b, b)
    np.testing.assert_allclose(kf.std(), bound / np.sqrt(3), rtol=0.02)
    np.testing.assert_allclose(kg.std(), np.sqrt(2.0 / 2304), rtol=0.02)  # plain normal
    assert np.abs(kg).max() > 3.5 * kg.std()                               # not truncated
    for tree in (f, g):
        assert all(np.all(np.asarray(leaf) == 0) for path, leaf in
                   jax.tree_util.tree_leaves_with_path(tree) if path[-1].key == "bias")
        assert np.all(np.asarray(tree["backbone"]["bn_0"]["scale"]) == 1)


def test_batchnorm_matches_pytorch_statistics():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 3, 2)) * 2.0 + 1.0, jnp.float32)
    bn = models.BatchNorm()
    v = bn.init(jax.random.PRNGKey(1), x, False)
    y, upd = bn.apply(v, x, True, mutable=["batch_stats"])
    xs = np.asarray(x).reshape(-1, 2)
    mean, var = xs.mean(0), xs.var(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), (xs - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-5)
    # PyTorch: running = 0.9 * running + 0.1 * batch, with the unbiased variance (n / (n - 1)).
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]),
                               0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
    # Eval mode uses the running statistics.
    y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, False)
    rs = upd["batch_stats"]
    np.testing.assert_allclose(np.asarray(y_eval), (np.asarray(x) - np.asarray(rs["mean"]))
                               / np.sqrt(np.asarray(rs["var"]) + 1e-5), rtol=1e-4, atol=1e-5)


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        models.make_networks("resnet", 2, 2, 2)


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 5, 3)])  # even, and odd (trailing row dropped)
def test_max_pool_2x2_equals_flax_max_pool_forward_and_gradient_after_relu(shape):
    """The reshape max-pool gives nn.max_pool's output bit for bit, and, after a ReLU (as in the
    backbone), the same gradient w.r.t. the pre-activations and the same second derivative
    (Hessian-vector product), although ~70% of the inputs are ReLU zeros: tied windows of zeros
    exist, and their pre-activations get no gradient either way."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=shape) - 0.5, jnp.float32)  # ~70% ReLU zeros
    v = jnp.asarray(rng.normal(size=shape), jnp.float32)
    flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(models.max_pool_2x2(z), flax_pool(z))
    relu_z = jax.nn.relu(z)
    tied_zero_windows = np.sum(np.all(np.asarray(
        relu_z[:, :shape[1] // 2 * 2, :shape[2] // 2 * 2]).reshape(
        shape[0], shape[1] // 2, 2, shape[2] // 2, 2, shape[3]) == 0, axis=(2, 4)))
    assert tied_zero_windows > 0, "the instance must contain tied windows to test them"

    def loss(pool, z):
        return jnp.sum(jnp.sin(3.0 * pool(jax.nn.relu(z))))

    for pool in (models.max_pool_2x2, flax_pool):
        assert loss(pool, z).shape == ()
    g_ours, g_flax = (jax.grad(lambda z: loss(p, z))(z) for p in (models.max_pool_2x2, flax_pool))
    np.testing.assert_array_equal(g_ours, g_flax)
    assert np.count_nonzero(np.asarray(g_ours)) > 0
    hvp = lambda p: jax.jvp(jax.grad(lambda z: loss(p, z)), (z,), (v,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(models.max_pool_2x2), hvp(flax_pool), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,name", [(dict(num_primary=0), "num_primary=0"),
                                         (dict(num_auxiliary=-1), "num_auxiliary=-1"),
                                         (dict(generator_classes=2.5), "generator_classes=2.5")])
def test_make_networks_refuses_impossible_class_counts(kwargs, name):
    """A head of no primary classes, or of a negative or fractional size, is a ValueError naming
    the argument, not a Flax error at init."""
    from maxl_jax import make_networks

    args = dict(num_primary=4, num_auxiliary=20, generator_classes=20) | kwargs
    with pytest.raises(ValueError, match=f"make_networks: {re.escape(name)} must be an integer"):
        make_networks("small", **args)

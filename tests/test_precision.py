"""Mixed precision (``--config.dtype``, ``maxl_jax/precision.py``): the networks compute in bfloat16
or float16 while parameters, optimizer states, losses and the meta-gradient stay float32.

Tolerance of the bfloat16 meta-gradient against float32. bfloat16 keeps 8 significant bits: each
rounding has a relative error of at most 2^-9 (unit roundoff; 2^-8 is the spacing, "epsilon").
MAXL's meta-gradient is a chain of roughly 30 rounded stages in series on this network: the forward
of f (3 convolutions, 3 BatchNorm outputs, 2 dense layers per head), its backward, the
differentiated inner update (the backward of that backward, about as many again) and the generator's
forward and backward (about 10 more). In the worst case relative errors add linearly: 30 x 2^-8 =
0.12; so we require a relative norm error ``|g_bf16 - g_f32| / |g_f32| < 0.15`` and, for the
direction, which is what the generator's SGD step uses, a cosine similarity above ``1 - 0.15^2``
(an error of relative size r orthogonal to g leaves cosine ``1 / sqrt(1 + r^2) ~= 1 - r^2 / 2``;
we allow twice that). Measured on this test's network and batch: relative error 0.021, cosine
0.9998 (float16, 11 significant bits: 0.0026). It must differ from float32 at all: a dtype that is ignored would give exactly the float32
numbers (the jaxpr test checks the same directly).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxl_jax import maxl, methods, models, precision, train
from maxl_jax.methods.maxl import Maxl

ROOT = pathlib.Path(__file__).resolve().parents[1]
PSI = (2, 2)
IMAGE = (8, 8, 1)  # the small CNN pools 8x8 -> 1x1 then averages: the cheapest valid input


def tiny_networks(dtype, loss_scale=None):
    return models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=2, head_width=4,
                                dtype=dtype, loss_scale=loss_scale)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, *IMAGE)).astype(np.float32)),
            "primary": jnp.asarray(rng.integers(0, len(PSI), size=n).astype(np.int32))}


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def variables():
    """One set of float32 variables for every dtype (parameters do not depend on it)."""
    f, g = tiny_networks("float32")
    x = jnp.zeros((2, *IMAGE), jnp.float32)
    return f.init(jax.random.key(0), x, False), g.init(jax.random.key(1), x, False)


@pytest.fixture(scope="module")
def meta_gradients(variables):
    """MAXL's exact meta-gradient w.r.t. theta2 on one batch, for each compute dtype."""
    f_vars, g_vars = variables
    b = batch()
    out = {}
    for dtype in ("float32", "bfloat16"):
        f, g = tiny_networks(dtype)
        fn = jax.jit(lambda fv, gv, x, y: maxl.generator_meta_gradient(
            f, g, fv, gv, x, y, PSI, inner_lr=0.1, validate=False).grad)
        out[dtype] = fn(f_vars, g_vars, b["image"], b["primary"])
    return out


def test_the_bfloat16_meta_gradient_is_finite_float32_and_close_to_float32(meta_gradients):
    dtype, max_rel = "bfloat16", 0.15
    ref, low = meta_gradients["float32"], meta_gradients[dtype]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(low))
    a, b = flat(ref), flat(low)
    assert bool(jnp.all(jnp.isfinite(b)))
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert rel < max_rel, (dtype, rel)
    assert cos > 1 - max_rel ** 2, (dtype, cos)
    assert rel > 0, f"{dtype} gave the float32 meta-gradient exactly: the dtype was ignored"


def _ops(jaxpr, names):
    """Every equation named in ``names`` in ``jaxpr`` and its sub-jaxprs (pjit, custom rules)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _ops(getattr(inner, "jaxpr", inner), names)
    return found


@pytest.mark.parametrize("impl", ["xla", "patches"])
def test_convolutions_and_matmuls_run_in_the_compute_dtype_and_logits_leave_as_float32(
        variables, impl):
    f_vars, _ = variables
    x = batch()["image"]
    for dtype, want in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        f, _ = models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=2, head_width=4,
                                    dtype=dtype, conv_impl=impl)
        closed = jax.make_jaxpr(lambda v: f.apply(v, x, True, mutable=["batch_stats"]))(f_vars)
        heavy = _ops(closed.jaxpr, {"dot_general", "conv_general_dilated"})
        # 3 convolutions (1 op each for xla, 1 matmul each for patches) + 2 heads x 2 dense layers
        assert len(heavy) == 7, [e.primitive.name for e in heavy]
        for eqn in heavy:
            assert all(v.aval.dtype == want for v in eqn.invars), (dtype, eqn)
        logits = closed.out_avals[0]
        assert logits.dtype == jnp.float32
    # BatchNorm's statistics are float32 even in bfloat16: its reductions never see bfloat16
    f, _ = tiny_networks("bfloat16")
    closed = jax.make_jaxpr(lambda v: f.apply(v, x, True, mutable=["batch_stats"]))(f_vars)
    sums = _ops(closed.jaxpr, {"reduce_sum"})
    assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums)
    stats = closed.out_avals[1:]
    assert all(a.dtype == jnp.float32 for a in stats)


def test_parameters_and_optimizer_states_stay_float32_through_bfloat16_steps():
    f, g = tiny_networks("bfloat16")
    # Adam: an optimizer state with float32 moments to check (the reference's SGD has none).
    method = Maxl(multitask=f, multitask_optimizer=optax.adam(1e-3), generator=g, psi=PSI,
                  generator_optimizer=optax.adam(1e-3))
    b = batch()

    def two_steps(key):
        state = method.init(key, IMAGE)
        state, tm = method.train_step(state, b)
        state, mm = method.meta_step(state, {"train": b})
        return state, tm, mm

    # The dtypes of everything the two steps return, traced (jax.eval_shape) without compiling.
    state, tm, mm = jax.eval_shape(two_steps, jax.random.key(0))
    float_leaves = [x for x in jax.tree_util.tree_leaves(
        (state.multitask_params, state.multitask_opt_state, state.multitask_batch_stats,
         state.method_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    adam_moments = [x for x in jax.tree_util.tree_leaves(
        (state.multitask_opt_state, state.method_state["opt_state"])) if x.ndim > 0]
    n_params = len(jax.tree_util.tree_leaves((state.multitask_params,
                                              state.method_state["params"])))
    assert len(adam_moments) == 2 * n_params  # Adam's mu and nu of both networks
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
    for metrics in (tm, mm):
        assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(metrics)
                   if jnp.issubdtype(v.dtype, jnp.floating))


def test_scale_gradient_keeps_the_value_and_scales_first_derivatives_exactly():
    x = jnp.asarray([0.3, -1.7, 2.5], jnp.float32)

    def f(v):
        return jnp.sum(jnp.sin(v) * v ** 2)

    s = 2.0 ** 10
    assert bool(jnp.all(precision.scale_gradient(x, s) == x))
    np.testing.assert_array_equal(jax.grad(lambda v: f(precision.scale_gradient(v, s)))(x),
                                  s * jax.grad(f)(x))
    _, tangent = jax.jvp(lambda v: f(precision.scale_gradient(v, s)), (x,), (jnp.ones_like(x),))
    _, ref_tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, s * ref_tangent, rtol=1e-6)

    # cast_in(., 1/S) ... cast_out(., S) around a function: its value and gradient exactly, but its
    # second derivative in the input divided by S: why a method with a meta step refuses a scale.
    def wrapped(v):
        return precision.cast_out(f(precision.cast_in(v, jnp.float32, s)), s)
    assert float(wrapped(x)) == float(f(x))
    np.testing.assert_array_equal(jax.grad(wrapped)(x), jax.grad(f)(x))
    np.testing.assert_allclose(jax.hessian(wrapped)(x), jax.hessian(f)(x) / s, rtol=1e-6)


def test_a_float16_loss_scale_rescues_gradients_that_underflow(variables):
    """A tiny loss (1e-7 x the logits' mean) has cotangents below float16's smallest subnormal
    (6e-8): unscaled, most float16 parameter gradients flush to zero; with a loss scale of 2^10 they
    match float32's to float16 precision."""
    f_vars, _ = variables
    x = batch()["image"]

    def grad_of(dtype, scale):
        f, _ = tiny_networks(dtype, scale)

        def loss(p):
            (pri, aux), _ = f.apply({"params": p, "batch_stats": f_vars["batch_stats"]}, x, True,
                                    mutable=["batch_stats"])
            return 1e-7 * (jnp.mean(pri) + jnp.mean(aux))
        return flat(jax.jit(jax.grad(loss))(f_vars["params"]))

    ref = grad_of("float32", None)
    unscaled = grad_of("float16", None)  # the default: no scaling
    scaled = grad_of("float16", 2.0 ** 10)
    assert scaled.dtype == jnp.float32
    err = lambda g: float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))  # noqa: E731
    assert err(scaled) < 0.05, err(scaled)
    assert err(unscaled) > 10 * err(scaled), (err(unscaled), err(scaled))


def test_a_method_with_a_meta_step_refuses_a_loss_scale_and_one_without_takes_it():
    pytest.importorskip("ml_collections")
    from experiments.configs import tiny

    setup = methods.Setup(num_primary=5, psi_human=(4, 1, 1, 3, 1), steps_per_epoch=3,
                          dataset="fashion_mnist_coarse")
    config = tiny.get_config()
    config.dtype, config.loss_scale = "float16", 1024.0
    with pytest.raises(ValueError, match="takes a meta step.*--config.loss_scale=1"):
        methods.build(config, setup)
    config.method = "single"
    assert methods.build(config, setup).multitask.backbone.loss_scale == 1024.0


def test_every_method_builds_its_networks_in_the_configs_dtype():
    pytest.importorskip("ml_collections")  # the configs need it (absent on some GPU images)
    from experiments.configs import tiny

    setup = methods.Setup(num_primary=5, psi_human=(4, 1, 1, 3, 1), steps_per_epoch=3,
                          dataset="fashion_mnist_coarse")
    for name in methods.names():
        config = tiny.get_config()
        config.method, config.dtype = name, "bfloat16"
        method = methods.get(name).from_config(config, setup)
        assert method.multitask.backbone.dtype == jnp.bfloat16, name
        generator = getattr(method, "generator", None)
        if isinstance(generator, models.LabelGenerator):
            assert generator.backbone.dtype == jnp.bfloat16, name
        elif generator is not None:  # a generator on features (dtg): its own compute dtype
            assert generator.dtype == jnp.bfloat16, name


def test_the_dtype_is_part_of_a_runs_identity_and_float32_runs_keep_theirs():
    pytest.importorskip("ml_collections")
    from experiments.configs import tiny

    setup = methods.Setup(num_primary=5, psi_human=(4, 1, 1, 3, 1), steps_per_epoch=3,
                          dataset="fashion_mnist_coarse")
    config = tiny.get_config()
    method = methods.get(config.method).from_config(config, setup)
    ident32 = train.run_identity(config, method)
    assert "dtype" not in ident32  # checkpoints written before the setting existed still resume
    config.dtype = "bfloat16"
    ident16 = train.run_identity(config, method)
    assert ident16["dtype"] == "bfloat16" and ident16 != ident32  # a changed dtype is refused


@pytest.mark.parametrize("flag, message", [
    ("--config.dtype=float64", "--config.dtype='float64' is not a supported compute dtype; "
                               "choose one of float32, bfloat16, float16"),
    ("--config.loss_scale=1000.0", "--config.loss_scale=1000.0 is not a power of two"),
])
def test_the_command_line_refuses_a_bad_precision_setting_with_exit_2(tmp_path, flag, message):
    pytest.importorskip("ml_collections")  # experiments.cifar's flags
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "experiments.cifar", "--noprogress",
                          "--config=experiments/configs/tiny.py", flag,
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()

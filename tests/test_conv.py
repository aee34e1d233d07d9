"""maxl_jax.conv: every implementation is the same function as lax.conv_general_dilated / nn.Conv,
to first and second order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maxl_jax.conv import (HYBRID_MIN_CHANNELS, IMPLS, Conv3x3, conv3x3, forward_mode,
                           select_impl)

# (N, H, W, Cin, Cout): 2x2 (VGG's last block), 1x1 (SAME on a single pixel), odd and non-square;
# the last two take "hybrid"'s XLA branch (>= 4x4, >= 16 channels in), the last also in its input
# gradient (>= 16 channels out)
SHAPES = [(2, 2, 2, 5, 7), (3, 1, 1, 4, 3), (2, 5, 7, 3, 6), (1, 3, 4, 2, 2), (2, 8, 8, 16, 8),
          (2, 4, 5, 16, 20)]
TOL = dict(rtol=2e-5, atol=2e-5)


def assert_close_normwise(got, want, rel=2e-5, msg=""):
    """max |got - want| <= rel * max |want|: float32 rounding differs between mathematically equal
    forms, and second derivatives have cancellations that make elementwise relative errors large."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
    assert err <= rel * scale, f"{msg}: max abs error {err:.3g} > {rel} * {scale:.3g}"


def ref_conv(x, k, b=None):
    y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return y if b is None else y + b


def _data(shape, seed=0):
    """x, kernel, bias, output cotangent (numpy RNG: jax.random would compile per shape)."""
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return f32(n, h, w, cin), f32(3, 3, cin, cout) / np.sqrt(9 * cin), f32(cout), f32(n, h, w, cout)


# "auto" is one of these on any backend (test_auto_rule checks which); testing it again would only
# double the compile time
FORMS = ("xla", "shifted_matmul", "patches", "hybrid")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_equals_lax_conv(shape):
    x, k, b, _ = _data(shape)
    want = ref_conv(x, k), ref_conv(x, k, b)
    for impl in FORMS + (("auto",) if shape == SHAPES[0] else ()):
        both = jax.jit(lambda x, k, b: (conv3x3(x, k, impl=impl), conv3x3(x, k, b, impl=impl)))
        got = both(x, k, b)
        for bias, g, w in zip(("no bias", "bias"), got, want):
            assert g.shape == shape[:3] + (shape[4],) and g.dtype == jnp.float32
            np.testing.assert_allclose(g, w, **TOL, err_msg=f"{impl}, {bias}")


@pytest.mark.parametrize("impl", IMPLS)
def test_module_equals_nn_conv(impl):
    x, _, _, _ = _data((2, 5, 7, 3, 6))
    ours, theirs = Conv3x3(6, impl=impl), nn.Conv(6, (3, 3), padding=1)
    params = ours.init(jax.random.key(1), x)
    params_nn = theirs.init(jax.random.key(1), x)
    # same names, shapes, dtypes and (same init, same key) values: checkpoints interchange
    assert jax.tree.structure(params) == jax.tree.structure(params_nn)
    jax.tree.map(np.testing.assert_array_equal, params, params_nn)
    params = {"params": {"kernel": params["params"]["kernel"],
                         "bias": jax.random.normal(jax.random.key(2), (6,))}}
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), **TOL)


def test_module_param_shapes_and_no_bias():
    x = jnp.ones((1, 4, 4, 3))
    p = Conv3x3(5).init(jax.random.key(0), x)["params"]
    assert {k: v.shape for k, v in p.items()} == {"kernel": (3, 3, 3, 5), "bias": (5,)}
    p = Conv3x3(5, use_bias=False).init(jax.random.key(0), x)["params"]
    assert set(p) == {"kernel"}
    p_nn = nn.Conv(5, (3, 3), padding=1, use_bias=False).init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(p) == jax.tree.structure(p_nn)


def test_module_dtypes_follow_nn_conv():
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    for kw in [dict(dtype=jnp.bfloat16), dict(param_dtype=jnp.bfloat16), {}]:
        ours, theirs = Conv3x3(2, impl="patches", **kw), nn.Conv(2, (3, 3), padding=1, **kw)
        p, p_nn = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
        assert jax.tree.map(lambda a: a.dtype, p) == jax.tree.map(lambda a: a.dtype, p_nn)
        assert ours.apply(p, x).dtype == theirs.apply(p_nn, x).dtype


GRAD_SHAPES = {"2x2": SHAPES[0], "1x1": SHAPES[1], "5x7": SHAPES[2], "4x5x16": SHAPES[5]}
SECOND_ORDER_SHAPES = {"2x2": SHAPES[0], "5x7": SHAPES[2], "4x5x16": SHAPES[5]}


@pytest.mark.parametrize("shape", GRAD_SHAPES.values(), ids=GRAD_SHAPES.keys())
def test_gradients_match(shape):
    x, k, b, c = _data(shape)

    def loss(conv):
        return lambda x, k, b: jnp.sum(jnp.tanh(conv(x, k, b)) * c)

    want = jax.jit(jax.grad(loss(ref_conv), argnums=(0, 1, 2)))(x, k, b)
    for impl in FORMS:
        got = jax.jit(jax.grad(loss(lambda *a: conv3x3(*a, impl=impl)), argnums=(0, 1, 2)))(x, k, b)
        for name, g, w in zip("xkb", got, want):
            np.testing.assert_allclose(g, w, **TOL, err_msg=f"{impl}: d/d{name}")


@pytest.mark.parametrize("shape", SECOND_ORDER_SHAPES.values(), ids=SECOND_ORDER_SHAPES.keys())
def test_second_order_derivatives_match(shape):
    """Forward-over-reverse (jvp of the gradient) and reverse-over-reverse (the gradient of a loss
    taken after one differentiated SGD step on the kernel, as in MAXL's meta-gradient) agree with
    the same derivatives of lax.conv_general_dilated."""
    x, k, b, c = _data(shape)
    vx, vk, _, _ = _data(shape, seed=1)

    def inner(conv):
        return lambda x, k: jnp.sum(jnp.tanh(conv(x, k, b)) * c)

    def meta(conv):
        def f(x, k):
            fast = k - 0.5 * jax.grad(inner(conv), argnums=1)(x, k)
            return jnp.sum(jnp.sin(conv(x, fast, b)))
        return f

    def hvp(conv):  # forward-over-reverse Hessian-vector product of the inner loss
        return jax.jit(lambda x, k: jax.jvp(jax.grad(inner(conv), argnums=(0, 1)), (x, k),
                                            (vx, vk))[1])

    def meta_grad(conv):  # reverse-over-reverse
        return jax.jit(jax.grad(meta(conv), argnums=(0, 1)))

    want_hvp, want_meta = hvp(ref_conv)(x, k), meta_grad(ref_conv)(x, k)
    for impl in FORMS:
        ours = lambda x, k, b, impl=impl: conv3x3(x, k, b, impl=impl)  # noqa: E731
        # "hybrid" is reverse-mode only (jax.custom_vjp): test_hybrid_forward_mode covers jvp
        checks = [("meta-gradient", meta_grad(ours)(x, k), want_meta)]
        if impl != "hybrid":
            checks.append(("hvp", hvp(ours)(x, k), want_hvp))
        # float32 rounding grows with the contraction (9 * Cin terms per output, twice over)
        rel = 2e-5 if shape[3] < 16 else 1e-4
        for what, got, want in checks:
            for name, g, w in zip("xk", got, want):
                assert_close_normwise(g, w, rel=rel, msg=f"{impl}: {what} d/d{name}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=["2x2", "4x5x16"])
def test_hybrid_third_order_matches(shape):
    """'hybrid' defines each derivative through the same two custom-VJP operations, so every order
    follows its rules: the gradient of a meta-gradient's squared norm (third order) agrees too."""
    x, k, b, c = _data(shape)

    def third(conv):
        def meta(x, k):
            fast = k - 0.5 * jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k, b)) * c))(k)
            return jnp.sum(jnp.sin(conv(x, fast, b)))

        def sq_norm(x, k):
            return sum(jnp.sum(g ** 2) for g in jax.grad(meta, argnums=(0, 1))(x, k))
        return jax.jit(jax.grad(sq_norm, argnums=(0, 1)))

    ours = lambda x, k, b: conv3x3(x, k, b, impl="hybrid")  # noqa: E731
    for name, g, w in zip("xk", third(ours)(x, k), third(ref_conv)(x, k)):
        assert_close_normwise(g, w, rel=1e-4, msg=f"third order d/d{name}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=["2x2", "4x5x16"])
def test_hybrid_bfloat16_meta_gradient(shape):
    """In bfloat16 (``--config.dtype=bfloat16``) 'hybrid''s custom rules keep the dtype at every
    order and its meta-gradient agrees with XLA's in bfloat16 to bfloat16's rounding (8 bits of
    mantissa: 2**-8 = 4e-3 per operation; 2e-2 leaves room for a few roundings apart)."""
    x, k, b, c = (a.astype(jnp.bfloat16) for a in _data(shape))

    def meta_grad(impl):
        def inner(k):
            return jnp.sum(jnp.tanh(conv3x3(x, k, b, impl=impl)).astype(jnp.float32) * c)

        def outer(x, k):
            fast = k - 0.5 * jax.grad(inner)(k)
            return jnp.sum(jnp.sin(conv3x3(x, fast, b, impl=impl)).astype(jnp.float32))
        return jax.jit(jax.grad(outer, argnums=(0, 1)))(x, k)

    for name, g, w in zip("xk", meta_grad("hybrid"), meta_grad("xla")):
        assert g.dtype == w.dtype == jnp.bfloat16
        assert_close_normwise(g.astype(jnp.float32), w.astype(jnp.float32), rel=2e-2,
                              msg=f"bfloat16 meta-gradient d/d{name}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=["2x2", "4x5x16"])
def test_hybrid_batched_vjp_matches(shape):
    """Per-task gradients as ``methods.base`` takes them (``jax.vmap`` over one ``jax.vjp``'s
    cotangents) batch 'hybrid''s custom rules and agree with XLA's convolution."""
    x, k, b, c = _data(shape)

    def per_task(impl):
        def losses(k):
            y = jnp.tanh(conv3x3(x, k, b, impl=impl))
            return jnp.stack([jnp.sum(y * c), jnp.sum(jnp.sin(y))])
        _, vjp = jax.vjp(losses, k)
        return jax.jit(jax.vmap(lambda v: vjp(v)[0]))(jnp.eye(2))

    got, want = per_task("hybrid"), per_task("xla")
    assert got.shape == (2, *k.shape)
    for t in range(2):
        assert_close_normwise(got[t], want[t], msg=f"task {t}")


def test_hybrid_forward_mode():
    """jax.jvp through 'hybrid' fails with JAX's own message; 'auto' traced inside
    conv.forward_mode() picks a form jvp can differentiate, with the same derivative."""
    shape = (1, 4, 4, HYBRID_MIN_CHANNELS, 3)  # where "auto" is "hybrid" outside the context
    x, k, b, c = _data(shape)
    vk = _data(shape, seed=1)[1]

    def loss(impl):
        return lambda k: jnp.sum(jnp.tanh(conv3x3(x, k, b, impl=impl)) * c)

    for impl in ("hybrid", "auto"):
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(jax.grad(loss(impl)), (k,), (vk,))
    want = jax.jvp(jax.grad(loss("xla")), (k,), (vk,))[1]
    with forward_mode():
        got = jax.jit(lambda k, v: jax.jvp(jax.grad(loss("auto")), (k,), (v,))[1])(k, vk)
    assert_close_normwise(got, want)


def test_bad_impl_raises():
    x, k, b, _ = _data(SHAPES[0])
    with pytest.raises(ValueError, match="impl"):
        conv3x3(x, k, b, impl="fft")
    with pytest.raises(ValueError, match="impl"):
        Conv3x3(4, impl="winograd").init(jax.random.key(0), x)


def test_bad_shapes_raise():
    x, k, _, _ = _data(SHAPES[0])
    with pytest.raises(ValueError):
        conv3x3(x[0], k)  # not NHWC
    with pytest.raises(ValueError):
        conv3x3(x, k[:2])  # not 3x3
    with pytest.raises(ValueError):
        conv3x3(x, k[:, :, :2])  # Cin mismatch


def test_auto_rule():
    # accelerators keep the standard convolution
    assert select_impl((100, 2, 2, 512), (3, 3, 512, 512), backend="gpu") == "xla"
    assert select_impl((100, 32, 32, 64), (3, 3, 64, 64), backend="tpu") == "xla"
    with forward_mode():
        assert select_impl((100, 2, 2, 512), (3, 3, 512, 512), backend="gpu") == "xla"
    # CPU: "hybrid" from HYBRID_MIN_CHANNELS input channels up (it picks XLA's convolution or the
    # im2col matmul by shape, at every derivative order: module docstring), "patches" below, and
    # "patches" wherever forward mode is wanted
    for s, cin in [(1, 512), (2, 512), (4, 256), (8, 128), (16, 64), (32, 3), (32, 64)]:
        want = "hybrid" if cin >= HYBRID_MIN_CHANNELS else "patches"
        assert select_impl((100, s, s, cin), (3, 3, cin, 64), backend="cpu") == want
        with forward_mode():
            assert select_impl((100, s, s, cin), (3, 3, cin, 64), backend="cpu") == "patches"
    assert select_impl((100, 2, 2, 512), (3, 3, 512, 512), backend="cpu") == "hybrid"  # restored
    if jax.default_backend() == "cpu":  # and "auto" really dispatches there
        x = jnp.ones((1, 2, 2, HYBRID_MIN_CHANNELS))
        k = jnp.ones((3, 3, HYBRID_MIN_CHANNELS, 2))

        def jaxpr(x, k, **kw):
            return str(jax.make_jaxpr(lambda x, k: conv3x3(x, k, **kw))(x, k))
        assert "custom_vjp_call" in jaxpr(x, k)
        assert "custom_vjp_call" not in jaxpr(x[..., :4], k[:, :, :4])  # few channels: patches
        with forward_mode():
            assert "custom_vjp_call" not in jaxpr(x, k) and "conv_general_dilated" not in jaxpr(x, k)
        assert "conv_general_dilated" in jaxpr(x, k, impl="xla")


def test_forward_over_reverse_meta_gradient_through_auto_convolutions():
    """``meta.meta_gradient(form="forward_over_reverse")`` takes ``jax.jvp`` through the networks;
    with ``impl="auto"`` at 128 input channels (``"hybrid"`` on the CPU) it must still run and give
    the reverse form's meta-gradient (it traces under ``conv.forward_mode()``)."""
    import optax

    from maxl_jax import meta

    x, k, b, c = _data((1, 4, 4, HYBRID_MIN_CHANNELS, 3))

    def inner(k, w):  # the hyperparameter w weighs the per-channel losses
        y = jnp.tanh(conv3x3(x, k, b))
        return jnp.sum(w * jnp.sum(y * c, axis=(0, 1, 2))), None

    def outer(k, w):
        return jnp.sum(jnp.sin(conv3x3(x, k, b))), None

    w = jnp.array([1.0, 0.5, 2.0])
    got, want = (jax.jit(lambda k, w, form=form: meta.meta_gradient(
        inner, outer, k, w, optax.sgd(0.1), form=form).grad_hyper)(k, w)
        for form in ("forward_over_reverse", "reverse"))
    assert_close_normwise(got, want, rel=1e-4)

"""maxl_jax.conv: every implementation is the same function as lax.conv_general_dilated / nn.Conv,
to first and second order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maxl_jax.conv import IMPLS, Conv3x3, conv3x3, select_impl

# (N, H, W, Cin, Cout): 2x2 (VGG's last block), 1x1 (SAME on a single pixel), odd and non-square
SHAPES = [(2, 2, 2, 5, 7), (3, 1, 1, 4, 3), (2, 5, 7, 3, 6), (2, 8, 8, 16, 8), (1, 3, 4, 2, 2)]
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
FORMS = ("xla", "shifted_matmul", "patches")


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


GRAD_SHAPES = {"2x2": SHAPES[0], "1x1": SHAPES[1], "5x7": SHAPES[2]}
SECOND_ORDER_SHAPES = {"2x2": SHAPES[0], "5x7": SHAPES[2]}


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
        for what, got, want in [("hvp", hvp(ours)(x, k), want_hvp),
                                ("meta-gradient", meta_grad(ours)(x, k), want_meta)]:
            for name, g, w in zip("xk", got, want):
                assert_close_normwise(g, w, msg=f"{impl}: {what} d/d{name}")


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
    # CPU: the im2col matmul form, which avoids XLA:CPU's slow convolutions (module docstring)
    for s, cin in [(1, 512), (2, 512), (4, 256), (8, 128), (16, 64), (32, 3), (32, 64)]:
        assert select_impl((100, s, s, cin), (3, 3, cin, 64), backend="cpu") == "patches"
    if jax.default_backend() == "cpu":
        assert select_impl((100, 2, 2, 512), (3, 3, 512, 512)) == "patches"
        # and "auto" really dispatches there: its jaxpr has no convolution
        x, k, _, _ = _data(SHAPES[0])
        assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, k: conv3x3(x, k))(x, k))
        assert "conv_general_dilated" in str(
            jax.make_jaxpr(lambda x, k: conv3x3(x, k, impl="xla"))(x, k))

"""MAOAL (``maxl_jax.methods.maoal``): its hypergradient and its update direction.

Notation: ``G(theta, W)`` is the importance-parameterised gradient of the shared parameters
(``g_0 + s sum_k ReLU(W[k, m]) g_k`` on module ``m``), ``H = dG/dtheta``, ``v = grad_theta L_dev``.
The method's hypergradient is ``-(dG/dW)^T sum_{j=0..J} (I - alpha H^T)^j v``.

* One-step form (``J = 0``): ``h_0 = -(dG/dW)^T v``. Since ``d/dW L_dev(theta - lr G(theta, W)) =
  -lr (dG/dW)^T grad L_dev(theta - lr G)``, ``h_0`` is the derivative of the dev loss after one
  lower SGD step of size ``lr``, divided by ``lr``, in the limit ``lr -> 0`` (the difference is
  O(lr)). Checked against float64 central differences on a tiny CNN, with ``G`` built independently
  in the test from per-task gradients.
* ``J = 3``: the method equals the formula with ``H`` and ``dG/dW`` taken by float64 central
  differences of ``G`` (so the transpose of the non-symmetric ``H`` is the right one).
* On a quadratic lower problem (``G`` linear in theta), the converged Neumann series
  (``scale_by_alpha``) gives the IFT hypergradient of ``L_dev(theta*(W))`` in closed form; the
  authors' convention is that value divided by alpha.
* Behaviour: importances ReLU'd off give the primary-only update of the backbone; an
  auxiliary task whose gradient is the primary's gets every module's importance raised.
* Modules: the small CNN's 3 blocks / 12 tensors, VGG-16's 5 blocks / 52 tensors.
* Bad settings raise clear errors.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from maxl_jax import config_checks, meta, methods, models, validation
from maxl_jax.methods import AuxTask
from maxl_jax.methods.maoal import (Maoal, MaoalGenerate, hypergradient, importance_direction,
                                    module_assignment)
from compat import enable_x64

PSI = (2, 3)
SHAPE = (8, 8, 1)
CONV = "xla"
TASKS = (AuxTask("random", PSI), AuxTask("random", (1, 1)))


def to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


from test_methods import make_batch  # noqa: E402  (the same PSI and SHAPE)


def tiny_method(tasks=TASKS, terms=3, alpha=1.0, modules="blocks", lr=0.01, meta_lr=1e-2):
    mt, _ = models.make_networks("small", len(PSI), sum(sum(t.psi) for t in tasks), 2, width=1,
                                 head_width=4, conv_impl=CONV)
    return Maoal(multitask=mt, multitask_optimizer=optax.sgd(lr), aux_tasks=tasks,
                 meta_optimizer=optax.adam(meta_lr), terms=terms, alpha=alpha, modules=modules)


def setup64(seed=0, **kw):
    """A float64 tiny MAOAL with importances away from 1 (one of them ReLU'd off), a training
    batch and a dev batch."""
    m = tiny_method(**kw)
    state = to64(m.init(jax.random.PRNGKey(seed), SHAPE))
    w = np.random.default_rng(seed).uniform(0.3, 1.7, state.method_state["importance"].shape)
    w[1, 0] = -0.5
    state = state.replace(method_state={**state.method_state, "importance": jnp.asarray(w)})
    return m, state, make_batch(seed + 1, TASKS), make_batch(seed + 2)


def independent_g(m, state, batch):
    """``G(backbone, W)`` built here from each task's own ``jax.grad`` (the small CNN's block ``b``
    is layer ``b``: ``conv_b``/``bn_b``), with the heads fixed."""
    params, stats = state.multitask_params, state.multitask_batch_stats
    heads = {k: v for k, v in params.items() if k != "backbone"}
    targets = m.data_targets(batch, jnp.float64)
    sizes = m.aux_sizes

    def task_loss(shared, t):
        (logits, aux), _ = m.multitask.apply({"params": {**heads, "backbone": shared},
                                              "batch_stats": stats}, batch["image"], True,
                                             mutable=["batch_stats"])
        if t == 0:
            return jnp.mean(m.primary_losses(logits, batch["primary"]))
        start = sum(sizes[:t - 1])
        logp = jax.nn.log_softmax(aux[:, start:start + sizes[t - 1]], -1)
        target = targets[:, start:start + sizes[t - 1]]
        p = jnp.exp(logp)
        return jnp.mean(-jnp.sum(target * (1 - p) ** 2 * logp, -1))  # focal loss, gamma 2

    def g(shared, w):
        grads = [jax.grad(task_loss)(shared, t) for t in range(1 + len(sizes))]
        relu = jnp.maximum(w, 0.0)
        k = len(sizes)

        def combine(path, *gs):
            block = int(path[0].key.split("_")[1])
            return gs[0] + sum(relu[j, block] * gs[1 + j] for j in range(k)) / k
        return jax.tree_util.tree_map_with_path(combine, *grads)
    return g


def dev_loss_fn(m, state, dev):
    params, stats = state.multitask_params, state.multitask_batch_stats
    heads = {k: v for k, v in params.items() if k != "backbone"}

    def dev_loss(shared):
        logits, _, _ = m.forward({**heads, "backbone": shared}, stats, dev["image"])
        return jnp.mean(m.primary_losses(logits, dev["primary"]))
    return dev_loss


# ----------------------------------------------------------------------- (1) finite differences

def test_one_step_hypergradient_is_the_derivative_of_the_dev_loss_after_one_lower_step():
    """``J = 0``: ``h_0 = -(dG/dW)^T grad L_dev(theta)``, and
    ``[d/dW L_dev(theta - lr G(theta, W))] / lr -> h_0`` as ``lr -> 0`` with an O(lr) difference:
    by float64 central differences in each entry of W, the error falls ~10x per decade of lr."""
    with enable_x64():
        m, state, batch, dev = setup64(terms=0)
        grads, result, _ = jax.jit(m.hypergradient)(state, {"held_out": dev, "train": batch})
        h0 = np.asarray(grads["importance"])
        g = independent_g(m, state, batch)
        dev_loss = dev_loss_fn(m, state, dev)
        theta = state.multitask_params["backbone"]

        @jax.jit
        def after_step(w, lr):
            return dev_loss(jax.tree_util.tree_map(lambda p, d: p - lr * d, theta, g(theta, w)))

        w0, eps = state.method_state["importance"], 1e-6
        errors = []
        for lr in (1e-2, 1e-3, 1e-4):
            fd = np.zeros(w0.shape)
            for idx in np.ndindex(*w0.shape):
                fd[idx] = (after_step(w0.at[idx].add(eps), lr)
                           - after_step(w0.at[idx].add(-eps), lr)) / (2 * eps) / lr
            errors.append(np.linalg.norm(fd - h0) / np.linalg.norm(h0))
        assert all(b < 0.2 * a for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-3, errors
        assert h0[1, 0] == 0.0  # a ReLU'd-off importance gets no gradient
        assert np.all(np.abs(np.delete(h0.ravel(), 3)) > 1e-8)
        np.testing.assert_allclose(float(result.outer_loss), float(dev_loss(theta)), rtol=1e-12)


def test_neumann_hypergradient_is_the_formula_with_finite_difference_second_derivatives():
    """``J = 3``, ``alpha = 0.3``: the method's hypergradient equals
    ``-(dG/dW)^T sum_{j<=3} (I - alpha H^T)^j v`` with ``H = dG/dtheta`` and ``dG/dW`` by float64
    central differences of ``G`` (built independently). ``H`` is not symmetric here, and using
    ``H`` instead of ``H^T`` would give a measurably different answer."""
    with enable_x64():
        m, state, batch, dev = setup64(seed=3, terms=3, alpha=0.3)
        grads, _, _ = jax.jit(m.hypergradient)(state, {"held_out": dev, "train": batch})
        got = flat(grads["importance"])
        g = independent_g(m, state, batch)
        theta = state.multitask_params["backbone"]
        w0 = state.method_state["importance"]
        t_vec, unravel = jax.flatten_util.ravel_pytree(theta)
        w_vec = w0.ravel()
        gv = jax.jit(lambda t, w: jax.flatten_util.ravel_pytree(
            g(unravel(t), w.reshape(w0.shape)))[0])
        eps = 1e-6
        hess = np.stack([(gv(t_vec + eps * e, w_vec) - gv(t_vec - eps * e, w_vec)) / (2 * eps)
                         for e in np.eye(t_vec.size)], 1)
        mixed = np.stack([(gv(t_vec, w_vec + eps * e) - gv(t_vec, w_vec - eps * e)) / (2 * eps)
                          for e in np.eye(w_vec.size)], 1)
        v = flat(jax.grad(dev_loss_fn(m, state, dev))(theta))

        def formula(h):
            q, term = v.copy(), v.copy()
            for _ in range(3):
                term = term - 0.3 * h @ term
                q = q + term
            return -mixed.T @ q

        want = formula(hess.T)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        wrong = formula(hess)
        assert np.linalg.norm(wrong - want) / np.linalg.norm(want) > 1e-3
        assert np.linalg.norm(hess - hess.T) > 1e-3 * np.linalg.norm(hess)


def test_generated_labels_variant_one_step_hypergradient_reaches_the_generator():
    """``maoal_generate``, ``J = 0``: along random directions ``d`` of the label generator's
    parameters, ``<h_0, d>`` is the derivative of ``L_dev(theta - lr G(theta, W, labels(gen)))`` in
    ``d`` divided by ``lr`` (``lr = 1e-4``, float64 central differences; the difference is
    O(lr))."""
    with enable_x64():
        mt, gen = models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=1,
                                       head_width=4, conv_impl=CONV)
        m = MaoalGenerate(multitask=mt, multitask_optimizer=optax.sgd(0.01), generator=gen,
                          psi=PSI, meta_optimizer=optax.adam(1e-2), terms=0)
        state = to64(m.init(jax.random.PRNGKey(7), SHAPE))
        batch, dev = make_batch(8), make_batch(9)
        grads, _, _ = jax.jit(m.hypergradient)(state, {"held_out": dev, "train": batch})
        params, stats = state.multitask_params, state.multitask_batch_stats
        theta, w = params["backbone"], state.method_state["importance"]
        modules, _ = m.module_assignment(theta)
        dev_loss = dev_loss_fn(m, state, dev)
        g_vec, unravel = jax.flatten_util.ravel_pytree(state.method_state["generator"])

        @jax.jit
        def after_step(gv, lr):
            soft, _ = m._generate(state, batch, None, unravel(gv))
            _, task, _, _ = m.task_gradients_with(params, stats, batch, soft)
            g = importance_direction(task["backbone"], w, modules, m.scale)
            return dev_loss(jax.tree_util.tree_map(lambda p, d: p - lr * d, theta, g))

        dirs = np.random.default_rng(0).normal(size=(4, g_vec.size))
        eps, lr = 1e-6, 1e-4
        fd = np.array([(after_step(g_vec + eps * d, lr) - after_step(g_vec - eps * d, lr))
                       / (2 * eps) / lr for d in dirs])
        got = dirs @ flat(grads["generator"])
        assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-2, (got, fd)
        assert np.linalg.norm(fd) > 1e-6


# ------------------------------------------------------------------------------ (2) quadratic

def test_converged_neumann_series_is_the_ift_hypergradient_of_a_quadratic_lower_problem():
    """Quadratic task losses ``L_t = 1/2 theta^T A_t theta - b_t^T theta`` over two modules
    (``a``: 3 entries, ``b``: 2): ``G = M(W) theta - r(W)`` is linear, ``theta*(W) = M^-1 r`` and
    ``dL_dev(theta*)/dW[k, m] = grad L_dev(theta*)^T M^-1 s E_m (b_k - A_k theta*)`` with ``E_m``
    the module's indicator. The method's hypergradient at ``theta*`` with 400 Neumann terms
    (``scale_by_alpha``) matches it; without the alpha factor it is that value / alpha."""
    with enable_x64():
        rng = np.random.default_rng(0)
        n, k = 5, 2
        module = np.array([0, 0, 0, 1, 1])

        def spd(scale):
            q = rng.normal(size=(n, n))
            return scale * (q @ q.T / n + np.eye(n))

        a = [spd(1.0)] + [spd(0.5) for _ in range(k)]
        b = [rng.normal(size=n) for _ in range(1 + k)]
        c_mat, c_vec = spd(1.0), rng.normal(size=n)
        w = np.array([[0.7, 1.4], [1.2, 0.4]])
        s = 1.0 / k

        def split(x):
            return {"a": x[:3], "b": x[3:]}

        def join(tree):
            return jnp.concatenate([tree["a"], tree["b"]])

        modules = {"a": 0, "b": 1}

        def grad_map(theta, hyper):
            x = join(theta)
            grads = jnp.stack([jnp.asarray(a[t]) @ x - b[t] for t in range(1 + k)])
            per_task = {"a": grads[:, :3], "b": grads[:, 3:]}
            return importance_direction(per_task, hyper, modules, s), {}

        def dev_loss(theta, hyper):
            x = join(theta)
            return 0.5 * x @ c_mat @ x - c_vec @ x, {}

        d = [np.diag(w[j, module]) for j in range(k)]
        big_m = a[0] + s * sum(d[j] @ a[1 + j] for j in range(k))
        r = b[0] + s * sum(d[j] @ b[1 + j] for j in range(k))
        theta_star = np.linalg.solve(big_m, r)
        u = np.linalg.solve(big_m.T, c_mat @ theta_star - c_vec)
        want = np.array([[s * u @ (np.diag((module == mm).astype(float))
                                   @ (b[1 + j] - a[1 + j] @ theta_star))
                          for mm in range(2)] for j in range(k)])

        alpha = 1.0 / np.max(np.abs(np.linalg.eigvals(big_m)))
        assert np.max(np.abs(np.linalg.eigvals(np.eye(n) - alpha * big_m))) < 0.95
        assert np.linalg.norm(big_m - big_m.T) > 1e-2  # G is not the gradient of a loss
        theta = split(jnp.asarray(theta_star))
        np.testing.assert_allclose(join(grad_map(theta, jnp.asarray(w))[0]), 0, atol=1e-12)
        got = hypergradient(grad_map, dev_loss, theta, jnp.asarray(w), terms=400, alpha=alpha,
                            scale_by_alpha=True).grad_hyper
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-12)
        authors = hypergradient(grad_map, dev_loss, theta, jnp.asarray(w), terms=400,
                                alpha=alpha).grad_hyper
        np.testing.assert_allclose(np.asarray(authors) * alpha, want, rtol=1e-8, atol=1e-12)
        assert np.all(np.abs(want) > 1e-4)
        # The same value as the shared estimator given G as its grad_map (J = 3, alpha = 1).
        shared = meta.implicit_gradient(None, dev_loss, theta, jnp.asarray(w), terms=3,
                                        grad_map=grad_map).grad_hyper
        np.testing.assert_allclose(np.asarray(hypergradient(grad_map, dev_loss, theta,
                                                            jnp.asarray(w)).grad_hyper),
                                   np.asarray(shared), rtol=1e-10)


# ----------------------------------------------------------------------------- (3) behaviour

def test_importances_relud_off_give_the_primary_only_update_of_the_backbone():
    m = tiny_method(lr=0.1)
    state = m.init(jax.random.PRNGKey(1), SHAPE)
    batch = make_batch(4, TASKS)
    off = state.replace(method_state={**state.method_state,
                                      "importance": -jnp.ones_like(
                                          state.method_state["importance"])})
    new, _ = jax.jit(m.train_step)(off, batch)
    _, grads, _, _ = jax.jit(m.task_gradients_with)(
        state.multitask_params, state.multitask_batch_stats, batch, m.data_targets(batch))
    step = {"backbone": jax.tree_util.tree_map(lambda g: g[0], grads["backbone"])}
    # The heads: the gradient of L_pri + mean_k L_aux_k.
    step.update({k: jax.tree_util.tree_map(lambda g: g[0] + g[1:].mean(0), v)
                 for k, v in grads.items() if k != "backbone"})
    want = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, state.multitask_params, step)
    # Equal up to float32 rounding of the parameters (two separately compiled programs).
    np.testing.assert_allclose(flat(new.multitask_params), flat(want), rtol=1e-6, atol=2e-7)
    # With the default importances the auxiliary gradients do reach the backbone.
    on, _ = jax.jit(m.train_step)(state, batch)
    assert not np.allclose(flat(on.multitask_params["backbone"]),
                           flat(new.multitask_params["backbone"]))


def test_an_auxiliary_task_aligned_with_the_primary_gets_every_modules_importance_raised():
    """psi = (1, 1) with the primary labels on a head that starts as a copy of the primary head:
    ``g_aux = g_pri`` on the backbone. With the dev batch the training batch, the one-step
    hypergradient of each module is ``-s |g_pri restricted to it|^2 < 0``: one meta step raises
    every importance."""
    tasks = (AuxTask("human", (1, 1)),)
    m = tiny_method(tasks=tasks, terms=0, meta_lr=0.1)
    state = m.init(jax.random.PRNGKey(2), SHAPE)
    params = state.multitask_params
    state = state.replace(multitask_params={**params, "auxiliary_head": params["primary_head"]})
    batch = make_batch(5)
    batch["aux"] = batch["primary"][:, None]
    new, metrics = jax.jit(m.meta_step)(state, {"held_out": batch, "train": batch})
    _, grads, _, _ = jax.jit(m.task_gradients_with)(
        state.multitask_params, state.multitask_batch_stats, batch, m.data_targets(batch))
    g0 = jax.tree_util.tree_map(lambda g: g[0], grads["backbone"])
    modules, _ = m.module_assignment(g0)
    want = np.zeros(3)
    for leaf, mod in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(modules)):
        want[mod] -= float(jnp.sum(leaf ** 2))
    np.testing.assert_allclose(np.asarray(metrics["importance_grad"])[0], want, rtol=1e-4)
    assert np.all(want < 0)
    assert np.all(np.asarray(new.method_state["importance"]) > 1.0)
    assert int(new.meta_step) == 1


# ------------------------------------------------------------------------------- (4) modules

@pytest.mark.parametrize("arch, blocks, tensors", [("small", 3, 12), ("vgg16", 5, 52)])
def test_modules_are_the_backbones_blocks_or_its_tensors(arch, blocks, tensors):
    mt, _ = models.make_networks(arch, 20, 100, 100, width=2 if arch == "small" else None)
    shapes = jax.eval_shape(lambda: mt.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 32, 32, 3)), False))["params"]
    for level, count in (("blocks", blocks), ("tensors", tensors)):
        m = Maoal(multitask=mt, multitask_optimizer=optax.sgd(0.01),
                  aux_tasks=(AuxTask("human", (5,) * 20),), meta_optimizer=optax.adam(1e-2),
                  modules=level)
        state = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), (32, 32, 3)))
        assert state.method_state["importance"].shape == (1, count)
        modules, names = module_assignment(shapes["backbone"], mt.backbone.convs_per_block, level)
        assert len(names) == count and sorted(set(jax.tree_util.tree_leaves(modules))) == list(
            range(count))
    modules, names = module_assignment(shapes["backbone"], mt.backbone.convs_per_block)
    per_block = np.cumsum(mt.backbone.convs_per_block)
    for layer in range(per_block[-1]):
        block = int(np.searchsorted(per_block, layer, side="right"))
        assert modules[f"conv_{layer}"]["kernel"] == modules[f"bn_{layer}"]["scale"] == block
    assert names[0] == "block1"
    tensor_names = module_assignment(shapes["backbone"], mt.backbone.convs_per_block,
                                     "tensors")[1]
    assert tensor_names[:4] == ("conv_0/kernel", "conv_0/bias", "bn_0/scale", "bn_0/bias")


def test_several_tasks_and_the_generated_labels_give_one_row_of_w_each():
    config = default.get_config()
    config.arch, config.width, config.aux_tasks = "small", 2, "human,random"
    setup = methods.Setup(num_primary=2, psi_human=(2, 3), steps_per_epoch=5, dataset="test")
    m = methods.build(_with(config, "maoal"), setup)
    assert isinstance(m, Maoal) and m.num_tasks == 2 and m.scale == 0.5
    g = methods.build(_with(config, "maoal_generate"), setup)
    assert isinstance(g, MaoalGenerate) and g.aux_sizes == (10,)
    state = jax.eval_shape(lambda: g.init(jax.random.PRNGKey(0), (8, 8, 3)))
    assert state.method_state["importance"].shape == (1, 3)
    assert "generator" in state.method_state


def _with(config, name):
    c = config.copy_and_resolve_references()
    c.method = name
    return c


# ---------------------------------------------------------------------------- (5) validation

@pytest.mark.parametrize("field, value, match", [
    ("modules", "layers", r"maoal\.modules='layers' is not one of \('blocks', 'tensors'\)"),
    ("every", 0, r"maoal\.every=0 is out of range"),
    ("terms", -1, r"maoal\.terms=-1 is out of range"),
    ("alpha", 0.0, r"maoal\.alpha=0\.0 is out of range"),
    ("held_out_fraction", 0.0, r"maoal\.held_out_fraction=0\.0 is out of range"),
    ("clip", -1.0, r"maoal\.clip=-1\.0 is out of range"),
    ("meta_lr", 0.0, r"maoal\.meta_lr=0\.0 is out of range"),
])
def test_bad_settings_raise_a_config_error_naming_the_field(field, value, match):
    config = default.get_config()
    config.method = "maoal"
    config.maoal[field] = value
    with pytest.raises(validation.ConfigError, match=match):
        config_checks.validate_config(config)


def test_bad_constructions_raise_clear_errors():
    mt, _ = models.make_networks("small", 2, 5, 5, width=1, head_width=4)
    common = dict(multitask=mt, multitask_optimizer=optax.sgd(0.01),
                  meta_optimizer=optax.adam(1e-2))
    with pytest.raises(ValueError, match="needs at least one auxiliary task"):
        Maoal(**{**common, "multitask": models.make_networks("small", 2, 0, 1, width=1)[0]})
    with pytest.raises(ValueError, match="unknown modules 'layers'"):
        Maoal(**common, aux_tasks=(AuxTask("random", PSI),), modules="layers")
    with pytest.raises(ValueError, match=r"sources \('held_out', 'train'\)"):
        Maoal(**common, aux_tasks=(AuxTask("random", PSI),),
              schedule=methods.MetaSchedule(every=1, sources=("train",)))
    with pytest.raises(ValueError, match="terms must be an integer >= 0"):
        Maoal(**common, aux_tasks=(AuxTask("random", PSI),), terms=-2)
    with pytest.raises(ValueError, match="unknown module level"):
        module_assignment({}, (1,), "nope")


def test_authors_cross_entropy_is_gamma_zero_for_every_task():
    """The authors train every task with ``nn.CrossEntropyLoss``; ``--config.gamma=0`` turns our
    focal losses into exactly that: each task's loss is the softmax cross-entropy of its own slice
    of the auxiliary head (and of the primary head), and at the default gamma 2 it is not."""
    batch = make_batch(3, TASKS)
    base_method = tiny_method()
    state = base_method.init(jax.random.PRNGKey(0), SHAPE)
    logits, aux_logits, _ = base_method.forward(state.multitask_params,
                                                state.multitask_batch_stats, batch["image"])
    expected = [optax.softmax_cross_entropy_with_integer_labels(logits, batch["primary"]).mean()]
    start = 0
    for t, task in enumerate(TASKS):
        k = sum(task.psi)
        expected.append(optax.softmax_cross_entropy_with_integer_labels(
            aux_logits[:, start:start + k], batch["aux"][:, t]).mean())
        start += k
    expected = np.asarray(expected)
    for gamma, close in ((0.0, True), (2.0, False)):
        m = Maoal(**{**{f: getattr(base_method, f) for f in ("multitask", "multitask_optimizer",
                                                             "aux_tasks", "meta_optimizer",
                                                             "terms", "alpha", "modules")},
                     "gamma": gamma})
        values, _, _, _ = m.task_gradients_with(
            state.multitask_params, state.multitask_batch_stats, batch, m.data_targets(batch))
        assert np.allclose(np.asarray(values), expected, rtol=1e-5, atol=1e-6) == close, (
            gamma, values, expected)

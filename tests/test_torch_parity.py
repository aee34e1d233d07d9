"""Parity of our JAX MAXL steps with the PyTorch port of the reference (benchmarks/torch_reference.py).

Same initial weights (the reference's initialisation drawn by the torch port and converted to our
Flax layout; structure checked against ``Maxl.init``) and the same batch must give, in float32, the
same:

* primary and auxiliary losses of the theta1 step (``Maxl.train_step``),
* theta1 update (the new parameters after one SGD step, and the step ``new - old`` itself),
* BatchNorm running statistics of f and g after the theta1 step (PyTorch updates the running
  variance with the unbiased batch variance; so does our ``models.BatchNorm``),
* theta2 meta-gradient w.r.t. every generator parameter (``maxl.generator_meta_gradient``, both forms
  ``"reverse"`` and ``"forward_over_reverse"``), the meta objective and its parts,
* theta2 update of g (``Maxl.meta_step``: SGD lr 1e-3 with L2 weight decay 5e-4) and the
  running statistics after it (``-m slow``, with the ``xla`` conv variant: each adds a compilation).

"Relative error" is ``||jax - torch|| / ||torch||`` per parameter tensor (``|jax - torch| / |torch|``
for scalars), required below 1e-4. A tensor
whose true value is ~0 has no meaningful relative error: the conv biases feed a train-mode BatchNorm,
which removes them, so their gradients are exactly 0 in exact arithmetic and float noise in both
implementations. For a tensor whose torch norm is below 1e-3 of the whole tree's norm, the error is
measured against the whole tree's norm instead (still < 1e-4).

ReLU and max-pool make both losses only piecewise smooth: where a pre-activation is within float32
rounding of 0, or a 2x2 pooling window's two largest values are within rounding of each other, the
two implementations may legitimately take different branches and their gradients then differ by
percents (seen while writing this test, on another instance: one max-pool window after conv 3 of the
forward at theta1+, whose two largest values were 2e-6 apart, flipped with the XLA optimisation
level and the conv implementation, and moved every entry of the meta-gradient by 3-5%; float64 runs
of both sides agreed to 1e-13). The instance below
(weights seed ``WEIGHT_SEED``, batch seed ``BATCH_SEED``) was chosen for its distance from every such
kink, and ``test_instance_is_away_from_relu_and_maxpool_kinks`` checks that distance in float64.

The network is the reference VGG-16-BN structure (all 13 convs, 2,2,3,3,3 per block, 32x32x3 input,
flatten at 1x1) at reduced width, filters (8, 8, 16, 16, 16), heads 16 wide, batch 8, so that the
test runs in seconds on two CPU cores. The conv implementation is parametrised: ``auto`` (on the
CPU the ``patches`` matmul form at every layer, see ``maxl_jax.conv``) and ``xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is an optional benchmark dependency (pip install -e .[bench]); "
                    "the PyTorch reference port it checks against needs it")
tr = pytest.importorskip("benchmarks.torch_reference")

from maxl_jax import maxl, models, steps  # noqa: E402
from maxl_jax.methods.maxl import Maxl  # noqa: E402
from maxl_jax.train_state import TrainState  # noqa: E402

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_torch_parity")

FILTERS = (8, 8, 16, 16, 16)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
HEAD_WIDTH = 16
PSI = (3, 2, 4, 3)  # 4 primary classes, 12 auxiliary classes (unequal blocks on purpose)
BATCH = 8
WEIGHT_SEED, BATCH_SEED = 2, 1  # see the module docstring (kink margins)
MIN_POOL_GAP, MIN_RELU_MARGIN = 2e-5, 2e-6  # float64 margins the instance must keep
RTOL = 1e-4
FLOOR = 1e-3  # tensors below FLOOR * ||tree|| are compared against ||tree|| (see module docstring)
# XLA:CPU's backend (LLVM) optimisation level 0 halves the compile time of these second-order graphs
# (the same HLO, only less optimised machine code); the steps themselves take milliseconds here.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
FORMS = ("reverse", "forward_over_reverse")


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float64)
    return out


def _torch_flat(d):
    """Flat torch dict (torch layout) -> flat numpy dict in Flax layout."""
    params, _ = tr.torch_to_flax({k: v for k, v in d.items()})
    return {k: v.astype(np.float64) for k, v in _flat(params).items()}


def _rel_errors(got: dict, want: dict) -> dict:
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    total = np.sqrt(sum(np.sum(w ** 2) for w in want.values()))
    errs = {}
    for k in want:
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        norm = np.linalg.norm(want[k])
        denom = norm if norm >= FLOOR * total else max(total, 1e-30)
        errs[k] = float(np.linalg.norm(got[k] - want[k]) / denom)
    return errs


def assert_tree_close(got: dict, want: dict, what: str, rtol: float = RTOL):
    errs = _rel_errors(got, want)
    worst = max(errs, key=errs.get)
    print(f"{what}: worst relative error {errs[worst]:.2e} ({worst})")  # shown with -rP
    assert errs[worst] < rtol, f"{what}: worst relative error {errs[worst]:.3g} at {worst}"
    return errs[worst]


def assert_scalar_close(got, want, what: str, rtol: float = RTOL):
    got, want = float(got), float(want)
    print(f"{what}: relative error {abs(got - want) / abs(want):.2e}")  # shown with -rP
    assert abs(got - want) <= rtol * abs(want), f"{what}: jax {got!r} vs torch {want!r}"


def _networks(conv_impl):
    f_bb = models.ConvBackbone(FILTERS, CONVS_PER_BLOCK, False, models.XAVIER_UNIFORM, conv_impl)
    g_bb = models.ConvBackbone(FILTERS, CONVS_PER_BLOCK, False, models.XAVIER_NORMAL, conv_impl)
    f = models.MultiTaskNet(len(PSI), sum(PSI), f_bb, HEAD_WIDTH, models.XAVIER_UNIFORM)
    g = models.LabelGenerator(sum(PSI), g_bb, HEAD_WIDTH, models.XAVIER_NORMAL)
    return f, g


def _maxl(conv_impl, meta_form="reverse"):
    f, g = _networks(conv_impl)
    f_opt, g_opt, inner_lr = steps.reference_optimizers(steps_per_epoch=500)
    return Maxl(multitask=f, multitask_optimizer=f_opt, generator=g, psi=PSI,
                generator_optimizer=g_opt, inner_lr=inner_lr, meta_form=meta_form)


def _init_state(m: Maxl, seed: int = 0):
    """A fresh ``TrainState`` of ``m`` with the reference's initial weights, drawn by the torch port
    (``torch_reference.build``: Xavier-uniform f, Xavier-normal g) and converted to Flax layout.

    (Running ``m.init`` instead would give equally valid weights, but eagerly initialising 13 convs
    per network costs ~30 s of XLA compilation on a loaded 2-core CPU.) The converted trees must have
    exactly the structure and shapes of ``m.init``'s, which is checked here with ``jax.eval_shape``.
    Running statistics are perturbed away from 0 / 1 so that both terms of the momentum update count.
    """
    fp, fs, gp, gs = tr.build(PSI, filters=FILTERS, head_width=HEAD_WIDTH, seed=seed)
    f_params, f_stats = tr.torch_to_flax(fp, fs)
    g_params, g_stats = tr.torch_to_flax(gp, gs)
    rs = np.random.default_rng(seed + 1)
    def perturb(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, v: (rs.uniform(0.5, 1.5, v.shape) if str(p[-1].key) == "var"
                          else rs.normal(0, 0.1, v.shape)).astype(np.float32), tree)
    f_stats, g_stats = perturb(f_stats), perturb(g_stats)
    template = jax.eval_shape(lambda k: m.init(k, (32, 32, 3)), jax.random.key(seed))
    for name, got, want in [
            ("multitask_params", f_params, template.multitask_params),
            ("multitask_batch_stats", f_stats, template.multitask_batch_stats),
            ("generator params", g_params, template.method_state["params"]),
            ("generator batch_stats", g_stats, template.method_state["batch_stats"])]:
        assert (jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)), name
        assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(got),
                                                       jax.tree_util.tree_leaves(want))), name
    f_params, f_stats, g_params, g_stats = jax.tree_util.tree_map(
        jnp.asarray, (f_params, f_stats, g_params, g_stats))
    return TrainState(
        step=jnp.zeros((), jnp.int32), meta_step=jnp.zeros((), jnp.int32),
        multitask_params=f_params, multitask_batch_stats=f_stats,
        multitask_opt_state=m.multitask_optimizer.init(f_params),
        method_state={"params": g_params, "batch_stats": g_stats,
                      "opt_state": m.generator_optimizer.init(g_params)},
        rng=jax.random.key(seed))


def make_setup(conv_impl: str, weight_seed: int = WEIGHT_SEED, batch_seed: int = BATCH_SEED):
    """``(maxl, state, batch)`` for one conv implementation."""
    m = _maxl(conv_impl)
    state = _init_state(m, weight_seed)
    x = jax.random.normal(jax.random.key(batch_seed), (BATCH, 32, 32, 3), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3, 3, 2, 1, 0], jnp.int32)
    return m, state, {"image": x, "primary": y}


def jax_results(m: Maxl, state, batch) -> dict:
    """Everything the tests compare, from one compiled XLA program (one compilation instead of four:
    compiling dominates this test's time): eval-mode outputs, ``m.train_step`` and
    ``maxl.generator_meta_gradient`` in both forms."""
    def everything(state, batch):
        pri, aux = m.multitask.apply(state.multitask_variables, batch["image"], False)
        labels, _ = maxl.generate_labels(m.generator, m.generator_variables(state), batch["image"],
                                         batch["primary"], PSI, train=False)
        out = {"eval": (jax.nn.softmax(pri), jax.nn.softmax(aux), labels),
               "theta1": m.train_step(state, batch)}
        for form in FORMS:
            out[form] = maxl.generator_meta_gradient(
                m.multitask, m.generator, state.multitask_variables, m.generator_variables(state),
                batch["image"], batch["primary"], PSI, inner_lr=0.01, entropy_weight=0.2,
                form=form)
        return out

    compiled = jax.jit(everything).lower(state, batch).compile(compiler_options=COMPILER_OPTIONS)
    return compiled(state, batch)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the (tiny) torch side on one thread: on a shared 2-core machine, two OpenMP threads
    spin-waiting on each other made the torch theta2 step of this model take 7 s instead of 0.08 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module",
                params=["auto", pytest.param("xla", marks=pytest.mark.slow)])
def setup(request):
    """``(conv_impl, maxl, state, batch, jax results)`` for one conv implementation (``xla`` only
    with ``-m slow``: it doubles the compile time, and ``tests/test_conv.py`` already checks it
    against the matmul forms that ``auto`` uses on the CPU)."""
    m, state, batch = make_setup(request.param)
    return request.param, m, state, batch, jax_results(m, state, batch)


def _torch_inputs(state, batch):
    fp, fs = tr.flax_to_torch(state.multitask_params, state.multitask_batch_stats)
    gp, gs = tr.flax_to_torch(state.method_state["params"], state.method_state["batch_stats"])
    x = tr.images_from_nhwc(batch["image"])
    y = torch.tensor(np.asarray(batch["primary"]), dtype=torch.int64)
    return fp, fs, gp, gs, x, y


def _stats_flat(tstats):
    return {k: v.detach().numpy().astype(np.float64) for k, v in tstats.items()}


def kink_margins(fp, gp, x, y, inner_lr=0.01):
    """In float64 (torch port): the smallest ``|pre-ReLU|`` and the smallest gap between a 2x2
    max-pool window's winner (when > 0) and its runner-up, over every layer of f at theta1, of f at
    theta1+ (one SGD step of size ``inner_lr`` on ``L_pri + L_aux``) and of g."""
    fp = {k: v.detach().double().requires_grad_() for k, v in fp.items()}
    gp = {k: v.detach().double() for k, v in gp.items()}
    x = x.double()
    p_pri, p_aux = tr.forward_f(fp, None, x)
    labels = tr.forward_g(gp, None, x, y, PSI)
    loss = (tr.focal_loss(p_pri, torch.nn.functional.one_hot(y, len(PSI)).double())
            + tr.focal_loss(p_aux, labels))
    grads = torch.autograd.grad(loss, list(fp.values()))
    fast = {k: (v - inner_lr * g).detach() for (k, v), g in zip(fp.items(), grads)}
    relu, pool = np.inf, np.inf
    F = torch.nn.functional
    with torch.no_grad():
        for p in ({k: v.detach() for k, v in fp.items()}, fast, gp):
            h, layer = x, 0
            for n_convs in CONVS_PER_BLOCK:
                for _ in range(n_convs):
                    h = F.conv2d(h, p[f"backbone/conv_{layer}/kernel"],
                                 p[f"backbone/conv_{layer}/bias"], padding=1)
                    h = F.batch_norm(h, None, None, p[f"backbone/bn_{layer}/scale"],
                                     p[f"backbone/bn_{layer}/bias"], training=True, eps=tr.BN_EPS)
                    relu = min(relu, h.abs().min().item())
                    h = F.relu(h)
                    layer += 1
                b, c, hh, ww = h.shape
                windows = (h.reshape(b, c, hh // 2, 2, ww // 2, 2).transpose(3, 4)
                           .reshape(b, c, hh // 2, ww // 2, 4))
                top = windows.topk(2, dim=-1).values
                gap = top[..., 0] - top[..., 1]
                pool = min(pool, gap[top[..., 0] > 0].min().item())
                h = F.max_pool2d(h, 2, 2)
    return relu, pool


def test_instance_is_away_from_relu_and_maxpool_kinks(setup):
    """float32 rounding (~1e-7..1e-6 here) must not be able to flip a ReLU or a max-pool decision."""
    _, _, state, batch, _ = setup
    fp, _, gp, _, x, y = _torch_inputs(state, batch)
    relu, pool = kink_margins(fp, gp, x, y)
    print(f"kink margins (float64): min |pre-ReLU| {relu:.2e}, min max-pool gap {pool:.2e}")
    assert pool > MIN_POOL_GAP, f"a max-pool window's top two values are {pool:.2g} apart"
    assert relu > MIN_RELU_MARGIN, f"a pre-activation is {relu:.2g} from 0"


def test_converted_weights_give_the_same_forward(setup):
    """Sanity check of the set-up: identical weights give identical eval-mode outputs and labels."""
    _, _, state, batch, res = setup
    fp, fs, gp, gs, x, y = _torch_inputs(state, batch)
    pri, aux, labels = res["eval"]
    with torch.no_grad():
        t_pri, t_aux = tr.forward_f(fp, fs, x, train=False)
        t_labels = tr.forward_g(gp, gs, x, y, PSI, train=False)
    np.testing.assert_allclose(pri, t_pri.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux, t_aux.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(labels, t_labels.numpy(), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def torch_theta1(setup):
    """The torch port's theta1 step (lr 0.01) on the set-up, and the statistics it updated."""
    _, _, state, batch, _ = setup
    fp, fs, gp, gs, x, y = _torch_inputs(state, batch)
    out = tr.theta1_step(fp, fs, gp, gs, x, y, PSI, lr=0.01)  # fs, gs updated in place
    return out, fs, gs


def test_theta1_step_matches_torch(setup, torch_theta1):
    _, _, state, _, res = setup
    out, fs, gs = torch_theta1
    new_state, metrics = res["theta1"]

    assert_scalar_close(metrics["primary_loss"], out["loss_primary"], "primary loss")
    assert_scalar_close(metrics["auxiliary_loss"], out["loss_aux"], "auxiliary loss")
    assert_scalar_close(metrics["loss"], out["loss"], "total loss")

    old = _flat(state.multitask_params)
    new_jax = _flat(new_state.multitask_params)
    new_torch = _torch_flat(out["fparams"])
    assert_tree_close(new_jax, new_torch, "theta1 after one SGD step")
    # the step itself (new - old = -lr * grad), a much stricter comparison than the new parameters
    assert_tree_close({k: new_jax[k] - old[k] for k in old},
                      {k: new_torch[k] - old[k] for k in old}, "theta1 update")
    assert np.linalg.norm(new_jax["backbone/conv_5/kernel"] - old["backbone/conv_5/kernel"]) > 0

    # BatchNorm running statistics of f (and of g, whose train-mode forward also updates them)
    assert_tree_close(_flat(new_state.multitask_batch_stats), _stats_flat(fs), "f running stats")
    assert_tree_close(_flat(new_state.method_state["batch_stats"]), _stats_flat(gs),
                      "g running stats")
    # ... and their update from the initial statistics (momentum 0.1, unbiased variance)
    old_s = _flat(state.multitask_batch_stats)
    assert_tree_close({k: v - old_s[k] for k, v in _flat(new_state.multitask_batch_stats).items()},
                      {k: v - old_s[k] for k, v in _stats_flat(fs).items()},
                      "f running-stats update")


def test_bn_running_variance_is_unbiased(setup, torch_theta1):
    """Direct check of the first BN's running variance after theta1 (both sides, against numpy)."""
    _, _, state, batch, res = setup
    _, fs, _ = torch_theta1
    new_state, _ = res["theta1"]
    h = jax.lax.conv_general_dilated(batch["image"],
                                     state.multitask_params["backbone"]["conv_0"]["kernel"],
                                     (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])  # the conv bias is 0 at init
    n = h.shape[0]
    var_unbiased = h.var(0) * n / (n - 1)
    old = np.asarray(state.multitask_batch_stats["backbone"]["bn_0"]["var"], np.float64)
    want = 0.9 * old + 0.1 * var_unbiased
    np.testing.assert_allclose(new_state.multitask_batch_stats["backbone"]["bn_0"]["var"], want,
                               rtol=1e-5)
    np.testing.assert_allclose(fs["backbone/bn_0/var"].numpy(), want, rtol=1e-5)


@pytest.fixture(scope="module")
def torch_theta2(setup):
    """The torch port's theta2 step on the set-up (g's gradient, new g, running stats after)."""
    _, _, state, batch, _ = setup
    fp, fs, gp, gs, x, y = _torch_inputs(state, batch)
    out = tr.theta2_step(fp, fs, gp, gs, x, y, PSI, inner_lr=0.01, gen_lr=1e-3,
                         weight_decay=5e-4, entropy_weight=0.2)
    return out, fs, gs


@pytest.mark.parametrize("form", FORMS)
def test_meta_gradient_matches_torch(setup, torch_theta2, form):
    _, _, _, _, results = setup
    out, fs, gs = torch_theta2
    res = results[form]
    assert_scalar_close(res.meta_loss, out["meta_loss"], "meta objective")
    assert_scalar_close(res.metrics["primary_after"], out["loss_primary_after"], "L_pri(theta1+)")
    assert_scalar_close(res.metrics["entropy_term"], out["entropy_term"], "entropy term")
    assert_scalar_close(res.metrics["primary_before"] + res.metrics["auxiliary_before"],
                        out["loss_train"], "L_train(theta1)")

    want = _torch_flat(out["gen_grad"])
    got = _flat(res.grad)
    assert_tree_close(got, want, f"theta2 meta-gradient ({form})")
    # the gradient is not trivially small (the mixed second-order term reaches the backbone)
    assert np.linalg.norm(want["backbone/conv_0/kernel"]) > 1e-6
    assert_tree_close(_flat(res.multitask_batch_stats), _stats_flat(fs), "f stats after theta2")
    assert_tree_close(_flat(res.generator_batch_stats), _stats_flat(gs), "g stats after theta2")


@pytest.mark.slow
def test_theta2_step_matches_torch(setup, torch_theta2):
    """The full generator update (SGD 1e-3, weight decay 5e-4) of ``Maxl.meta_step`` (``-m slow``:
    one more compilation; the meta-gradient itself is checked above)."""
    conv_impl, _, state, batch, _ = setup
    out, fs, gs = torch_theta2
    m = _maxl(conv_impl, "forward_over_reverse")
    batches = {"train": batch}
    new_state, metrics = jax.jit(m.meta_step).lower(state, batches).compile(
        compiler_options=COMPILER_OPTIONS)(state, batches)
    assert_scalar_close(metrics["meta_loss"], out["meta_loss"], "meta objective")
    old = _flat(state.method_state["params"])
    new_jax = _flat(new_state.method_state["params"])
    new_torch = _torch_flat(out["gparams"])
    assert_tree_close(new_jax, new_torch, "theta2 after one step")
    # the step -1e-3 * (grad + 5e-4 * theta2) is ~1e-5 of theta2, so in float32 new - old carries
    # few significant digits on either side: per tensor, allow 1e-4 of the step (of the whole tree's
    # step for the ~0 conv-bias steps, as in _rel_errors) plus 2 ulp of theta2.
    d_jax = {k: new_jax[k] - old[k] for k in old}
    d_torch = {k: new_torch[k] - old[k] for k in old}
    total = np.sqrt(sum(np.sum(v ** 2) for v in d_torch.values()))
    for k in old:
        norm = np.linalg.norm(d_torch[k])
        scale = norm if norm >= FLOOR * total else total
        ulp = np.spacing(np.abs(old[k]).astype(np.float32)).astype(np.float64)
        assert np.linalg.norm(d_jax[k] - d_torch[k]) <= RTOL * scale + 2 * np.linalg.norm(ulp), k
    assert_tree_close(_flat(new_state.multitask_batch_stats), _stats_flat(fs), "f stats")
    assert_tree_close(_flat(new_state.method_state["batch_stats"]), _stats_flat(gs), "g stats")

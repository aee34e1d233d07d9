"""Self-checks of the PyTorch reference port (benchmarks/torch_reference.py) on a tiny VGG."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional (bench) dependency")
tr = pytest.importorskip("benchmarks.torch_reference")

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_torch_reference")

PSI = [2, 3]  # 2 primary classes, 5 auxiliary classes
TINY = (4, 4, 4, 4, 4)


@pytest.fixture(scope="module")
def tiny64():
    """float64 tiny nets, a batch of 4 images 32x32, labels covering both primary classes."""
    fp, fs, gp, gs = tr.build(PSI, filters=TINY, head_width=6, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    return fp, fs, gp, gs, x, y


def _meta(fp, fs, gp, gs, x, y, **kw):
    fs, gs = ({k: v.clone() for k, v in d.items()} for d in (fs, gs))  # keep the fixture's stats
    return tr.meta_objective(fp, fs, gp, gs, x, y, PSI, **kw)["meta_loss"].item()


@pytest.mark.parametrize("entropy_weight", [0.0, 0.2])
def test_meta_gradient_matches_central_difference(tiny64, entropy_weight):
    """theta2's meta-gradient is the exact (second-order) derivative of the meta objective.

    With entropy_weight=0 the generator reaches the objective only through theta1+, i.e. only through
    the differentiated inner step: a first-order (detached) step would give exactly 0 here.
    """
    fp, fs, gp, gs, x, y = tiny64
    fs0, gs0 = ({k: v.clone() for k, v in d.items()} for d in (fs, gs))
    out = tr.theta2_step(fp, fs0, gp, gs0, x, y, PSI, entropy_weight=entropy_weight)
    h = 1e-5
    for key in ["head/out/kernel", "backbone/conv_3/kernel", "backbone/bn_5/scale"]:
        grad = out["gen_grad"][key]
        idx = int(torch.argmax(grad.abs()))  # the most sensitive entry of that tensor
        assert grad.abs().max() > 1e-8
        vals = []
        for sign in (1, -1):
            gp2 = {k: v.detach().clone() for k, v in gp.items()}
            gp2[key].view(-1)[idx] += sign * h
            vals.append(_meta(fp, fs, gp2, gs, x, y, entropy_weight=entropy_weight))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert grad.view(-1)[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-10), key


def test_theta2_generator_update_is_sgd_with_weight_decay(tiny64):
    fp, fs, gp, gs, x, y = tiny64
    fs, gs = ({k: v.clone() for k, v in d.items()} for d in (fs, gs))  # updated in place
    out = tr.theta2_step(fp, fs, gp, gs, x, y, PSI, gen_lr=0.1, weight_decay=0.5)
    for k in gp:
        want = gp[k].detach() - 0.1 * (out["gen_grad"][k] + 0.5 * gp[k].detach())
        torch.testing.assert_close(out["gparams"][k], want)


def test_mask_softmax_rows_sum_to_one_and_stay_in_block(tiny64):
    _, _, gp, gs, x, y = tiny64
    p = tr.forward_g(gp, {k: v.clone() for k, v in gs.items()}, x, y, PSI)
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=p.dtype), rtol=0, atol=1e-12)
    in_block = torch.stack([p[i, :2].sum() if c == 0 else p[i, 2:].sum()
                            for i, c in enumerate(y.tolist())])
    assert torch.all(1 - in_block < 1e-6)  # off-block mass ~ 1e-8 per entry
    assert torch.all(1 - in_block > 0)  # ... but not exactly zero (mask 1e-8, not 0)
    # equals the literal exp(z)*mask / sum(exp(z)*mask) form
    z = torch.tensor([[0.3, -1.0, 2.0, 0.1, 0.0]], dtype=torch.float64)
    mask = tr.aux_mask(torch.tensor([1]), PSI, dtype=torch.float64)
    torch.testing.assert_close(tr.mask_softmax(z, mask), z.exp() * mask / (z.exp() * mask).sum())


def test_focal_loss_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    row0 = -(0.3 ** 2) * math.log(0.7)  # 0.0321007...
    row1 = -(0.5 * 0.5 ** 2 * math.log(0.5) + 0.5 * 0.75 ** 2 * math.log(0.25))  # 0.4765387...
    assert tr.focal_loss(p, y).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert tr.focal_loss(p, y).item() == pytest.approx(0.2543197, abs=1e-6)


def test_theta1_step_is_one_sgd_step_and_updates_running_stats(tiny64):
    fp, fs, gp, gs, x, y = tiny64
    fs0 = {k: v.clone() for k, v in fs.items()}
    out = tr.theta1_step(fp, fs0, gp, {k: v.clone() for k, v in gs.items()}, x, y, PSI, lr=0.5,
                         diagnostics=True)
    # the loss, recomputed from scratch, and its gradient give the returned update
    p_pri, p_aux = tr.forward_f(fp, None, x)
    labels = tr.forward_g(gp, None, x, y, PSI).detach()
    loss = tr.focal_loss(p_pri, torch.eye(2, dtype=torch.float64)[y]) + tr.focal_loss(p_aux, labels)
    torch.testing.assert_close(loss.detach(), out["loss"])
    grads = torch.autograd.grad(loss, list(fp.values()))
    for (k, p), g in zip(fp.items(), grads):
        torch.testing.assert_close(out["fparams"][k], p.detach() - 0.5 * g)
    assert -1 <= out["cos_sim"].item() <= 1
    # running stats: momentum 0.1 towards the batch mean of the first BN's input
    h = torch.nn.functional.conv2d(x, fp["backbone/conv_0/kernel"], fp["backbone/conv_0/bias"],
                                   padding=1)
    torch.testing.assert_close(fs0["backbone/bn_0/mean"], 0.1 * h.mean((0, 2, 3)).detach())
    # and a forward at fast weights with stats=None leaves statistics alone
    before = {k: v.clone() for k, v in fs0.items()}
    tr.forward_f(out["fparams"], None, x)
    for k in before:
        torch.testing.assert_close(fs0[k], before[k], rtol=0, atol=0)


def test_flax_layout_conversion_matches_nhwc_conv_and_round_trips():
    """HWIO kernels / (in,out) dense kernels convert to torch layout with the same function."""
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
    w = rng.normal(size=(7, 4)).astype(np.float32)
    x = rng.normal(size=(2, 6, 6, 5)).astype(np.float32)
    params = {"backbone": {"conv_0": {"kernel": k, "bias": np.zeros(7, np.float32)}},
              "head": {"out": {"kernel": w, "bias": np.ones(4, np.float32)}}}
    stats = {"backbone": {"bn_0": {"mean": np.zeros(7, np.float32), "var": np.ones(7, np.float32)}}}
    tp, ts = tr.flax_to_torch(params, stats)
    want = np.asarray(jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")))
    got = torch.nn.functional.conv2d(tr.images_from_nhwc(x), tp["backbone/conv_0/kernel"], padding=1)
    np.testing.assert_allclose(got.detach().numpy().transpose(0, 2, 3, 1), want, rtol=1e-5, atol=1e-5)
    v = rng.normal(size=(3, 7)).astype(np.float32)
    got = torch.nn.functional.linear(torch.tensor(v), tp["head/out/kernel"], tp["head/out/bias"])
    np.testing.assert_allclose(got.detach().numpy(), v @ w + 1, rtol=1e-5, atol=1e-5)
    back_p, back_s = tr.torch_to_flax(tp, ts)
    np.testing.assert_array_equal(back_p["backbone"]["conv_0"]["kernel"], k)
    np.testing.assert_array_equal(back_p["head"]["out"]["kernel"], w)
    np.testing.assert_array_equal(back_s["backbone"]["bn_0"]["var"], stats["backbone"]["bn_0"]["var"])

"""A functional PyTorch port of the reference MAXL training steps (speed baseline and parity oracle).

This re-implements, from the facts in ``docs/maxl-reference.md``, the two steps of one MAXL epoch
as the authors' PyTorch code performs them, with every network written as plain functions of a
parameter dictionary (``torch.nn.functional`` only), so that the exact weights of our Flax models can
be loaded and both implementations compared step by step.

Parameters and statistics
-------------------------
All parameter / statistics containers are *flat* ``dict[str, torch.Tensor]`` whose keys are the Flax
paths joined with ``"/"`` and whose tensors are in PyTorch layout:

====================================  ==============================  ==============================
Flax leaf (numpy)                      torch key                       torch layout
====================================  ==============================  ==============================
``backbone/conv_i/kernel`` (3,3,I,O)   ``"backbone/conv_i/kernel"``     (O,I,3,3) = ``transpose(3,2,0,1)``
``backbone/conv_i/bias`` (O,)          ``"backbone/conv_i/bias"``       (O,)
``backbone/bn_i/scale``, ``/bias``     same keys                        (C,)
``<head>/hidden|out/kernel`` (in,out)  same key                         (out,in) = ``.T``
``<head>/hidden|out/bias``             same key                         (out,)
batch_stats ``backbone/bn_i/mean|var`` ``"backbone/bn_i/mean|var"``     (C,) (running statistics)
====================================  ==============================  ==============================

``i`` runs over 0..12; the multi-task network f has heads ``primary_head`` (``len(psi)`` outputs) and
``auxiliary_head`` (``sum(psi)`` outputs); the label generator g has one head ``head`` (``sum(psi)``).
Use :func:`flax_to_torch` / :func:`torch_to_flax` to convert. Images are NCHW float tensors
(:func:`images_from_nhwc` converts an NHWC array); labels are int64 tensors of primary classes.

Networks (VGG-16-BN, CIFAR variant)
-----------------------------------
13 x [conv3x3 (padding 1) -> BatchNorm (eps 1e-5, momentum 0.1) -> ReLU] with 2,2,3,3,3 convs per
block, a 2x2 max-pool after each block, flatten; each head is Linear(512)-ReLU-Linear(K). f's heads
end in a softmax; g's head ends in the mask softmax ``exp(z)*mask / sum(exp(z)*mask)`` (computed as
``softmax(z + log(mask))``, the same function), mask 1 on the true primary class's block of ``psi``
and 1e-8 elsewhere. BatchNorm in ``train`` mode uses batch statistics and, when a statistics dict is
given, updates it *in place* the way ``nn.BatchNorm2d`` does (momentum 0.1, unbiased variance);
``stats=None`` in train mode uses batch statistics and touches nothing (the reference's forward at
the fast weights). ``train=False`` normalises with the running statistics.

Steps (see :func:`theta1_step`, :func:`theta2_step`)
----------------------------------------------------
Both steps are functional: they return new parameter dicts (fresh leaf tensors) and leave the input
parameter dicts unchanged; only the running-statistics dicts are updated in place (both networks run
in train mode in both passes, as in the reference). ``original_cost=True`` makes a step also do the
extra backward work the original code does (its ``.backward()`` also fills gradients of the other
network, which are then discarded): results are identical, only the time changes.

Run ``python -m benchmarks.torch_reference --batch 100 --repeats 3`` for the full-size timings.
"""

from __future__ import annotations

import argparse
import time
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FILTERS = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention (= Flax momentum 0.9)
LOG_EPS = 1e-20  # inside the log of the focal loss and of the entropy term
MASK_OFF = 1e-8  # mask value outside the true primary class's block

Params = dict  # flat dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Parameters: random init and conversion from / to Flax trees
# ----------------------------------------------------------------------------------------------
def _conv_channels(filters: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) channels of the 13 convolutions."""
    chans, cin = [], 3
    for f, n in zip(filters, CONVS_PER_BLOCK):
        for _ in range(n):
            chans.append((cin, f))
            cin = f
    return chans


def _pool_after() -> set[int]:
    """Indices of the convolutions followed by the 2x2 max-pool (last of each block)."""
    return set(np.cumsum(CONVS_PER_BLOCK) - 1)


def _init_net(heads: Mapping[str, int], filters, width, init_, gen: torch.Generator, device, dtype):
    def w(*shape):
        t = torch.empty(*shape, dtype=dtype)
        init_(t, generator=gen)
        return t

    p, s = {}, {}
    for i, (cin, cout) in enumerate(_conv_channels(filters)):
        p[f"backbone/conv_{i}/kernel"] = w(cout, cin, 3, 3)
        p[f"backbone/conv_{i}/bias"] = torch.zeros(cout, dtype=dtype)
        p[f"backbone/bn_{i}/scale"] = torch.ones(cout, dtype=dtype)
        p[f"backbone/bn_{i}/bias"] = torch.zeros(cout, dtype=dtype)
        s[f"backbone/bn_{i}/mean"] = torch.zeros(cout, dtype=dtype)
        s[f"backbone/bn_{i}/var"] = torch.ones(cout, dtype=dtype)
    for head, k in heads.items():
        p[f"{head}/hidden/kernel"] = w(width, filters[-1])
        p[f"{head}/hidden/bias"] = torch.zeros(width, dtype=dtype)
        p[f"{head}/out/kernel"] = w(k, width)
        p[f"{head}/out/bias"] = torch.zeros(k, dtype=dtype)
    p = {k: v.to(device).requires_grad_() for k, v in p.items()}
    s = {k: v.to(device) for k, v in s.items()}
    return p, s


def build(psi: Sequence[int], device="cpu", *, filters: Sequence[int] = FILTERS,
          head_width: int = 512, seed: int = 0, dtype=torch.float32):
    """Randomly initialised ``(fparams, fstats, gparams, gstats)`` as in the reference.

    f: Xavier-uniform conv / dense weights; g: Xavier-normal; biases 0, BN scale 1 / bias 0, running
    mean 0 / var 1. ``filters`` shrinks the VGG widths and ``head_width`` the heads' hidden layer
    (tests). For weights identical to a Flax model's use :func:`flax_to_torch` instead.
    """
    gen = torch.Generator().manual_seed(seed)
    init = torch.nn.init
    fparams, fstats = _init_net({"primary_head": len(psi), "auxiliary_head": int(sum(psi))},
                                filters, head_width, init.xavier_uniform_, gen, device, dtype)
    gparams, gstats = _init_net({"head": int(sum(psi))},
                                filters, head_width, init.xavier_normal_, gen, device, dtype)
    return fparams, fstats, gparams, gstats


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def flax_to_torch(params, batch_stats=None, *, device="cpu", dtype=torch.float32):
    """Flax ``params`` / ``batch_stats`` trees (numpy or jax arrays) -> flat torch dicts.

    Returns ``(tparams, tstats)``; parameters are leaf tensors with ``requires_grad=True``;
    ``tstats`` is ``{}`` when ``batch_stats`` is None. Layouts: see the module docstring.
    """
    tparams = {}
    for key, v in _flatten(params):
        a = np.asarray(v)
        if key.endswith("kernel") and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif key.endswith("kernel") and a.ndim == 2:
            a = a.T  # (in, out) -> (out, in)
        tparams[key] = torch.tensor(np.ascontiguousarray(a), dtype=dtype, device=device,
                                    requires_grad=True)
    tstats = {key: torch.tensor(np.asarray(v), dtype=dtype, device=device)
              for key, v in _flatten(batch_stats or {})}
    return tparams, tstats


def torch_to_flax(tparams, tstats=None):
    """Inverse of :func:`flax_to_torch`: nested numpy ``(params, batch_stats)`` in Flax layout."""
    def nest(flat):
        out = {}
        for key, t in flat.items():
            a = t.detach().cpu().numpy()
            if key.endswith("kernel") and a.ndim == 4:
                a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            elif key.endswith("kernel") and a.ndim == 2:
                a = a.T
            node = out
            *path, leaf = key.split("/")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = np.ascontiguousarray(a)
        return out
    return nest(tparams), nest(tstats or {})


def images_from_nhwc(x, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """NHWC array (our JAX input layout) -> NCHW torch tensor."""
    return torch.tensor(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)), dtype=dtype,
                        device=device)


# ----------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------
# Backbone layouts, told apart by their number of convolutions: (convs per block, global average
# pooling instead of flatten). 13: the reference CIFAR VGG-16-BN; 3: maxl_jax's small CPU network
# (``models.make_backbone("small")``; only through :func:`flax_to_torch`, for the step benchmark).
LAYOUTS = {sum(CONVS_PER_BLOCK): (CONVS_PER_BLOCK, False), 3: ((1, 1, 1), True)}


def _layout(p: Params):
    n = sum(1 for k in p if k.startswith("backbone/conv_") and k.endswith("/kernel"))
    if n not in LAYOUTS:
        raise ValueError(f"no backbone layout with {n} convolutions; known: {sorted(LAYOUTS)}")
    convs_per_block, global_pool = LAYOUTS[n]
    return n, set(np.cumsum(convs_per_block) - 1), global_pool


def _backbone(p: Params, stats: Params | None, x: torch.Tensor, train: bool) -> torch.Tensor:
    n_convs, pools, global_pool = _layout(p)
    for i in range(n_convs):
        x = F.conv2d(x, p[f"backbone/conv_{i}/kernel"], p[f"backbone/conv_{i}/bias"], padding=1)
        if train and stats is None:  # batch statistics, nothing updated
            mean = var = None
        else:  # train: batch stats + in-place running update; eval: running stats
            mean, var = stats[f"backbone/bn_{i}/mean"], stats[f"backbone/bn_{i}/var"]
        x = F.batch_norm(x, mean, var, p[f"backbone/bn_{i}/scale"], p[f"backbone/bn_{i}/bias"],
                         training=train, momentum=BN_MOMENTUM, eps=BN_EPS)
        x = F.relu(x)
        if i in pools:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
    return x.mean((2, 3)) if global_pool else x.flatten(1)


def _head(p: Params, name: str, h: torch.Tensor) -> torch.Tensor:
    """Logits of head ``name``: Linear - ReLU - Linear."""
    h = F.relu(F.linear(h, p[f"{name}/hidden/kernel"], p[f"{name}/hidden/bias"]))
    return F.linear(h, p[f"{name}/out/kernel"], p[f"{name}/out/bias"])


def forward_f(fparams: Params, fstats: Params | None, x: torch.Tensor, train: bool = True):
    """Multi-task network f: returns ``(p_primary, p_aux)`` probabilities (softmax outputs).

    ``train=True``: BN with batch statistics, updating ``fstats`` in place unless it is None.
    ``train=False``: BN with the running statistics ``fstats``.
    """
    h = _backbone(fparams, fstats, x, train)
    return (F.softmax(_head(fparams, "primary_head", h), dim=1),
            F.softmax(_head(fparams, "auxiliary_head", h), dim=1))


def aux_mask(y_primary: torch.Tensor, psi: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """(B, sum(psi)) mask: 1 on the auxiliary block of each example's primary class, 1e-8 elsewhere."""
    owner = torch.repeat_interleave(torch.arange(len(psi), device=y_primary.device),
                                    torch.as_tensor(list(psi), device=y_primary.device))
    on = owner[None, :] == y_primary[:, None]
    return torch.where(on, torch.ones((), dtype=dtype, device=y_primary.device),
                       torch.full((), MASK_OFF, dtype=dtype, device=y_primary.device))


def mask_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(z)*mask / sum(exp(z)*mask)`` along dim 1, evaluated as ``softmax(z + log(mask))``."""
    return F.softmax(logits + torch.log(mask), dim=1)


def forward_g(gparams: Params, gstats: Params | None, x: torch.Tensor, y_primary: torch.Tensor,
              psi: Sequence[int], train: bool = True) -> torch.Tensor:
    """Label generator g: soft auxiliary labels (B, sum(psi)); rows sum to 1.

    BN as in :func:`forward_f` (the reference always runs g in train mode, updating its running
    statistics, which nothing ever reads).
    """
    z = _head(gparams, "head", _backbone(gparams, gstats, x, train))
    return mask_softmax(z, aux_mask(y_primary, psi, dtype=z.dtype))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Batch mean of ``-sum_k y_k (1-p_k)^gamma log(p_k + 1e-20)``; ``target`` one-hot or soft."""
    return -(target * (1 - p) ** gamma * torch.log(p + LOG_EPS)).sum(dim=1).mean()


def neg_entropy(p: torch.Tensor) -> torch.Tensor:
    """``sum_k pbar_k log(pbar_k + 1e-20)`` with ``pbar`` the batch mean of ``p`` (a negative entropy)."""
    pbar = p.mean(dim=0)
    return (pbar * torch.log(pbar + LOG_EPS)).sum()


def _one_hot(y: torch.Tensor, k: int, dtype) -> torch.Tensor:
    return F.one_hot(y, k).to(dtype)


def _sgd(params: Params, grads: Sequence[torch.Tensor], lr: float, wd: float = 0.0) -> Params:
    """New leaf tensors ``p - lr * (g + wd * p)``."""
    with torch.no_grad():
        return {k: (p - lr * (g + wd * p)).requires_grad_()
                for (k, p), g in zip(params.items(), grads)}


# ----------------------------------------------------------------------------------------------
# The two training steps
# ----------------------------------------------------------------------------------------------
def theta1_step(fparams, fstats, gparams, gstats, x, y, psi, lr=0.01, diagnostics=False,
                original_cost=False) -> dict:
    """Pass A: one SGD step on f's parameters with ``L = L_pri + L_aux`` (g's labels as constants).

    f and g both run in train mode (their running statistics are updated in place).
    ``diagnostics=True`` also takes the reference's two extra gradients (of ``L_pri`` and of
    ``L_aux`` separately w.r.t. f's parameters, ``retain_graph``) and returns their mean cosine
    similarity over the backbone parameters as ``cos_sim`` (torch's ``cosine_similarity`` along
    dim 0 of each tensor, in torch layout, as the reference logs it). ``original_cost=True`` lets the
    backward also run into g's parameters, as the original does (those gradients are discarded).

    Returns ``{"loss": L, "loss_primary", "loss_aux", "fparams": new f params, ["cos_sim"]}``
    (losses are detached scalar tensors).
    """
    names = list(fparams)
    p_pri, p_aux = forward_f(fparams, fstats, x, train=True)
    with torch.set_grad_enabled(original_cost):
        labels = forward_g(gparams, gstats, x, y, psi, train=True)
    l_pri = focal_loss(p_pri, _one_hot(y, len(psi), p_pri.dtype))
    l_aux = focal_loss(p_aux, labels if original_cost else labels.detach())
    loss = l_pri + l_aux
    out = {"loss": loss.detach(), "loss_primary": l_pri.detach(), "loss_aux": l_aux.detach()}
    leaves = [fparams[k] for k in names]
    if diagnostics:
        g1 = torch.autograd.grad(l_pri, leaves, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(l_aux, leaves, retain_graph=True, allow_unused=True)
        shared = [i for i, k in enumerate(names) if k.startswith("backbone/")]
        cos = [torch.mean(F.cosine_similarity(g1[i], g2[i], dim=0)) for i in shared]
        out["cos_sim"] = (sum(cos) / len(cos)).detach()
    if original_cost:
        grads = torch.autograd.grad(loss, leaves + list(gparams.values()))[: len(names)]
    else:
        grads = torch.autograd.grad(loss, leaves)
    out["fparams"] = _sgd(fparams, grads, lr)
    return out


def meta_objective(fparams, fstats, gparams, gstats, x, y, psi, inner_lr=0.01,
                   entropy_weight=0.2) -> dict:
    """Pass B's meta objective, differentiable w.r.t. g's (and f's) parameters.

    f forward in train mode (updates ``fstats``), g forward (updates ``gstats``);
    ``L_train = L_pri + L_aux`` with g's labels *not* detached;
    ``fast = p - inner_lr * dL_train/dp`` over all of f's parameters (``create_graph=True``);
    ``meta = L_pri(f(x; fast)) + entropy_weight * neg_entropy(labels)``, the forward at ``fast``
    using batch statistics without touching any running statistics.

    Returns ``{"meta_loss", "loss_primary_after", "entropy_term", "loss_train"}`` (tensors with graph).
    """
    p_pri, p_aux = forward_f(fparams, fstats, x, train=True)
    labels = forward_g(gparams, gstats, x, y, psi, train=True)
    y1 = _one_hot(y, len(psi), p_pri.dtype)
    loss_train = focal_loss(p_pri, y1) + focal_loss(p_aux, labels)
    names = list(fparams)
    grads = torch.autograd.grad(loss_train, [fparams[k] for k in names], create_graph=True)
    fast = {k: fparams[k] - inner_lr * g for k, g in zip(names, grads)}
    p_pri_fast, _ = forward_f(fast, None, x, train=True)
    l_pri_fast = focal_loss(p_pri_fast, y1)
    ent = neg_entropy(labels)
    return {"meta_loss": l_pri_fast + entropy_weight * ent, "loss_primary_after": l_pri_fast,
            "entropy_term": ent, "loss_train": loss_train}


def theta2_step(fparams, fstats, gparams, gstats, x, y, psi, inner_lr=0.01, gen_lr=1e-3,
                weight_decay=5e-4, entropy_weight=0.2, original_cost=False) -> dict:
    """Pass B: one meta step on g's parameters through a differentiated SGD step of f.

    See :func:`meta_objective`; the meta-gradient is taken w.r.t. g's parameters only
    (``original_cost=True``: also w.r.t. f's, as the original's ``.backward()`` does, then discarded),
    then ``g <- g - gen_lr * (grad + weight_decay * g)`` (SGD with L2 weight decay).

    Returns ``{"meta_loss", "loss_primary_after", "entropy_term", "loss_train"`` (detached scalars),
    ``"gen_grad"`` (dict like gparams: the raw meta-gradient, without weight decay),
    ``"gparams"`` (the new g parameters)}.
    """
    m = meta_objective(fparams, fstats, gparams, gstats, x, y, psi, inner_lr, entropy_weight)
    gnames = list(gparams)
    leaves = [gparams[k] for k in gnames]
    if original_cost:
        leaves = leaves + list(fparams.values())
    grads = torch.autograd.grad(m["meta_loss"], leaves)[: len(gnames)]
    out = {k: v.detach() for k, v in m.items()}
    out["gen_grad"] = dict(zip(gnames, grads))
    out["gparams"] = _sgd(gparams, grads, gen_lr, weight_decay)
    return out


# ----------------------------------------------------------------------------------------------
# Speed baseline
# ----------------------------------------------------------------------------------------------
def _time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--original-cost", action="store_true",
                    help="also do the original's discarded backward work into the other network")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    psi = [5] * 20
    fp, fs, gp, gs = build(psi)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, len(psi), (args.batch,), generator=gen)
    oc = args.original_cost
    rows = [
        ("theta1 step", lambda: theta1_step(fp, fs, gp, gs, x, y, psi, original_cost=oc)),
        ("theta1 step + diagnostics",
         lambda: theta1_step(fp, fs, gp, gs, x, y, psi, diagnostics=True, original_cost=oc)),
        ("theta2 meta step", lambda: theta2_step(fp, fs, gp, gs, x, y, psi, original_cost=oc)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} after a warm-up, original_cost={oc}")
    print("| step | s |\n| --- | --- |")
    for name, fn in rows:
        print(f"| {name} | {_time(fn, args.repeats):.2f} |", flush=True)


if __name__ == "__main__":
    main()

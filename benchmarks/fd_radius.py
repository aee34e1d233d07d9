"""How the finite-difference meta-gradient's error depends on its radius, in float64 and float32.

    python -m benchmarks.fd_radius                       # small CNN width 16, batch 32, Fashion-MNIST
    python -m benchmarks.fd_radius --vgg16               # also VGG-16 at 4 radii, batch 4

MAXL's first-order form (``maxl_jax.meta.finite_difference``) replaces the mixed second derivative of
the one-step meta-gradient by a central difference of ``grad_s L_in`` at ``theta1 +- eps w`` with
``eps = radius / ||w||``: ``radius`` is the absolute Euclidean length of the step in theta1's space
(all of f's parameters as one vector), whatever ``||theta1||`` is. The meta-gradient w.r.t. theta2 is

    g = J^T [dL_out/ds|direct + M],      M = (d grad_theta1 L_in / d s)^T w,

``J`` the generator's Jacobian: a first-order term (MAXL's entropy term, ``J^T dL_out/ds|direct``)
that every form computes exactly, and the second-order term ``J^T M`` that the finite difference
approximates. Here the first-order term is the meta-gradient with ``M = 0`` (the module's own
assembly, ``one_step_meta_gradient``, with a zero mixed term), so the second-order part of any form
is that form minus it; the finite difference's whole error lies in that part.

At a point after ``--train-steps`` MAXL steps (float32, the reference's optimisers and rates) on real
Fashion-MNIST (``$MAXL_SHARED_DATA``, default ``../shared/data``; ``--data generated``: normal noise),
on one held-out batch, for each radius and precision: the relative error of the full meta-gradient
and of its second-order part against the exact one (``form="reverse"`` in float64, the same weights
cast up), the cosine to it, and how many ReLUs and 2x2 max-pool windows of f switch between the two
perturbed forwards (a pre-activation ``> 0`` at one point and ``<= 0`` at the other; a window whose
gradient goes to a different entry, or to none, as its arg-max or its positivity changes), counted
on the exact points the module evaluates (captured inside it) with flax's ``capture_intermediates``.
Float32 rows run with ``jax_enable_x64`` off (as training does), float64 rows with it on.

The radius enters the compiled function as an argument, so one compile serves every radius. The
meta-gradient is ``maxl.generator_meta_gradient(form="finite_difference")`` itself; the radius (fixed there at
the reference's 0.01) is set by swapping ``finite_difference.finite_difference_meta_gradient`` for
a copy with that radius while the function is traced.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import os
import pathlib
import platform
import sys
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from benchmarks.steps import cpu_model, num_cores
from experiments.configs import default
from maxl_jax import data, maxl, methods
from maxl_jax.meta import finite_difference as fd_module

RADII = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
VGG_RADII = (1e-2, 1e-3, 1e-4, 1e-5)
OUT = pathlib.Path(__file__).resolve().parent / "results" / "fd_radius.md"


# ------------------------------------------------------------------------------------------- data
def load_images(kind: str, seed: int):
    """``(images float32 (N, 28, 28, 1) normalised, labels int32 (N,), description)``."""
    if kind in ("auto", "fashion_mnist"):
        root = data.shared_data_dir()
        folder = root / "fashion_mnist" if root is not None else None
        if folder is not None and folder.is_dir():
            images, labels = data.load_fashion_mnist_idx(folder)["train"]
            return (np.asarray(data.normalize(images)), labels,
                    f"Fashion-MNIST train ({folder})")
        if kind == "fashion_mnist":
            raise SystemExit(f"no Fashion-MNIST under ${data.SHARED_DATA_ENV} or ../shared/data; "
                             f"use --data generated")
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(4096, 28, 28, 1)).astype(np.float32),
            rng.integers(0, 10, 4096).astype(np.int32), "generated (normal noise, random labels)")


def batch_at(images, labels, idx, pad_to: int | None = None):
    x = images[idx]
    if pad_to is not None:  # VGG-16 needs 32x32: zero-pad the normalised 28x28 images, 3 channels
        p = (pad_to - x.shape[1]) // 2
        x = np.repeat(np.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), 3, axis=-1)
    return {"image": x, "primary": labels[idx]}


# ----------------------------------------------------------------------------- the training point
def build(arch: str, width: int, batch: int) -> methods.Method:
    config = default.get_config()
    config.method, config.arch, config.width, config.batch_size = "maxl", arch, width, batch
    config.dataset = "fashion_mnist"
    setup = methods.Setup(num_primary=10, psi_human=None, steps_per_epoch=60_000 // batch,
                          dataset="fashion_mnist")
    return methods.build(config, setup)


def train(m: methods.Method, images, labels, steps: int, batch: int, shape, seed: int,
          pad_to: int | None):
    """``steps`` rounds of one theta1 step and one theta2 (meta) step, float32."""
    state = m.init(jax.random.key(seed), shape)
    train_step, meta_step = jax.jit(m.train_step), jax.jit(m.meta_step)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        b1 = batch_at(images, labels, rng.integers(0, len(labels), batch), pad_to)
        b2 = batch_at(images, labels, rng.integers(0, len(labels), batch), pad_to)
        state, _ = train_step(state, b1)
        state, _ = meta_step(state, {"train": b2})
    return jax.block_until_ready(state)


# ---------------------------------------------------------------------- the estimators and flips
@contextlib.contextmanager
def swapped_fd(replacement):
    """``finite_difference_meta_gradient`` replaced (``meta.meta_gradient`` imports it by name at
    each call) while the body traces."""
    original = fd_module.finite_difference_meta_gradient
    fd_module.finite_difference_meta_gradient = replacement
    try:
        yield
    finally:
        fd_module.finite_difference_meta_gradient = original


@contextlib.contextmanager
def recording_points(points: list):
    """Records the parameter points at which the module's central difference evaluates
    ``grad_s L_in`` (``theta1 + eps w``, then ``theta1 - eps w``)."""
    original = fd_module.one_step_meta_gradient

    def wrapper(inner, outer, params, hyper, optimizer, mixed_term):
        def recorded(grad_hyper_at, w):
            def at(p):
                points.append(p)
                return grad_hyper_at(p)
            return mixed_term(at, w)
        return original(inner, outer, params, hyper, optimizer, recorded)

    fd_module.one_step_meta_gradient = wrapper
    try:
        yield
    finally:
        fd_module.one_step_meta_gradient = original


def first_order_only(inner_loss, outer_loss, params, hyper, optimizer, **_):
    """The one-step meta-gradient with its mixed (second-order) term set to zero."""
    zero = lambda grad_hyper_at, w: jax.tree_util.tree_map(jnp.zeros_like, hyper)  # noqa: E731
    return fd_module.one_step_meta_gradient(inner_loss, outer_loss, params, hyper, optimizer, zero)


def kink_routes(m: methods.Method, params, batch_stats, x):
    """Per ReLU of f, ``pre-activation > 0``; per 2x2 max-pool window, the entry its gradient goes
    to (arg-max of the pre-activations, or -1 if the maximum is <= 0), in the inner loss's forward
    (train mode, batch statistics)."""
    _, state = m.multitask.apply({"params": params, "batch_stats": batch_stats}, x, True,
                                 capture_intermediates=True,
                                 mutable=["batch_stats", "intermediates"])
    inter = state["intermediates"]
    bb = m.multitask.backbone
    relu, pool = [], []
    layer = 0
    for n_convs in bb.convs_per_block:
        for i in range(n_convs):
            z = inter["backbone"][f"bn_{layer}"]["__call__"][0]
            relu.append((z > 0).reshape(-1))
            if i == n_convs - 1:  # the block's max-pool follows this ReLU
                b, h, w, c = z.shape
                win = z[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
                win = jnp.moveaxis(win, 4, 3).reshape(b, h // 2, w // 2, 4, c)
                arg = jnp.argmax(win, axis=3)
                pool.append(jnp.where(jnp.max(win, axis=3) > 0, arg, -1).reshape(-1))
            layer += 1
    for head in ("primary_head", "auxiliary_head"):
        relu.append((inter[head]["hidden"]["__call__"][0] > 0).reshape(-1))
    return jnp.concatenate(relu), jnp.concatenate(pool)


def make_fns(m: methods.Method, psi):
    """Jitted ``(f_vars, g_vars, x, y) -> grad`` for the exact and first-order forms, and
    ``(..., radius) -> (grad, relu flips, pool flips)`` for the finite difference."""
    def meta(f_vars, g_vars, x, y, form):
        return maxl.generator_meta_gradient(m.multitask, m.generator, f_vars, g_vars, x, y, psi,
                                  inner_lr=0.01, form=form, validate=False).grad

    def exact(f_vars, g_vars, x, y):
        return meta(f_vars, g_vars, x, y, "reverse")

    def first(f_vars, g_vars, x, y):
        with swapped_fd(first_order_only):
            return meta(f_vars, g_vars, x, y, "finite_difference")

    def finite(f_vars, g_vars, x, y, radius):
        points = []
        with swapped_fd(functools.partial(fd_module.finite_difference_meta_gradient,
                                          radius=radius)), recording_points(points):
            grad = meta(f_vars, g_vars, x, y, "finite_difference")
        assert len(points) == 2, len(points)
        (r_plus, p_plus), (r_minus, p_minus) = (
            kink_routes(m, p, f_vars["batch_stats"], x) for p in points)
        return grad, jnp.sum(r_plus != r_minus), jnp.sum(p_plus != p_minus), r_plus.size, p_plus.size

    return jax.jit(exact), jax.jit(first), jax.jit(finite)


def flat(tree) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(
        jnp.asarray(a).dtype, jnp.floating) else a, tree)


def measure(m, f_vars, g_vars, batch, radii, precisions):
    """Rows for every precision and radius; the exact float64 meta-gradient is the reference."""
    x, y = batch["image"], batch["primary"]
    results, ref = {}, None
    for prec in precisions:  # float64 first: it gives the reference
        jax.config.update("jax_enable_x64", prec == "float64")
        dt = jnp.float64 if prec == "float64" else jnp.float32
        fv, gv, xs = cast(f_vars, dt), cast(g_vars, dt), jnp.asarray(x, dt)
        exact, first, finite = make_fns(m, m.psi)
        t = time.perf_counter()
        g_exact = exact(fv, gv, xs, y)
        assert all(a.dtype == dt for a in jax.tree_util.tree_leaves(g_exact)), "wrong precision"
        g_exact, g_first = flat(g_exact), flat(first(fv, gv, xs, y))
        if ref is None:
            ref = {"exact": g_exact, "first": g_first}
        rows = [{"radius": None, "grad": g_exact, "relu": None, "pool": None}]
        for r in radii:
            g, relu, pool, n_relu, n_pool = finite(fv, gv, xs, y, jnp.asarray(r, dt))
            rows.append({"radius": r, "grad": flat(g), "relu": int(relu), "pool": int(pool)})
        print(f"  {prec}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        second_ref = ref["exact"] - ref["first"]
        for row in rows:
            g = row["grad"]
            row["err"] = np.linalg.norm(g - ref["exact"]) / np.linalg.norm(ref["exact"])
            # the first-order term is exact in every form: all the error is second-order
            row["err2"] = np.linalg.norm(g - ref["exact"]) / np.linalg.norm(second_ref)
            row["cos"] = g @ ref["exact"] / (np.linalg.norm(g) * np.linalg.norm(ref["exact"]))
            s = g - ref["first"]
            row["cos2"] = s @ second_ref / (np.linalg.norm(s) * np.linalg.norm(second_ref))
        results[prec] = rows
        results["units"] = (int(n_relu), int(n_pool))
    jax.config.update("jax_enable_x64", False)
    results["second_share"] = (np.linalg.norm(ref["exact"] - ref["first"])
                               / np.linalg.norm(ref["exact"]))
    return results


def table(results, precisions) -> list[str]:
    n_relu, n_pool = results["units"]
    lines = [f"| precision | radius | rel. error (full) | rel. error (2nd-order part) | "
             f"cosine to exact | cosine (2nd-order part) | ReLU flips (of {n_relu}) | "
             f"max-pool flips (of {n_pool} windows) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for prec in precisions:
        for r in results[prec]:
            name = "exact (reverse)" if r["radius"] is None else f"{r['radius']:.0e}"
            if r["radius"] == fd_module.REFERENCE_RADIUS:
                name += " (reference)"
            flips = ("-", "-") if r["relu"] is None else (str(r["relu"]), str(r["pool"]))
            lines.append(f"| {prec} | {name} | {r['err']:.2e} | {r['err2']:.2e} | "
                         f"{r['cos']:.8f} | {r['cos2']:.6f} | {flips[0]} | {flips[1]} |")
    return lines


def run_model(label, m, images, labels, args, shape, pad_to, batch, radii, out):
    t = time.perf_counter()
    state = train(m, images, labels, args.train_steps, args.train_batch, shape, args.seed, pad_to)
    print(f"  {label}: trained {args.train_steps} rounds in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    idx = np.random.default_rng(args.seed + 1).integers(0, len(labels), batch)
    b = batch_at(images, labels, idx, pad_to)
    res = measure(m, state.multitask_variables, m.generator_variables(state), b, radii,
                  ("float64", "float32"))
    theta_norm = np.linalg.norm(flat(state.multitask_params))
    out.append(f"\n## {label}\n")
    out.append(f"theta1: {theta_norm:.2f} in norm ({flat(state.multitask_params).size} "
               f"parameters), so radius 1e-2 is {1e-2 / theta_norm:.1e} of it; second-order part "
               f"= {res['second_share']:.0%} of the exact meta-gradient's norm (float64). Errors "
               f"and cosines against the exact float64 meta-gradient, on one batch of {batch}.\n")
    out.extend(table(res, ("float64", "float32")))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16, help="small CNN's first block's filters")
    p.add_argument("--batch", type=int, default=32, help="the measured batch (small CNN)")
    p.add_argument("--train-steps", type=int, default=100,
                   help="rounds of (theta1 step, meta step) before measuring")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--radii", default=",".join(f"{r:g}" for r in RADII))
    p.add_argument("--data", default="auto", choices=["auto", "fashion_mnist", "generated"])
    p.add_argument("--vgg16", action="store_true",
                   help="also VGG-16 at --vgg-radii, batch --vgg-batch, 32x32 padded")
    p.add_argument("--vgg-radii", default=",".join(f"{r:g}" for r in VGG_RADII))
    p.add_argument("--vgg-batch", type=int, default=4)
    p.add_argument("--vgg-train-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT), help="markdown file to write ('' : print only)")
    args = p.parse_args(argv)
    radii = tuple(float(r) for r in args.radii.split(",") if r.strip())
    images, labels, source = load_images(args.data, args.seed)
    dev = jax.devices()[0]
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}"
                         for n in ("jax", "jaxlib", "flax", "optax", "numpy"))
    out = [f"# benchmarks.fd_radius: finite-difference meta-gradient error against radius",
           "",
           f"command: python -m benchmarks.fd_radius {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
           f"machine: {cpu_model()}, {num_cores()} cores; Python {platform.python_version()}; "
           f"{versions}; device {dev.platform} ({dev.device_kind})",
           f"data: {source}; point: after {args.train_steps} rounds of one theta1 step and one "
           f"MAXL meta step (batch {args.train_batch}, float32, the reference's SGD rates, "
           f"alpha 0.01, psi [5]*10, seed {args.seed}); "
           f"radius = the step's length in theta1 (eps = radius / ||w||), the reference's is "
           f"{fd_module.REFERENCE_RADIUS:g}"]
    m = build("small", args.width, args.batch)
    run_model(f"small CNN, width {args.width}, batch {args.batch}", m, images, labels, args,
              (28, 28, 1), None, args.batch, radii, out)
    if args.vgg16:
        vargs = argparse.Namespace(**{**vars(args), "train_steps": args.vgg_train_steps,
                                      "train_batch": args.vgg_batch})
        m = build("vgg16", 0, args.vgg_batch)
        run_model(f"VGG-16, batch {args.vgg_batch} (28x28 padded to 32x32x3)", m, images, labels,
                  vargs, (32, 32, 3), 32, args.vgg_batch,
                  tuple(float(r) for r in args.vgg_radii.split(",") if r.strip()), out)
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""How good are the implicit methods' hypergradients? Neumann J = 3, 10, 30 and conjugate gradient
against converged solves, on the small CNN after a few hundred training steps.

    python -m benchmarks.implicit_hypergradients
    python -m benchmarks.implicit_hypergradients --methods auxilearn --steps 100 --dense

For each implicit method (``auxilearn``, ``maoal``, ``dtg``; the test config
``experiments/configs/tiny.py``: the small CNN of width 4, Fashion-MNIST with 5 coarse primary
classes, the fine classes as the human auxiliary task, each method's own default meta-step interval
and ``alpha``): train ``--steps`` steps (float32, batch ``--batch``, the method's meta steps on its
schedule) on real Fashion-MNIST (``$MAXL_SHARED_DATA``, default ``../shared/data``; generated images
with ``--data synthetic`` or when it is absent), then, in float64 at that point, take the method's
own hypergradient problem: its ``meta.implicit_gradient`` / ``maoal.hypergradient`` call is
intercepted, so the inner map ``G`` (AuxiLearn: the gradient of the combined training loss; MAOAL:
the importance-weighted gradient of the backbone; DTG: the lower-level gradient with the generated
data), the inner parameters (AuxiLearn, DTG: the network without its auxiliary head; MAOAL: the
backbone), the outer loss (the primary loss on a held-out batch) and the hyperparameters are exactly
the method's. With ``H = dG/dtheta``, ``v = grad_theta L_out``, the hypergradient of a ``q`` is
``g(q) = dL_out/dh|direct - (dG/dh)^T q`` (the direct term is 0 for all three).

The spectrum (table 1): Lanczos (``meta.implicit.extreme_eigenvalues``) on the symmetric part of
``H``; ``rho(I - alpha H)`` from those ends (Neumann converges iff it is < 1); the asymmetry
``||H u - H^T u|| / ||H u||`` on a random ``u``; ``--dense`` also forms ``H`` (``n`` products) for its
exact eigenvalues and condition number.

The converged reference. The IFT's premise, an inner minimum (``G = 0``, ``H`` positive definite),
does not hold at a training iterate: ``H`` is indefinite and numerically singular, so ``H^-1 v`` is
dominated by the near-null and negative directions and is no target an estimator could converge to
(``--dense`` shows it). The reference is instead the exact IFT hypergradient of the proximal inner
problem ``argmin_theta L_in(theta, h) + lambda/2 ||theta - theta_t||^2``, whose Hessian at
``theta_t`` is ``H + lambda I``: ``q_ref = (H + lambda I)^-T v``, ``lambda = max(0, -lambda_min) +
eps lambda_max`` (positive definite, condition number about ``1 / eps``), solved by GMRES in float64
to a true relative residual below 1e-10 (checked, shown). ``eps = 0.01`` is the main reference,
``eps = 0.1`` a second one, to show how much the target itself moves with ``lambda``.

The estimators (table 2): the Neumann series at the method's ``alpha`` (the authors' mode; shown at
the IFT's scale, ``scale_by_alpha=True``: the authors' ``False`` multiplies the implicit term by
``1 / alpha``, which changes no cosine), ``J = 3, 10, 30``; CG on ``H`` itself; damped Neumann
(``H + lambda I``, ``alpha = 1 / (lambda_max + lambda)``, ``J = 30``); damped CG (``damping =
lambda``, 10 and 30 iterations, ``meta.implicit_gradient(..., solver="cg", damping=lambda)``, whose
result is checked against the benchmark's own loop). Columns: ``products`` = Hessian-vector
products; ``cos q``: cosine of ``q`` with ``q_ref`` (``n``-dimensional: AuxiLearn's hypergradient
has only 2 entries, MAOAL's 3); ``cos g``, ``rel err g`` = ``||g - g_ref|| / ||g_ref||``, and
``|g| / |g_ref|`` against each reference.

Prints markdown and writes it to ``--out`` (default ``benchmarks/results/implicit_hypergradients.md``;
``--out ''``: print only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.steps import cpu_model, num_cores  # noqa: E402
from experiments.configs import tiny  # noqa: E402
from maxl_jax import data as data_lib  # noqa: E402
from maxl_jax import meta, methods  # noqa: E402
from maxl_jax.meta import implicit  # noqa: E402
from maxl_jax.methods import maoal as maoal_module  # noqa: E402
from maxl_jax.train import auxiliary_labels  # noqa: E402

METHODS = ("auxilearn", "maoal", "dtg")
EPS = (0.01, 0.1)
HELD = 2000  # images of the training split kept for the held-out (outer) batches
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "implicit_hypergradients.md"


# ------------------------------------------------------------------------------------- data

def synthetic_dataset(seed: int = 0, n: int = 12_000) -> data_lib.Dataset:
    """Fashion-MNIST-shaped images of 10 fine classes (a fixed template each, plus noise), grouped
    into the 5 coarse primary classes as the real ``fashion_mnist_coarse``."""
    rng = np.random.default_rng(seed)
    fine_to_aux, psi = data_lib.hierarchy_from_fine_to_primary(data_lib.FASHION_MNIST_FINE_TO_COARSE,
                                                               5)
    templates = rng.uniform(0, 255, size=(10, 28, 28, 1))
    fine = rng.integers(0, 10, n)
    images = np.clip(0.6 * templates[fine] + rng.normal(0, 50, (n, 28, 28, 1)), 0, 255)
    split = data_lib.Split(images=images.astype(np.uint8),
                           primary=np.asarray(data_lib.FASHION_MNIST_FINE_TO_COARSE)[fine].astype(
                               np.int32),
                           human_aux=fine_to_aux[fine].astype(np.int32))
    return data_lib.Dataset(name="fashion_mnist_coarse", train=split, test=split, num_primary=5,
                            psi_human=psi, primary_names=data_lib.FASHION_MNIST_COARSE_NAMES,
                            image_shape=(28, 28, 1))


def load_data(which: str) -> tuple[data_lib.Dataset, str]:
    if which in ("auto", "real"):
        root = data_lib.shared_data_dir()
        folder = root / "fashion_mnist" if root is not None else None
        try:
            if folder is None or not folder.is_dir():
                raise data_lib.DatasetNotFoundError(f"no {data_lib.SHARED_DATA_ENV} folder")
            ds = data_lib.load_dataset("fashion_mnist_coarse", data_dir=str(folder))
            return ds, f"Fashion-MNIST ({folder})"
        except data_lib.DatasetNotFoundError as e:
            if which == "real":
                raise SystemExit(f"error: --data real: {e}")
    return synthetic_dataset(), "generated images (synthetic)"


# --------------------------------------------------------------------------- the problem

class _Captured(Exception):
    pass


def to64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@contextlib.contextmanager
def intercepted(store: dict):
    """Replace the estimator calls of AuxiLearn / DTG (``meta.implicit_gradient``) and MAOAL
    (``maoal.hypergradient``) by one that records the problem and stops the method there."""
    def implicit_call(inner_loss, outer_loss, params, hyper, *, grad_map=None, alpha=1.0, terms=3,
                      **_):
        store.update(inner_loss=inner_loss, outer_loss=outer_loss, params=params, hyper=hyper,
                     grad_map=grad_map, alpha=float(alpha), terms=int(terms))
        raise _Captured

    def maoal_call(grad_map, dev_loss, shared, importance, *, terms=3, alpha=1.0, **_):
        store.update(inner_loss=None, outer_loss=dev_loss, params=shared, hyper=importance,
                     grad_map=grad_map, alpha=float(alpha), terms=int(terms))
        raise _Captured

    saved = meta.implicit_gradient, maoal_module.hypergradient
    meta.implicit_gradient, maoal_module.hypergradient = implicit_call, maoal_call
    try:
        yield
    finally:
        meta.implicit_gradient, maoal_module.hypergradient = saved


def trained_problem(name: str, ds: data_lib.Dataset, args):
    """Train ``name`` for ``args.steps`` steps; return its captured hypergradient problem (float64)
    and training statistics."""
    config = tiny.get_config()
    config.method, config.batch_size = name, args.batch
    config[name].every = methods.get(name).defaults()["every"]
    setup = methods.Setup(num_primary=ds.num_primary, psi_human=ds.psi_human,
                          steps_per_epoch=max(1, (len(ds.train) - HELD) // args.batch),
                          dataset=ds.name)
    m = methods.build(config, setup)
    state = m.init(jax.random.PRNGKey(args.seed), ds.image_shape)
    aux = auxiliary_labels(m, ds.train, args.seed)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ds.train))
    held, train = perm[:HELD], perm[HELD:]

    def batch_of(idx):
        b = {"image": np.asarray(data_lib.normalize(ds.train.images[idx])),
             "primary": ds.train.primary[idx].astype(np.int32)}
        if aux is not None:
            b["aux"] = aux[idx]
        return b

    train_step, meta_step = jax.jit(m.train_step), jax.jit(m.meta_step)
    every, b = m.schedule.every, args.batch
    n_meta = 0
    t0 = time.perf_counter()
    for s in range(args.steps):
        start = (s * b) % (len(train) - b)
        state, metrics = train_step(state, batch_of(train[start:start + b]))
        if (s + 1) % every == 0:
            state, _ = meta_step(state, {"held_out": batch_of(rng.choice(held, b, replace=False)),
                                         "train": batch_of(rng.choice(train, b, replace=False))})
            n_meta += 1
    jax.block_until_ready(state)
    stats = {"train_s": time.perf_counter() - t0, "loss": float(metrics["loss"]),
             "accuracy": float(metrics["accuracy"]), "meta_steps": n_meta}
    store: dict = {}
    batches = to64({"held_out": batch_of(held[:b]), "train": batch_of(train[-b:])})
    with intercepted(store):
        try:
            m.hypergradient(to64(state), batches)
        except _Captured:
            pass
    if "params" not in store:
        raise RuntimeError(f"{name}: its hypergradient did not reach the implicit estimator")
    return store, stats


class Problem:
    """The captured problem on flat float64 vectors: ``HT(u) = H^T u``, ``Hu(u) = H u``,
    ``v = grad_theta L_out``, ``g(q) = direct - (dG/dh)^T q``."""

    def __init__(self, store: dict):
        self.store = store
        grad_map = store["grad_map"]
        if grad_map is None:
            inner = store["inner_loss"]

            def grad_map(p, h):
                return jax.grad(lambda pp: inner(pp, h)[0])(p), None
        self.grad_map = grad_map
        theta, unravel = jax.flatten_util.ravel_pytree(store["params"])
        hyper, unravel_h = jax.flatten_util.ravel_pytree(store["hyper"])
        self.theta, self.hyper, self.n, self.alpha = theta, hyper, theta.size, store["alpha"]

        def G(t, h):
            return jax.flatten_util.ravel_pytree(grad_map(unravel(t), unravel_h(h))[0])[0]

        def outer(t, h):
            return store["outer_loss"](unravel(t), unravel_h(h))[0]

        self.v, self.direct = jax.jit(jax.grad(outer, argnums=(0, 1)))(theta, hyper)
        self.HT = jax.jit(lambda u: jax.vjp(lambda t: G(t, hyper), theta)[1](u)[0])
        self.Hu = jax.jit(lambda u: jax.jvp(lambda t: G(t, hyper), (theta,), (u,))[1])
        self.mixed = jax.jit(lambda q: jax.vjp(lambda h: G(theta, h), hyper)[1](q)[0])
        self.rows = jax.jit(lambda e: jax.vmap(
            lambda u: jax.vjp(lambda t: G(t, hyper), theta)[1](u)[0])(e))

    def g(self, q):
        return np.asarray(self.direct - self.mixed(jnp.asarray(q)))

    def library(self, **kw):
        """``meta.implicit_gradient`` on the method's own pytrees (``scale_by_alpha=True``)."""
        s = self.store
        fn = jax.jit(lambda: implicit.implicit_gradient(
            s["inner_loss"], s["outer_loss"], s["params"], s["hyper"], grad_map=s["grad_map"],
            scale_by_alpha=True, **kw).grad_hyper)
        return np.asarray(jax.flatten_util.ravel_pytree(fn())[0])


# ----------------------------------------------------------------------------- estimators

def neumann(op, v, terms, alpha):
    term, total = v, v
    for _ in range(terms):
        term = term - alpha * op(term)
        total = total + term
    return np.asarray(alpha * total)


def cg(op, v, terms):
    q, r = jnp.zeros_like(v), v
    p, rr = r, jnp.vdot(r, r)
    for _ in range(terms):
        ap = op(p)
        pap = jnp.vdot(p, ap)
        if not pap > 0:  # as cg_inverse: no step along a direction of non-positive curvature
            break
        q, r = q + rr / pap * p, r - rr / pap * ap
        rr, rr_old = jnp.vdot(r, r), rr
        p = r + rr / rr_old * p
    return np.asarray(q)


def reference(op, v, tol=1e-11, max_iter=400):
    """GMRES (Arnoldi with twice-repeated Gram-Schmidt, no restart) on ``op(q) = v`` from 0, until
    the true relative residual is below ``tol``. Returns ``(q, residual)``."""
    v = np.asarray(v)
    beta = np.linalg.norm(v)
    basis = [v / beta]
    hess = np.zeros((max_iter + 1, max_iter))
    q = np.zeros_like(v)
    for k in range(max_iter):
        w = np.asarray(op(jnp.asarray(basis[k])))
        for _ in range(2):
            for i, b in enumerate(basis):
                c = np.dot(b, w)
                hess[i, k] += c
                w = w - c * b
        hess[k + 1, k] = np.linalg.norm(w)
        basis.append(w / hess[k + 1, k] if hess[k + 1, k] > 0 else w)
        rhs = np.zeros(k + 2)
        rhs[0] = beta
        y = np.linalg.lstsq(hess[:k + 2, :k + 1], rhs, rcond=None)[0]
        estimate = np.linalg.norm(hess[:k + 2, :k + 1] @ y - rhs) / beta
        if estimate < tol or hess[k + 1, k] == 0 or k == max_iter - 1:
            q = np.stack(basis[:k + 1], 1) @ y
            residual = float(np.linalg.norm(np.asarray(op(jnp.asarray(q))) - v) / beta)
            if residual < tol or hess[k + 1, k] == 0 or k == max_iter - 1:
                return q, residual
    return q, float("nan")


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def analyse(name: str, store: dict, args) -> tuple[dict, list[dict]]:
    P = Problem(store)
    alpha, v = P.alpha, P.v
    key = jax.random.PRNGKey(args.seed + 1)
    u = jax.random.normal(key, (P.n,), jnp.float64)
    hu, htu = P.Hu(u), P.HT(u)
    asym = float(jnp.linalg.norm(hu - htu) / jnp.linalg.norm(hu))
    sym = jax.jit(lambda x: 0.5 * (P.Hu(x) + P.HT(x)))
    lo, hi = (float(x) for x in implicit.extreme_eigenvalues(sym, u, steps=args.lanczos))
    spec = {"method": name, "n": P.n, "hyper": P.hyper.size, "alpha": alpha, "lo": lo, "hi": hi,
            "rho": max(abs(1 - alpha * lo), abs(1 - alpha * hi)), "asym": asym,
            "grad_norm": float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(
                P.grad_map(store["params"], store["hyper"])[0])[0])),
            "direct": float(jnp.linalg.norm(P.direct))}
    dense = None
    if args.dense:
        t0 = time.perf_counter()
        H = np.concatenate([np.asarray(P.rows(jnp.eye(P.n, dtype=jnp.float64)[i:i + 64]))
                            for i in range(0, P.n, 64)])  # row i: e_i^T H
        ev = np.linalg.eigvalsh(0.5 * (H + H.T))
        sv = np.linalg.svd(H, compute_uv=False)
        spec.update(dense_lo=float(ev[0]), dense_hi=float(ev[-1]), negative=int((ev < 0).sum()),
                    cond=float(sv[0] / sv[-1]), dense_s=time.perf_counter() - t0)
        try:
            dense = np.linalg.solve(H.T, np.asarray(v))
        except np.linalg.LinAlgError:  # exactly singular: the least-norm least-squares solution
            dense = np.linalg.lstsq(H.T, np.asarray(v), rcond=None)[0]

    refs = []
    for eps in EPS:
        lam = max(0.0, -lo) + eps * hi
        op = lambda x, lam=lam: P.HT(x) + lam * x  # noqa: E731 (one compiled H^T u for all)
        q, res = reference(op, v)
        refs.append({"eps": eps, "lam": lam, "q": q, "g": P.g(q), "residual": res, "op": op})
    spec["refs"] = [(r["eps"], r["lam"], r["residual"]) for r in refs]
    lam = refs[0]["lam"]
    damped = refs[0]["op"]

    rows = []

    def row(label, products, q):
        g = P.g(q)
        out = {"estimator": label, "products": products, "cos_q": cosine(q, refs[0]["q"])}
        for i, r in enumerate(refs):
            out[f"cos{i}"] = cosine(g, r["g"])
            out[f"rel{i}"] = float(np.linalg.norm(g - r["g"]) / np.linalg.norm(r["g"]))
            out[f"ratio{i}"] = float(np.linalg.norm(g) / np.linalg.norm(r["g"]))
        rows.append(out)

    for j in (3, 10, 30):
        tag = " (authors')" if j == store["terms"] else ""
        row(f"Neumann J={j}, alpha={alpha:g}{tag}", j, neumann(P.HT, v, j, alpha))
    row(f"CG {args.cg}, undamped", args.cg, cg(P.HT, v, args.cg))
    row(f"Neumann J=30, damped, alpha=1/(lmax+lambda)", 30, neumann(damped, v, 30, 1 / (hi + lam)))
    for k in sorted({10, args.cg}):
        row(f"CG {k}, damped (damping=lambda)", k, cg(damped, v, k))
    # The library option gives what the benchmark's own loop gave.
    lib = P.library(solver="cg", terms=args.cg, damping=lam)
    loop = P.g(cg(damped, v, args.cg))
    spec["library_check"] = float(np.linalg.norm(lib - loop) / np.linalg.norm(loop))
    row(f"reference eps={EPS[1]} (lambda={refs[1]['lam']:.3g}), GMRES", "-", refs[1]["q"])
    if dense is not None:
        row("undamped H^-1 v (dense solve; lstsq if singular)", P.n, dense)
    return spec, rows


# ------------------------------------------------------------------------------------ output

def fmt(x, digits=3):
    if isinstance(x, str):
        return x
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def render(args, source, specs, tables, stats) -> str:
    dev = jax.devices()[0]
    lines = [f"# benchmarks.implicit_hypergradients: small CNN (width 4), {source}, "
             f"{args.steps} training steps, batch {args.batch}, float64 analysis",
             f"JAX {jax.__version__} on {dev.platform}; {cpu_model()}, {num_cores()} cores; Python "
             f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}", ""]
    lines += ["Spectrum of H = dG/dtheta at the trained point (Lanczos on (H + H^T)/2, "
              f"{args.lanczos} steps):", "",
              "| method | inner params | hyper | train loss / acc | meta steps | alpha "
              "| lambda_min | lambda_max | rho(I - alpha H) | asymmetry | lambda (eps 0.01 / 0.1) "
              "| GMRES residual |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in specs:
        st = stats[s["method"]]
        lams = " / ".join(fmt(r[1]) for r in s["refs"])
        res = " / ".join(f"{r[2]:.0e}" for r in s["refs"])
        lines.append(f"| {s['method']} | {s['n']} | {s['hyper']} | {st['loss']:.3f} / "
                     f"{st['accuracy']:.2f} | {st['meta_steps']} | {s['alpha']:g} | {fmt(s['lo'])} | "
                     f"{fmt(s['hi'])} | {fmt(s['rho'])} | {fmt(s['asym'])} | {lams} | {res} |")
    if any("dense_lo" in s for s in specs):
        lines += ["", "Dense check (--dense: H formed, n products):", "",
                  "| method | exact lambda_min | exact lambda_max | negative eigenvalues "
                  "| cond(H) | time |", "| --- | --- | --- | --- | --- | --- |"]
        for s in specs:
            if "dense_lo" in s:
                lines.append(f"| {s['method']} | {fmt(s['dense_lo'])} | {fmt(s['dense_hi'])} | "
                             f"{s['negative']} of {s['n']} | {s['cond']:.1e} | "
                             f"{s['dense_s']:.0f} s |")
    lines += ["", "Estimators against the converged references (reference eps = 0.01: "
              "q_ref = (H + lambda I)^-T v, lambda = max(0, -lambda_min) + 0.01 lambda_max; "
              "eps = 0.1 likewise):", "",
              "| method | estimator | products | cos q | cos g | rel err g | abs(g)/abs(g_ref) "
              "| cos g (eps 0.1) | rel err g (eps 0.1) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s, rows in zip(specs, tables):
        for r in rows:
            lines.append(f"| {s['method']} | {r['estimator']} | {r['products']} | "
                         f"{r['cos_q']:+.3f} | {r['cos0']:+.3f} | {fmt(r['rel0'])} | "
                         f"{fmt(r['ratio0'])} | {r['cos1']:+.3f} | {fmt(r['rel1'])} |")
    checks = ", ".join(f"{s['method']} {s['library_check']:.0e}" for s in specs)
    lines += ["", f"meta.implicit_gradient (solver='cg', terms={args.cg}, damping=lambda) against "
                  f"the CG loop above, relative difference: {checks}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=200, help="training steps before the analysis")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto")
    p.add_argument("--lanczos", type=int, default=40, help="Lanczos steps for the extreme "
                   "eigenvalues")
    p.add_argument("--cg", type=int, default=30, help="CG iterations of the CG rows")
    p.add_argument("--dense", action="store_true", help="also form H: exact eigenvalues, cond(H) "
                   "and the undamped solve (n Hessian-vector products per method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write ('' : none)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    bad = sorted(set(names) - set(METHODS))
    if bad or not names:
        p.error(f"--methods: {bad or 'none'} not among {', '.join(METHODS)}")
    for flag in ("steps", "batch", "lanczos", "cg"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    ds, source = load_data(args.data)
    specs, tables, stats = [], [], {}
    for name in names:
        t0 = time.perf_counter()
        print(f"  {name}: training {args.steps} steps ...", file=sys.stderr, flush=True)
        store, stats[name] = trained_problem(name, ds, args)
        print(f"  {name}: analysing ...", file=sys.stderr, flush=True)
        spec, rows = analyse(name, store, args)
        specs.append(spec)
        tables.append(rows)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    text = render(args, source, specs, tables, stats)
    print(text)
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.implicit_hypergradients " + " ".join(
            argv if argv is not None else sys.argv[1:])
        path.write_text(f"```\n{command.strip()}\n```\n\n{text}")


if __name__ == "__main__":
    main()

"""MAXL against single-task, random and human auxiliary tasks on real Fashion-MNIST, with seeds.

    python -m experiments.study --protocol=fmnist_coarse_low --seeds=0,1,2 --workdir=runs/study

Runs every method of the protocol for every seed (each in ``<workdir>/<protocol>/<variant>/seed<n>``;
finished runs are skipped, interrupted ones resume), then writes ``<out>/<protocol>.json`` (every
run's summary), ``<out>/<protocol>.md`` (the table), ``<out>/<protocol>_curves.png`` (mean test
accuracy per epoch, +-1 std over seeds) and, for the first MAXL variant, ``<out>/<protocol>_labels.png``
(what the generator learned on the test set).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from experiments.configs import cpu
from maxl_jax import data as data_lib
from maxl_jax import maxl, methods, train

# variant name -> (method, psi or None for the dataset's own / aux_per_class default)
PROTOCOLS = {
    "fmnist_coarse": dict(dataset="fashion_mnist_coarse", train_fraction=1.0, variants={
        "single": ("single", None), "random": ("random", (4, 1, 1, 3, 1)),
        "human": ("human", None), "maxl_psi_human": ("maxl", (4, 1, 1, 3, 1)),
        "maxl_psi_5": ("maxl", (5,) * 5)}),
    "fmnist10": dict(dataset="fashion_mnist", train_fraction=1.0, variants={
        "single": ("single", None), "random": ("random", (5,) * 10),
        "maxl_psi_5": ("maxl", (5,) * 10)}),
}
for _name in list(PROTOCOLS):
    PROTOCOLS[_name + "_low"] = {**PROTOCOLS[_name], "train_fraction": 0.05}

_PROTOCOL = flags.DEFINE_enum("protocol", "fmnist_coarse_low", sorted(PROTOCOLS), "Protocol.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "Where the runs go.")
_OUT = flags.DEFINE_string("out", "docs/results", "Where the tables, JSON and plots go.")
_DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data/fashion_mnist",
                                "Folder with the Fashion-MNIST IDX archives (or a TFDS data_dir).")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Epochs (0: the protocol's default, see study_config).")
_WIDTH = flags.DEFINE_integer("width", 16, "Small CNN first-block filters.")
_ONLY = flags.DEFINE_list("only", [], "Run only these variants (default: all).")


def study_config(protocol: str, variant: str, seed: int, data_dir: str, epochs: int = 0,
                 width: int = 16):
    """The config of one run: ``experiments/configs/cpu.py`` with the protocol's data and method."""
    spec = PROTOCOLS[protocol]
    method, psi = spec["variants"][variant]
    c = cpu.get_config()
    c.dataset, c.train_fraction, c.data_dir = spec["dataset"], spec["train_fraction"], data_dir
    c.method, c.seed, c.width = method, seed, width
    c.psi = psi or ()
    # Budget for 2 CPU cores: 15 epochs x 30 batches for the 5% protocols, 3 x 600 for full data.
    c.epochs = epochs or (15 if spec["train_fraction"] < 1 else 3)
    c.last_k = max(1, c.epochs // 5)
    c.eval_batch_size = 1000
    return c


def run_protocol(protocol: str, seeds, workdir: pathlib.Path, data_dir: str, epochs: int,
                 width: int, only=()) -> dict:
    """Runs (or reuses) every variant x seed; returns {variant: [summary per seed]}."""
    results = {}
    for variant in PROTOCOLS[protocol]["variants"]:
        if only and variant not in only:
            continue
        for seed in seeds:
            run_dir = workdir / protocol / variant / f"seed{seed}"
            done = run_dir / "summary.json"
            config = study_config(protocol, variant, seed, data_dir, epochs, width)
            if done.exists():
                summary = json.loads(done.read_text())
            else:
                print(f"== {protocol} / {variant} / seed {seed}", flush=True)
                summary = train.train_and_evaluate(config, run_dir, progress=False)
                state = summary.pop("state")
                if config.method == "maxl" and seed == seeds[0]:
                    np.savez(run_dir / "test_labels.npz", **generated_test_labels(config, state))
            summary["records"] = [json.loads(l) for l in
                                  (run_dir / "metrics.jsonl").read_text().splitlines()]
            results.setdefault(variant, []).append(summary)
    return results


def generated_test_labels(config, state) -> dict:
    """The generator's soft labels on the test set (eval mode), with images and primary labels."""
    dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                    train_fraction=config.train_fraction, seed=config.seed)
    trainer = methods.build(config, train.setup_of(config, dataset, steps_per_epoch=1))
    images = data_lib.normalize(dataset.test.images)
    labels = jax.jit(lambda v, x, y: maxl.generate_labels(trainer.generator, v, x, y, trainer.psi,
                                                          train=False)[0])
    soft = np.concatenate([np.asarray(labels(trainer.generator_variables(state), images[i:i + 1000],
                                             dataset.test.primary[i:i + 1000]))
                           for i in range(0, len(images), 1000)])
    return {"soft": soft, "primary": dataset.test.primary, "images": dataset.test.images,
            "psi": np.asarray(trainer.psi), "primary_names": np.asarray(dataset.primary_names)}


def table(protocol: str, results: dict) -> str:
    """Markdown: mean +- std over seeds of final, best and last-k-mean test accuracy."""
    spec = PROTOCOLS[protocol]
    any_summary = next(iter(results.values()))[0]
    lines = [f"### {protocol}: {spec['dataset']}, {spec['train_fraction']:.0%} of the training set, "
             f"{any_summary['epochs']} epochs, seeds {[r['seed'] for r in next(iter(results.values()))]}",
             "",
             f"| variant | final test acc. | best test acc. | mean of last {any_summary['last_k']} "
             f"| final minus single, paired by seed | wall time / run |",
             "| --- | --- | --- | --- | --- | --- |"]
    single = {r["seed"]: r["final_test_accuracy"] for r in results.get("single", [])}
    for variant, runs in results.items():
        def stat(key):
            v = 100 * np.array([r[key] for r in runs])
            return f"{v.mean():.2f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"
        # train_time_s: the epochs' training steps (this version); wall_time_s: older results.
        wall = np.mean([r.get("train_time_s", r.get("wall_time_s")) for r in runs])
        # Each seed draws its own training subset and initialisation: compare within a seed.
        diffs = 100 * np.array([r["final_test_accuracy"] - single[r["seed"]] for r in runs
                                if r["seed"] in single])
        paired = (f"{diffs.mean():+.2f} +- {diffs.std(ddof=1) if len(diffs) > 1 else 0.0:.2f}"
                  if len(diffs) and variant != "single" else "")
        lines.append(f"| {variant} | {stat('final_test_accuracy')} | {stat('best_test_accuracy')} "
                     f"| {stat('last_k_mean_test_accuracy')} | {paired} | {wall:.0f} s |")
    return "\n".join(lines) + "\n"


def plot_curves(protocol: str, results: dict, path: pathlib.Path | None):
    """Mean +- std test accuracy per epoch of each variant: saved at ``path`` (None: not saved) and
    returned as a matplotlib Figure."""
    from matplotlib.ticker import MaxNLocator

    from maxl_jax.train import new_figure

    fig = new_figure((7, 4.5))
    ax = fig.add_subplot()
    for variant, runs in results.items():
        acc = 100 * np.array([r["test_accuracy"] for r in runs])
        x = np.arange(1, acc.shape[1] + 1)
        ax.plot(x, acc.mean(0), label=variant)
        ax.fill_between(x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{protocol}: mean +- std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def generated_label_summary(soft: np.ndarray, primary: np.ndarray, psi) -> tuple:
    """What a generator's soft labels ``soft (N, sum(psi))`` do for primary labels ``primary (N,)``.

    Returns, per primary class ``(P,)``: ``effective`` (exp of the entropy of the class's mean soft
    label inside its block), ``won`` (how many of its auxiliary classes win the argmax for at least
    one of its examples), ``entropy`` (mean per-example entropy, nats); and per auxiliary class
    ``(K,)``: ``counts`` (examples whose argmax it is) and ``owner`` (its primary class).
    """
    psi = np.asarray(psi)
    starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
    assigned = soft.argmax(1)
    eff, won, ent = [], [], []
    for c, (s, n) in enumerate(zip(starts, psi)):
        block = soft[primary == c][:, s:s + n]
        usage = block.mean(0) / block.mean(0).sum()
        eff.append(float(np.exp(-(usage * np.log(np.maximum(usage, 1e-30))).sum())))
        ent.append(float(-(block * np.log(np.maximum(block, 1e-30))).sum(1).mean()))
        won.append(len(np.unique(assigned[primary == c])))
    k = int(psi.sum())
    owner = np.searchsorted(starts, np.arange(k), side="right") - 1
    counts = np.array([int(((assigned == j) & (primary == owner[j])).sum()) for j in range(k)])
    return np.array(eff), np.array(won), np.array(ent), counts, owner


def plot_generated_labels(npz_path: pathlib.Path, path: pathlib.Path | None, per_class: int = 6):
    """Per primary class: the auxiliary classes available (psi), the effective number in use (exp of
    the entropy of the class's mean soft label), how many ever win the argmax, and the mean label
    entropy; then a grid of test images for each auxiliary class that wins the argmax for at least
    one image (rows, most confident first). Classes that never win are listed, not drawn. Saved at
    ``path`` (None: not saved) and returned as a matplotlib Figure."""
    from maxl_jax.train import new_figure

    d = np.load(npz_path)
    soft, primary, images, psi = d["soft"], d["primary"], d["images"], d["psi"]
    names = [str(n) for n in d["primary_names"]]
    eff, won, ent, counts, owner = generated_label_summary(soft, primary, psi)
    assigned = soft.argmax(1)
    k = int(psi.sum())
    rows = [j for j in range(k) if counts[j] > 0]
    fig = new_figure((4 + per_class * 0.9, 3.6 + len(rows) * 0.9))
    grid = fig.add_gridspec(len(rows) + 4, per_class + 1)
    ax = fig.add_subplot(grid[:3, :])
    xs = np.arange(len(psi))
    ax.bar(xs - 0.27, eff, 0.27, label="effective aux classes (mean soft label)")
    ax.bar(xs, won, 0.27, label="aux classes winning the argmax")
    ax.bar(xs + 0.27, ent, 0.27, label="mean label entropy (nats)")
    ax.plot(xs, psi, "k_", markersize=20, label="psi (aux classes available)")
    ax.set_xticks(xs, names, fontsize=7)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title("What the generator learned (test set)")
    unused = [j for j in range(k) if counts[j] == 0]
    note = fig.add_subplot(grid[3, :])
    note.axis("off")
    note.text(0, 0.5, f"{len(unused)} of {k} auxiliary classes never win the argmax (not drawn): "
              + ", ".join(map(str, unused))[:180], fontsize=7, va="center", wrap=True)
    for r, j in enumerate(rows):
        idx = np.where((assigned == j) & (primary == owner[j]))[0]
        idx = idx[np.argsort(-soft[idx, j])][:per_class]
        lab = fig.add_subplot(grid[4 + r, 0])
        lab.axis("off")
        lab.text(0, 0.5, f"aux {j}\n({names[owner[j]][:10]}, n={counts[j]})", fontsize=7,
                 va="center")
        for i in range(per_class):
            a = fig.add_subplot(grid[4 + r, 1 + i])
            a.axis("off")
            if i < len(idx):
                a.imshow(images[idx[i]].squeeze(), cmap="gray")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    protocol = _PROTOCOL.value
    seeds = [int(s) for s in _SEEDS.value]
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    results = run_protocol(protocol, seeds, workdir, _DATA_DIR.value, _EPOCHS.value, _WIDTH.value,
                           _ONLY.value)
    md = table(protocol, results)
    print(md)
    (out / f"{protocol}.md").write_text(md)
    slim = {v: [{k: x for k, x in r.items() if k != "records"} for r in runs]
            for v, runs in results.items()}
    (out / f"{protocol}.json").write_text(json.dumps(slim, indent=1))
    plot_curves(protocol, results, out / f"{protocol}_curves.png")
    for variant, (method, _) in PROTOCOLS[protocol]["variants"].items():
        npz = workdir / protocol / variant / f"seed{seeds[0]}" / "test_labels.npz"
        if method == "maxl" and npz.exists():
            plot_generated_labels(npz, out / f"{protocol}_{variant}_labels.png")


if __name__ == "__main__":
    app.run(main)

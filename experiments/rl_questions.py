"""Discovery of useful questions on Catch: the table and learning curves of ``maxl_jax.rl``.

    python -m experiments.rl_questions --seeds 0,1,2,3,4

trains every agent (``--agents``: none, hand, random, discovered) in every representation setting
(``--representations``: shared, answers) for every seed, each run one jitted ``lax.scan``
(``maxl_jax.rl.questions.train``), and writes ``docs/results/rl_questions.md`` (the table, with this
command), ``rl_questions.json`` (every run's numbers) and ``rl_questions_curves.png``.

Columns: "final" is the mean return of the training episodes that ended in the last 10% of the
agent updates; "AUC" the mean return of all training episodes (the area under the learning curve
divided by its length); "eval" the final policy's mean return on 1000 fresh episodes (sampled
actions) and "greedy" with argmax actions. Returns are in [-1, 1] (Catch: +1 caught, -1 missed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from maxl_jax.rl import questions as q

LABELS = {"none": "no auxiliary (answer weight 0)",
          "hand": "hand-designed (pixel GVFs, gamma 0.9)",
          "random": "random fixed questions (eta at init)",
          "discovered": "discovered (meta-gradient)"}
CURVE_POINTS = 50


def summarise(result, iterations):
    rs = np.asarray(result.return_sum, np.float64)
    ne = np.asarray(result.episodes, np.float64)
    last = slice(iterations - iterations // 10, iterations)
    w = iterations // CURVE_POINTS
    curve = [float(rs[i:i + w].sum() / max(ne[i:i + w].sum(), 1)) for i in range(0, iterations, w)]
    return {"final": float(rs[last].sum() / ne[last].sum()), "auc": float(rs.sum() / ne.sum()),
            "eval": float(result.eval_return), "greedy": float(result.eval_greedy),
            "episodes": int(ne.sum()), "curve": curve,
            "final_discount_mean": float(np.asarray(result.metrics["discount_mean"])[-1]),
            "final_answer_loss": float(np.asarray(result.metrics["answer"])[-1]),
            "mean_meta_grad_norm": float(np.asarray(result.meta_grad_norm).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--agents", default="none,hand,random,discovered")
    p.add_argument("--representations", default="shared,answers")
    p.add_argument("--iterations", default="shared=1000,answers=5000",
                   help="agent updates per run, per representation")
    p.add_argument("--meta_steps", type=int, default=1)
    p.add_argument("--out", default="docs/results/rl_questions.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    agents = args.agents.split(",")
    reps = args.representations.split(",")
    iters = dict(kv.split("=") for kv in args.iterations.split(","))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs, t_start = [], time.time()
    for rep in reps:
        n = int(iters[rep])
        for agent in agents:
            cfg = q.Config(questions=agent, representation=rep, meta_steps=args.meta_steps)
            for seed in seeds:
                t0 = time.time()
                res = q.train_jit(jax.random.PRNGKey(seed), cfg, n)
                jax.block_until_ready(res.eval_return)
                s = summarise(res, n)
                s.update(agent=agent, representation=rep, seed=seed, iterations=n,
                         seconds=time.time() - t0)
                runs.append(s)
                print(f"{rep:8s} {agent:10s} seed {seed}: final {s['final']:+.3f} auc "
                      f"{s['auc']:+.3f} eval {s['eval']:+.3f} ({s['seconds']:.1f}s)", flush=True)
    total = time.time() - t_start
    cfg0 = q.Config()
    command = "python -m experiments.rl_questions " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    meta = {"command": command.strip(), "seconds": total, "jax": jax.__version__,
            "machine": f"{platform.machine()}, CPU ({jax.devices()[0].platform})",
            "config": {k: getattr(cfg0, k) for k in cfg0.__dataclass_fields__}}
    meta["config"]["meta_steps"] = args.meta_steps
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))

    def stat(rep, agent, key):
        v = np.array([r[key] for r in runs if r["agent"] == agent and r["representation"] == rep])
        return f"{v.mean():+.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"

    lines = ["# Discovery of useful questions on Catch", "",
             f"Made by `{meta['command']}` ({total / 60:.1f} min on a loaded 2-core CPU, jax "
             f"{jax.__version__}); every run's numbers in `{out.with_suffix('.json').name}`, "
             f"curves in `{out.stem}_curves.png`. Seeds {', '.join(map(str, seeds))}; mean ± std "
             "over seeds (sample std).", "",
             f"Agent: A2C, {cfg0.num_envs} Catch environments, unrolls of {cfg0.unroll} steps, "
             f"gamma {cfg0.discount}, torso 2 x {cfg0.hidden} ReLU, Adam {cfg0.learning_rate}; "
             f"answer weight {cfg0.answer_weight}; discovered/random: {cfg0.num_questions} "
             f"questions, question network 50-{cfg0.question_hidden}-{2 * cfg0.num_questions}, "
             f"meta Adam {cfg0.meta_learning_rate}, meta-gradient through k = {args.meta_steps} "
             "agent update(s). final: training episodes of the last 10% of updates; AUC: all "
             "training episodes; eval: the final policy on 1000 fresh episodes (sampled; greedy: "
             "argmax).", ""]
    for rep in reps:
        what = ("actor-critic and answer losses both train the torso" if rep == "shared" else
                "only the answer loss trains the torso (policy and value heads on a "
                "stop-gradient)")
        lines += [f"## representation = {rep}: {what}; {iters[rep]} updates "
                  f"({int(iters[rep]) * cfg0.num_envs * cfg0.unroll} environment steps) per run",
                  "", "| agent | final | AUC | eval | greedy |", "|---|---|---|---|---|"]
        for agent in agents:
            lines.append(f"| {LABELS[agent]} | {stat(rep, agent, 'final')} | "
                         f"{stat(rep, agent, 'auc')} | {stat(rep, agent, 'eval')} | "
                         f"{stat(rep, agent, 'greedy')} |")
        lines += ["", "Per seed (final / AUC; discovered and random: the questions' mean discount "
                  "at the end):", "", "| agent | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for agent in agents:
            cells = []
            for seed in seeds:
                r = next(r for r in runs if r["agent"] == agent and r["representation"] == rep
                         and r["seed"] == seed)
                extra = (f"; disc {r['final_discount_mean']:.2f}"
                         if agent in ("random", "discovered") else "")
                cells.append(f"{r['final']:+.2f} / {r['auc']:+.2f}{extra}")
            lines.append(f"| {agent} | " + " | ".join(cells) + " |")
        lines.append("")
    out.write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(5.5 * len(reps), 4))
    FigureCanvasAgg(fig)
    for j, rep in enumerate(reps):
        ax = fig.add_subplot(1, len(reps), j + 1)
        n = int(iters[rep])
        for agent in agents:
            c = np.array([r["curve"] for r in runs
                          if r["agent"] == agent and r["representation"] == rep])
            x = (np.arange(c.shape[1]) + 0.5) * (n // CURVE_POINTS)
            m, s = c.mean(0), c.std(0)
            ax.plot(x, m, label=LABELS[agent])
            ax.fill_between(x, m - s, m + s, alpha=0.2)
        ax.set_title(f"Catch, representation = {rep}")
        ax.set_xlabel("agent updates")
        ax.set_ylabel("mean episode return")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_curves.png"), dpi=110)
    print(f"wrote {out} in {total:.0f}s")


if __name__ == "__main__":
    main()

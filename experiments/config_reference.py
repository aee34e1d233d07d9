"""The config reference: every field of ``experiments/configs/default.py`` and of each method's own
section (``Method.defaults()``, ``--config.<method>.<field>``), with its type, default and meaning.

    python -m experiments.cifar --helpconfig            # as text
    python -m experiments.config_reference --markdown   # docs/CONFIG.md's text
    python -m experiments.config_reference --write      # rewrites docs/CONFIG.md

Where the meanings live, each written once: a top-level field's is its comment in ``default.py``
(the text after ``#`` on its line and on the comment lines under it; a comment line at the body's
indentation starts a section); a method field's is in ``METHOD_FIELDS`` below, by ``field`` (the
same meaning in every method that has it) or ``method.field`` (that method's own). A field without
a meaning, or a meaning without a field, is an error (``missing()``; tests/test_config_reference.py).
"""

from __future__ import annotations

import argparse
import ast
import io
import pathlib
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "experiments" / "configs" / "default.py"
CONFIG_MD = ROOT / "docs" / "CONFIG.md"

# The meaning of each method field: "field" for every method that has it, "method.field" where a
# method's field means something of its own (it wins over "field").
METHOD_FIELDS = {
    # The meta-learned methods' shared fields.
    "every": "training steps between two meta steps (OL-AUX: between two weight updates)",
    "held_out_fraction": "stratified fraction of the training set held out for the meta "
                         "objective's primary loss",
    "meta_lr": "learning rate of the meta-learned parameters (phi)",
    "meta_momentum": "SGD momentum of the meta-learned parameters",
    "meta_weight_decay": "L2 weight decay of the meta-learned parameters",
    "clip": "the hypergradient is clipped to this global norm",
    "solver": "inverse-Hessian estimator of the implicit hypergradient: neumann (the authors') | "
              "cg (conjugate gradient)",
    "terms": "terms of the Neumann series (J), or conjugate-gradient iterations",
    "scale_by_alpha": "multiply the Neumann sum by its step alpha (the IFT value; off: the "
                      "authors' form)",
    "damping": "damping added to the Hessian before inverting it (0: none, the authors')",
    "hidden": "hidden sizes of the nonlinear combiner's MLP, comma-separated",
    "modules": "modules that get their own importance: blocks (the backbone's blocks) | "
               "tensors (every parameter tensor)",
    "alpha": "step of the Neumann series",
    # AuxiLearn.
    "auxilearn.combiner": "loss combiner: linear | nonlinear (a monotone MLP)",
    "auxilearn_generate.aux_scale": "auxiliary loss's scale before the combiner",
    # DTG.
    "dtg.hidden": "hidden width of the feature and label generators' MLPs (0: the multi-task "
                  "network's head width)",
    "dtg.proximity_weight": "weight of the instance regulariser that keeps generated features "
                            "near their real ones",
    "dtg.meta_lr": "Adam learning rate of the joint generator",
    # Tailoring and meta-tailoring (CNGrad).
    "inner_steps": "SGD steps of each input's conditional normalisation (gamma, beta) on the "
                   "unsupervised loss at prediction time (meta_tailoring: in training too; 0: the "
                   "plain network)",
    "inner_lr": "learning rate of those per-input SGD steps",
    "loss": "the unsupervised tailoring loss: entropy (of the prediction, TENT's)",
    "first_order": "stop the meta-tailoring gradient through the inner steps (first order)",
    # GCS.
    "gcs.weighted": "scale each kept auxiliary gradient by its cosine max(0, cos) instead of 0/1",
    # MAOAL.
    "maoal.meta_lr": "Adam learning rate of the importance matrix W",
    "maoal_generate.meta_lr": "Adam learning rate of the importance matrix W and the generator",
    # OL-AUX.
    "olaux.beta": "step size of the weight update (times the current learning rate)",
    "olaux.reduce": "how a weight step combines its N gradient products: mean (ours) | sum "
                    "(the authors')",
    "olaux.smooth": "K: products of the mean gradients of the last K steps (1: each step's own)",
    "olaux.log_losses": "train on log L_pri + sum_k w_k log(L_k + log_min_loss) (the authors')",
    "olaux.main_gradient": "main gradient of the products: primary (g_0) | total (the whole "
                           "weighted loss's, the authors')",
    "olaux.log_min_loss": "offset of the auxiliary losses before the log (log_losses)",
    "olaux.authors": "the authors' settings at once: reduce=sum, smooth=4, log_losses, "
                     "main_gradient=total, beta 5",
    # RL-AUX.
    "rlaux.weight_aware": "the agent also picks a weight bin for each image's auxiliary loss",
    "rlaux.weight_bins": "number of weight bins (weights 2^(8 w - 3), w in [0, 1])",
    "rlaux.soft_target": "the authors' mask-softmax target of the chosen class (else one-hot)",
    "rlaux.primary_weight": "the primary phase's auxiliary weight from the policy's bins: argmax "
                            "(the most likely bin's, the authors') | expected | sample",
    "rlaux.entropy_reward": "weight of the batch-mean target's entropy in the reward",
    "rlaux.feature_dim": "width of the policy's softmax feature layer",
    "rlaux.ppo_lr": "Adam learning rate of the policy",
    "rlaux.ppo_epochs": "PPO epochs over each rollout",
    "rlaux.ppo_batch": "PPO minibatch size",
    "rlaux.ent_coef": "PPO's policy-entropy bonus",
    "rlaux.clip": "PPO's ratio clip (1 - clip, 1 + clip)",
    "rlaux.vf_coef": "PPO's value-loss weight",
    "rlaux.max_grad_norm": "the policy's gradient is clipped to this global norm",
    "rlaux.discount": "reward discount (gamma of GAE)",
    "rlaux.gae_lambda": "lambda of generalised advantage estimation",
    "rlaux.normalize_advantage": "normalise the advantages over each minibatch",
    # WAMAL.
    "wamal.weight_range": "r: the auxiliary weights 2^(2 r s - r) lie in [2^-r, 2^r]",
    "wamal.normalize_weights": "divide the weights by their batch mean",
    "wamal.weight_form": "example (the paper's mean(w * L_aux)) | batch (the authors' code's "
                         "mean(w) * mean(L_aux))",
}


def _comments(source: str) -> dict[int, tuple[int, str]]:
    """{line: (column, text after '#')} of every comment in ``source``."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    return out


def top_level_fields(path: pathlib.Path = DEFAULT) -> list[tuple[str, str, str]]:
    """(section, field, meaning) of each ``c.<field> = ...`` in ``get_config`` of ``path``, in
    order; the meaning is "" where the field has no comment."""
    source = path.read_text()
    comments = _comments(source)
    lines = source.splitlines()
    func = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    body_col = func.body[0].col_offset
    statements = [s for s in func.body if isinstance(s, ast.Assign)
                  and isinstance(s.targets[0], ast.Attribute)
                  and isinstance(s.targets[0].value, ast.Name) and s.targets[0].value.id == "c"]
    starts = sorted(s.lineno for s in ast.walk(func) if isinstance(s, ast.stmt))
    out, section, last = [], "", func.lineno
    for s in statements:
        # Section headers: comment-only lines at the body's indentation since the last statement.
        for line in range(last + 1, s.lineno):
            col, text = comments.get(line, (None, ""))
            if col == body_col and not lines[line - 1][:col].strip():
                section = text.rstrip(".")
        words = [comments[n][1] for n in range(s.lineno, s.end_lineno + 1) if n in comments]
        line = s.end_lineno + 1
        following = [n for n in starts if n > s.end_lineno]
        stop = following[0] if following else func.end_lineno + 1
        while line < stop and line in comments and comments[line][0] > body_col \
                and not lines[line - 1][:comments[line][0]].strip():
            words.append(comments[line][1])
            line += 1
        out.append((section, s.targets[0].attr, " ".join(words)))
        last = s.end_lineno
    return out


def method_meaning(method: str, field: str) -> str:
    return METHOD_FIELDS.get(f"{method}.{field}", METHOD_FIELDS.get(field, ""))


def _type(value) -> str:
    return type(value).__name__


def reference() -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """[(group title, [(--config.name, type, default, meaning)])]: default.py's sections, then one
    group per method with fields of its own."""
    sys.path.insert(0, str(ROOT))
    from experiments.configs import default
    from maxl_jax import methods

    config = default.get_config()
    groups: dict[str, list] = {}
    for section, name, meaning in top_level_fields():
        value = config[name]
        groups.setdefault(section or "General", []).append(
            (name, _type(value), repr(tuple(value) if isinstance(value, (list, tuple)) else value),
             meaning))
    out = list(groups.items())
    for method, fields in methods.defaults().items():
        out.append((f"Method {method} (--config.{method}.<field>)",
                    [(f"{method}.{k}", _type(v), repr(v), method_meaning(method, k))
                     for k, v in fields.items()]))
    return out


def missing() -> list[str]:
    """What the reference lacks or has too many: fields without a meaning, and METHOD_FIELDS
    entries no method has."""
    from maxl_jax import methods

    problems = [f"--config.{name}: no meaning" for _, rows in reference()
                for name, _, _, meaning in rows if not meaning]
    known = {k for fields in methods.defaults().values() for k in fields}
    known |= {f"{m}.{k}" for m, fields in methods.defaults().items() for k in fields}
    problems += [f"METHOD_FIELDS[{k!r}]: no method has that field" for k in METHOD_FIELDS
                 if k not in known]
    return problems


def _methods_without_fields() -> list[str]:
    from maxl_jax import methods

    own = methods.defaults()
    return [m for m in methods.names() if m not in own]


def text() -> str:
    """The reference for a terminal (``--helpconfig``)."""
    out = ["Config fields (--config.<field>=value; defaults of experiments/configs/default.py):"]
    for title, rows in reference():
        out.append(f"\n{title}:")
        width = max(len(r[0]) for r in rows)
        for name, kind, default, meaning in rows:
            out.append(f"  {name:<{width}}  {kind:<5}  {default}")
            out.append(f"  {'':<{width}}  {meaning}")
    out.append(f"\nMethods with no fields of their own: {', '.join(_methods_without_fields())}.")
    return "\n".join(out) + "\n"


def markdown() -> str:
    """docs/CONFIG.md."""
    out = ["# Config reference", "",
           "Generated by `python -m experiments.config_reference --write` (the same text as "
           "`python -m experiments.cifar --helpconfig`); do not edit by hand: a top-level field's "
           "meaning is its comment in `experiments/configs/default.py`, a method field's is in "
           "`METHOD_FIELDS` of `experiments/config_reference.py`. Every field is set on the "
           "command line as `--config.<field>=value` (a method's own as "
           "`--config.<method>.<field>=value`); the defaults are those of "
           "`experiments/configs/default.py` (cpu.py and tiny.py change some).", ""]
    for title, rows in reference():
        out += [f"## {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, kind, default, meaning in rows:
            cell = meaning.replace("|", "\\|")
            out.append(f"| `{name}` | {kind} | `{default}` | {cell} |")
        out.append("")
    out.append(f"Methods with no fields of their own: {', '.join(_methods_without_fields())}.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print docs/CONFIG.md's text")
    p.add_argument("--write", action="store_true", help="rewrite docs/CONFIG.md")
    args = p.parse_args(argv)
    problems = missing()
    if problems:
        print("The config reference is incomplete:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.write:
        CONFIG_MD.write_text(markdown())
        print(f"wrote {CONFIG_MD}")
    else:
        print(markdown() if args.markdown else text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

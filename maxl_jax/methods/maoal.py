"""MAOAL: module-aware optimisation for auxiliary learning (Chen et al., "Module-Aware Optimization
for Auxiliary Learning", NeurIPS 2022; authors' code ``forchchch/MAOAL``, the image experiment in
its history: ``git show 4a750de:train.py`` (``hypermodel``, ``modularized_lr_MTL_implicit``,
``map_param_to_block``), ``config/params.json``, and ``gauxlearn/implicit_diff.py`` /
``gauxlearn/optim.py`` for the implicit hypergradient).

The learned hyperparameter is an importance matrix ``W`` (``K`` auxiliary tasks x ``M`` modules of
the shared network), initialised to ones and used through a ReLU. For a shared tensor ``theta_i`` in
module ``m(i)`` the lower level's update direction is the importance-parameterised gradient

    G_i(theta, W) = grad_i L_pri + s * sum_k ReLU(W[k, m(i)]) grad_i L_aux_k,   s = 1 / K

(the paper's lower level; ``hypermodel.forward`` with ``scale_factor = 1 / task_num``); the heads
get the plain gradient of ``L_pri + mean_k L_aux_k``, as the authors' ``total_loss.backward()``
gives them. The upper level minimises the primary loss ``L_dev`` on a dev split through the implicit
function theorem at the current theta, treated as a point where ``G = 0``:

    dL_dev/dW = - (dG/dW)^T q,    q = sum_{j=0..J} (I - alpha H^T)^j grad_theta L_dev,
    H = dG/dtheta

with ``G`` the importance-parameterised gradient itself (not the gradient of any loss: ``H`` is not
symmetric once the importances differ between modules, hence ``H^T``), ``J = 3`` and ``alpha = 1``,
and without the leading ``alpha`` of the Neumann series (``Hypergrad._approx_inverse_hvp``; with
``alpha = 1`` it does not matter; ``scale_by_alpha=True`` multiplies it in). ``theta`` here is the
shared network (the backbone) alone, as their ``shared_parameter`` (every parameter outside
``heads``); the heads are held fixed. This is ``maxl_jax.meta.implicit_gradient`` with
``grad_map = G``, computed from one linearisation of ``G`` (``hypergradient``). Conjugate gradient
is not offered: it needs ``H`` symmetric positive definite, which ``H`` is not here. An importance
at or below 0 is off: its task adds nothing to that module and, the ReLU being flat there, gets no
hypergradient (only the weight decay moves it).

Modules (``modules``): ``"blocks"``, the backbone's blocks, each conv layer with its BatchNorm (the
small CNN: its three blocks; VGG-16: its five; the authors' ResNet-18 used conv1..conv4 and the
rest, ``M = 5``, their ``module_wise``; our ResNet-18: its stem and four stages, ``M = 5``; a
backbone of your own: its top-level submodules, ``grouped_assignment``), or ``"tensors"``, one
module per parameter tensor (their ``param_wise``: the small CNN has 12, VGG-16 52, ResNet-18 60).

The authors' defaults (``config/params.json``): the upper step every 10 lower steps (``interval``),
from the first epoch (``pre = -1``); ``L_dev`` on one batch of a dev split of 5% of the training set
(``m_ratio``), batches of 100 (ours: the run's ``batch_size``, 100 by default); ``G`` for the upper
step on another training batch; the hypergradient clipped to global norm 10, then Adam lr 1e-2 with
L2 weight decay 5e-4 (torch's ``Adam(weight_decay=...)``) on ``W``; Neumann ``J = 3``, ``alpha = 1``
(``hpolr``). Their lower level is SGD momentum 0.9, lr 0.1, weight decay 5e-4, cosine; ours keeps
the reference MAXL optimizer (SGD 0.01, step decay) so that methods compare on one footing. The dev
split is the ``held_out`` meta source; the training batch of the upper step is the ``train`` source.

The auxiliary tasks (several allowed): ``maoal`` takes the data's labels (``--config.aux_tasks``:
``human``, ``random`` or both, like ``equal``; each task its own slice of the shared auxiliary
head); ``maoal_generate`` learns one task's labels with MAXL's label generator (mask softmax over
``psi``), trained by the same hypergradient: ``G`` depends on the generator through the soft labels,
so ``-(dG/dphi)^T q`` reaches it as it reaches ``W`` (our extension, in the manner of AuxiLearn's
"generate" variant; the generator keeps MAXL's SGD ``generator_lr`` with weight decay, ``W`` Adam).

The loss. The authors train every task with cross-entropy (``crit = nn.CrossEntropyLoss()`` in
``train.py``); ours, like every method here, uses the shared focal loss with ``--config.gamma``
(2 by default, the MAXL reference's) on the primary and the auxiliary tasks, so that a MAOAL run and
the single-task run it is compared with train the same primary loss and the paired difference is the
method's alone. ``--config.gamma=0`` is exactly their cross-entropy (the focal loss at gamma 0 is
``-log p``; ``tests/test_maoal.py::test_authors_cross_entropy_is_gamma_zero_for_every_task``); set
it (for every method compared) to reproduce their numbers.

Their heads, off by one. Their network has ``1 + K`` heads (``task_list = [5]*11``: head 0 the
primary, heads 1..K the auxiliary tasks), but the training loops take auxiliary task ``m``'s loss
from ``a_logits[m]`` for ``m = 0..K-1`` (``train.py``: ``train_model``, ``modularized_lr_MTL_implicit``
and the other loops alike), so auxiliary task 0 is trained on the *primary* head (on its own
images and labels) and the last head is never used. Ours gives auxiliary task ``k`` its own slice
of the auxiliary head and leaves the primary head to the primary task, as the paper describes; we
do not offer the off-by-one, which would make the first auxiliary task share the primary's classifier.

Where we differ from their code, deliberately: in their script each auxiliary task is a different
data set (other CIFAR-100 superclasses) with its own head; ours share the training images and one
auxiliary head, and their auxiliary losses' weight (``aux_weight``) is 1, as here (the shared
``--config.aux_weight`` is not read). BatchNorm uses batch statistics in the upper step's forwards
but their running statistics are not updated there (theirs are). Their script reports the best test
accuracy over epochs; ours the run's usual numbers.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from maxl_jax import hierarchy, losses, meta, models, steps, validation
from maxl_jax.methods import base
from maxl_jax.methods import register
from maxl_jax.methods.equal import default_tasks

LEVELS = ("blocks", "tensors")
_LAYER = re.compile(r"^(conv|bn)_(\d+)$")
_KIND_ORDER = {("conv", "kernel"): 0, ("conv", "bias"): 1, ("bn", "scale"): 2, ("bn", "bias"): 3}


# ----------------------------------------------------------------------------- the modules


def module_assignment(backbone_params: Any, convs_per_block, level: str = "blocks"):
    """Which module each tensor of the backbone belongs to.

    Args:
      backbone_params: the backbone's parameter tree (arrays or ``ShapeDtypeStruct``s); its layers
        are named ``conv_<i>`` / ``bn_<i>`` (``models.ConvBackbone``).
      convs_per_block: the backbone's conv layers per block (``ConvBackbone.convs_per_block``).
      level: ``"blocks"`` (a block's convs and BatchNorms form one module) or ``"tensors"`` (one
        module per tensor, ordered by layer, then conv kernel, conv bias, BN scale, BN bias).
    Returns:
      ``(modules, names)``: a tree of Python ints of the structure of ``backbone_params`` and the
      ``M`` module names.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown module level {level!r}; choose one of {LEVELS}")
    ends, block_of = 0, []
    for b, n in enumerate(convs_per_block):
        block_of.extend([b] * int(n))
        ends += int(n)

    def key_of(path):
        names = [getattr(p, "key", str(p)) for p in path]
        match = _LAYER.match(str(names[0]))
        if match is None or len(names) != 2:
            raise ValueError(f"backbone tensor {'/'.join(map(str, names))!r} is not a conv_<i> or "
                             f"bn_<i> layer's: MAOAL cannot place it in a module")
        layer = int(match.group(2))
        if layer >= len(block_of):
            raise ValueError(f"backbone layer {names[0]!r} is beyond the {len(block_of)} conv "
                             f"layers of convs_per_block={tuple(convs_per_block)}")
        return layer, _KIND_ORDER.get((match.group(1), names[1]), 9), "/".join(map(str, names))

    keyed = jax.tree_util.tree_map_with_path(lambda p, _: key_of(p), backbone_params)
    keys = jax.tree_util.tree_leaves(keyed, is_leaf=lambda x: isinstance(x, tuple))
    if level == "blocks":
        names = tuple(f"block{b + 1}" for b in range(len(convs_per_block)))
        index = {k: block_of[k[0]] for k in keys}
    else:
        ordered = sorted(keys)
        names = tuple(k[2] for k in ordered)
        index = {k: i for i, k in enumerate(ordered)}
    modules = jax.tree_util.tree_map(lambda k: index[k], keyed,
                                     is_leaf=lambda x: isinstance(x, tuple))
    return modules, names


def grouped_assignment(backbone_params: Any, order: Sequence[str] | None = None,
                       level: str = "blocks"):
    """``module_assignment`` for a backbone whose parameters are grouped by top-level submodule
    (``models.ResNetBackbone``: ``stem``, ``stage1``..; a ``models.CustomBackbone``: its module's
    own submodules, found below the wrapping single-child levels).

    ``"blocks"``: one module per top-level group, in ``order`` (the backbone's ``module_names``;
    None: the groups' names in natural order, ``layer2`` before ``layer10``; a parameter directly
    at the top is a group of its own). ``"tensors"``: one module per tensor, ordered by group, then
    path. Returns ``(modules, names)`` as ``module_assignment``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown module level {level!r}; choose one of {LEVELS}")
    prefix: list[str] = []
    tree = backbone_params
    while isinstance(tree, Mapping) and len(tree) == 1 and isinstance(
            next(iter(tree.values())), Mapping):  # CustomBackbone's "module" wrapper, and such
        key = next(iter(tree))
        prefix.append(str(key))
        tree = tree[key]
    if not isinstance(tree, Mapping) or not tree:
        raise ValueError("the backbone has no parameters for MAOAL to place in modules")
    natural = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]  # noqa: E731
    groups = [str(k) for k in tree]
    if order is not None:
        if sorted(order) != sorted(groups):
            raise ValueError(f"the backbone's module_names {tuple(order)} are not its top-level "
                             f"parameter groups {tuple(sorted(groups))}")
        groups = list(order)
    else:
        groups = sorted(groups, key=natural)
    rank = {g: i for i, g in enumerate(groups)}

    def key_of(path):
        names = [str(getattr(p, "key", p)) for p in path]
        return rank[names[len(prefix)]], "/".join(names)

    keyed = jax.tree_util.tree_map_with_path(lambda p, _: key_of(p), backbone_params)
    keys = jax.tree_util.tree_leaves(keyed, is_leaf=lambda x: isinstance(x, tuple))
    if level == "blocks":
        names = tuple(groups)
        index = {k: k[0] for k in keys}
    else:
        ordered = sorted(keys, key=lambda k: (k[0], natural(k[1])))
        names = tuple(k[1] for k in ordered)
        index = {k: i for i, k in enumerate(ordered)}
    modules = jax.tree_util.tree_map(lambda k: index[k], keyed,
                                     is_leaf=lambda x: isinstance(x, tuple))
    return modules, names


def importance_direction(shared_grads: Any, importance: jax.Array, modules: Any,
                         scale: float | jax.Array) -> Any:
    """``G``: ``g_0 + scale * sum_k ReLU(W[k, m]) g_k`` on each tensor of module ``m``.

    Args:
      shared_grads: the task gradients over the shared parameters, every leaf with a leading axis of
        ``1 + K`` (the primary task first).
      importance: ``W``, ``(K, M)``, raw (the ReLU is applied here).
      modules: a tree of ints (module of each tensor) of the structure of ``shared_grads``.
      scale: ``s`` (the authors' ``1 / K``).
    """
    relu = jax.nn.relu(importance)

    def one(g, m):
        w = jnp.concatenate([jnp.ones((1,), relu.dtype), scale * relu[:, m]])
        return jnp.tensordot(w.astype(g.dtype), g, axes=1)

    return jax.tree_util.tree_map(one, shared_grads, modules)


def hypergradient(grad_map, dev_loss, shared: Any, importance: Any, *, terms: int = 3,
                  alpha: float = 1.0, scale_by_alpha: bool = False) -> meta.MetaGradient:
    """MAOAL's upper-level gradient ``-(dG/dW)^T sum_{j=0..terms} (I - alpha H^T)^j grad L_dev``
    (times ``alpha`` with ``scale_by_alpha``), ``H = dG/dtheta``, at ``shared`` treated as the lower
    problem's solution, plus the dev loss's direct derivative in ``importance`` (none in MAOAL).

    ``grad_map(shared, importance) -> (G, aux)``; ``dev_loss(shared, importance) -> (loss, aux)``.
    ``importance`` may be any tree the map depends on (``W``, or ``W`` and generated labels).

    ``meta.implicit_gradient(..., grad_map=...)`` computes the same value; this form linearises
    ``G`` once, in ``shared`` and ``importance`` together, and takes both ``H^T u`` (the Neumann
    products) and ``(dG/dW)^T q`` from that one linearisation: one forward of ``G`` fewer per meta
    step, and a program about half the size to compile.
    """
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
        raise ValueError(f"terms must be an integer >= 0 (got {terms!r})")
    (out_loss, out_aux), (v, direct) = jax.value_and_grad(
        dev_loss, argnums=(0, 1), has_aux=True)(shared, importance)
    _, vjp, aux = jax.vjp(grad_map, shared, importance, has_aux=True)
    q = meta.neumann_inverse(lambda u: vjp(u)[0], v, terms=terms, alpha=alpha,
                             scale_by_alpha=scale_by_alpha)
    mixed = vjp(q)[1]
    grad = jax.tree_util.tree_map(lambda a, b: a - b, direct, mixed)
    return meta.MetaGradient(out_loss, grad, shared, None, aux, out_aux)


# ------------------------------------------------------------------------------- the method


@register
class Maoal(base.Method):
    """MAOAL: a module-wise importance of each auxiliary task's gradient, learned by the implicit
    hypergradient of a dev-split primary loss through the importance-parameterised gradient.

    Attributes:
      meta_optimizer: optax transformation of the learned state (clip, L2 decay, Adam on ``W``).
      modules: ``"blocks"`` or ``"tensors"``.
      terms: ``J`` of the Neumann series; alpha: its step; scale_by_alpha: multiply the sum by
        ``alpha`` (the IFT value; default off, the authors').
      initial_importance: ``W``'s initial value (1).
    """

    name = "maoal"
    config_fields = ("aux_tasks", "psi", "aux_per_class")
    learned: ClassVar[tuple[str, ...]] = ("importance",)
    train_checked = base.Method.train_checked + ("auxiliary_loss",)
    meta_checked = ("meta_loss", "grad_norm", "update_norm", "importance_mean")
    report = (("meta_loss", "dev primary loss"), ("importance_mean", "mean ReLU(W)"))

    meta_optimizer: optax.GradientTransformation
    modules: str = "blocks"
    terms: int = 3
    alpha: float = 1.0
    scale_by_alpha: bool = False
    initial_importance: float = 1.0
    schedule: base.MetaSchedule = base.MetaSchedule(every=10, sources=("held_out", "train"))
    held_out_fraction: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.modules not in LEVELS:
            raise ValueError(f"unknown modules {self.modules!r}; choose one of {LEVELS}")
        if not self.aux_sizes:
            raise ValueError(f"method {self.name!r} needs at least one auxiliary task")
        if isinstance(self.terms, bool) or not isinstance(self.terms, int) or self.terms < 0:
            raise ValueError(f"terms must be an integer >= 0, got {self.terms!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if tuple(self.schedule.sources) != ("held_out", "train"):
            raise ValueError(f"MAOAL's meta step takes a dev (held_out) and a training batch: "
                             f"sources ('held_out', 'train'), got {self.schedule.sources}")

    # ------------------------------------------------------------------ building from a config
    @classmethod
    def defaults(cls) -> dict:
        return {"modules": "blocks", "every": 10, "held_out_fraction": 0.05, "meta_lr": 1e-2,
                "meta_weight_decay": 5e-4, "clip": 10.0, "terms": 3, "alpha": 1.0,
                "scale_by_alpha": False}

    @classmethod
    def mode_of(cls, config) -> dict[str, str]:
        mode = super().mode_of(config)
        ce = float(config.get("gamma", 2.0)) == 0
        mode["loss"] += " (the authors')" if ce else " (ours; the authors': cross-entropy, gamma 0)"
        mode["auxiliary heads"] = "each task its own (the paper; the authors' script is off by one)"
        return mode

    @classmethod
    def check_fields(cls, fields) -> None:
        where = f"{cls.name}."
        if fields.modules not in LEVELS:
            raise validation.ConfigError(f"--config.{where}modules={fields.modules!r} is not one "
                                         f"of {LEVELS} (the backbone's blocks, or one per tensor)")
        validation.check_range("every", fields.every, "int", 1, prefix=where)
        validation.check_range("held_out_fraction", fields.held_out_fraction, "float", 0.0, False,
                               high=0.9, prefix=where)
        validation.check_range("meta_lr", fields.meta_lr, "float", 0.0, False, prefix=where)
        validation.check_range("meta_weight_decay", fields.meta_weight_decay, "float", 0.0,
                               prefix=where)
        validation.check_range("clip", fields.clip, "float", 0.0, False, prefix=where)
        validation.check_range("terms", fields.terms, "int", 0, prefix=where)
        validation.check_range("alpha", fields.alpha, "float", 0.0, False, prefix=where)

    @classmethod
    def held_out_fraction_of(cls, config) -> float:
        return float(config[cls.name].held_out_fraction)

    @classmethod
    def importance_optimizer(cls, c) -> optax.GradientTransformation:
        """L2 weight decay then Adam (torch's ``Adam(weight_decay=...)``) for ``W``."""
        return optax.chain(optax.add_decayed_weights(float(c.meta_weight_decay)),
                           optax.adam(float(c.meta_lr)))

    @classmethod
    def common_fields(cls, config, setup: base.Setup) -> dict:
        c = config[cls.name]
        return dict(multitask_optimizer=base.multitask_optimizer(config, setup), gamma=config.gamma,
                    meta_optimizer=optax.chain(optax.clip_by_global_norm(float(c.clip)),
                                               cls.importance_optimizer(c)),
                    modules=str(c.modules), terms=int(c.terms), alpha=float(c.alpha),
                    scale_by_alpha=bool(c.scale_by_alpha),
                    schedule=base.MetaSchedule(every=int(c.every), sources=("held_out", "train")),
                    held_out_fraction=float(c.held_out_fraction))

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        tasks = base.label_tasks(config, setup, default_tasks(setup))
        multitask, _ = base.networks(config, setup, sum(sum(t.psi) for t in tasks))
        return cls(multitask=multitask, aux_tasks=tasks, **cls.common_fields(config, setup))

    # ---------------------------------------------------------------------------- properties
    @property
    def num_tasks(self) -> int:
        """``K``, the number of auxiliary losses."""
        return len(self.aux_sizes)

    @property
    def scale(self) -> float:
        """``s = 1 / K`` (the authors' ``scale_factor``)."""
        return 1.0 / self.num_tasks

    def module_assignment(self, backbone_params):
        """``(modules, names)`` of this method's level for the backbone ``backbone_params``: by
        conv layer for the VGG-style backbones (``convs_per_block``), else by top-level submodule
        (``grouped_assignment``: ResNet-18's stem and stages, a custom module's submodules)."""
        backbone = self.multitask.backbone
        if hasattr(backbone, "convs_per_block"):
            return module_assignment(backbone_params, backbone.convs_per_block, self.modules)
        return grouped_assignment(backbone_params, getattr(backbone, "module_names", None),
                                  self.modules)

    def module_names(self, image_shape=(32, 32, 3)) -> tuple[str, ...]:
        """The ``M`` module names (the columns of ``W``)."""
        shapes = jax.eval_shape(lambda: self.multitask.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), False))
        return self.module_assignment(shapes["params"]["backbone"])[1]

    # -------------------------------------------------------------------------------- state
    def init_method_state(self, rng, dummy_images):
        shapes = jax.eval_shape(lambda: self.multitask.init(rng, dummy_images, False))
        _, names = self.module_assignment(shapes["params"]["backbone"])
        importance = jnp.full((self.num_tasks, len(names)), self.initial_importance, jnp.float32)
        return {"importance": importance,
                "opt_state": self.meta_optimizer.init({"importance": importance})}

    # ---------------------------------------------------------------------------- the maths
    def task_gradients_with(self, params, batch_stats, batch, targets, axis_name=None):
        """Each task's loss and gradient (leading axis ``1 + K``), the new BatchNorm statistics and
        the primary logits, with the auxiliary ``targets`` ``(B, sum(aux_sizes))``."""
        return self.task_gradients(params, batch_stats, batch, axis_name, targets=targets)

    def direction(self, grads, importance):
        """The update direction of every parameter: ``G`` on the backbone, the gradient of
        ``L_pri + mean_k L_aux_k`` on the heads."""
        modules, _ = self.module_assignment(grads["backbone"])
        heads = jnp.concatenate([jnp.ones((1,), jnp.float32),
                                 jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)])
        out = {k: jax.tree_util.tree_map(lambda g: jnp.tensordot(heads.astype(g.dtype), g, axes=1),
                                         v) for k, v in grads.items() if k != "backbone"}
        out["backbone"] = importance_direction(grads["backbone"], importance, modules, self.scale)
        return out

    def targets(self, state, batch, axis_name):
        """``(hyper, targets_of, carry)``: what ``G`` depends on besides theta (here ``W``), the
        auxiliary targets as a function of it, and state to keep (none here)."""
        return ({"importance": state.method_state["importance"]},
                lambda hyper: self.data_targets(batch), {})

    # ---------------------------------------------------------------------------- the steps
    def train_step(self, state, batch, axis_name=None):
        hyper, targets_of, carry = self.targets(state, batch, axis_name)
        hyper = jax.lax.stop_gradient(hyper)
        values, grads, stats, logits = self.task_gradients_with(
            state.multitask_params, state.multitask_batch_stats, batch, targets_of(hyper),
            axis_name)
        direction = self.direction(grads, hyper["importance"])
        new_state, norms = self.update_multitask(
            state, direction, stats, method_state={**state.method_state, **carry})
        return new_state, {
            "loss": values[0] + jnp.mean(values[1:]), "primary_loss": values[0],
            "auxiliary_loss": jnp.mean(values[1:]), "task_losses": values[1:],
            "accuracy": losses.accuracy(logits, batch["primary"], axis_name, batch.get("mask")),
            **norms}

    def hypergradient(self, state, batches, axis_name=None):
        """The upper-level gradient: ``L_dev`` on ``batches['held_out']``, ``G`` on
        ``batches['train']``, theta = the backbone (heads fixed).

        Returns ``(grads, result, carry)``: ``grads`` has the structure of the learned state's
        ``learned`` entries; ``result`` is the ``meta.MetaGradient`` w.r.t. ``hyper``.
        """
        dev, batch = batches["held_out"], batches["train"]
        hyper, targets_of, carry = self.targets(state, batch, axis_name)
        params, stats = state.multitask_params, state.multitask_batch_stats
        heads = {k: v for k, v in params.items() if k != "backbone"}
        modules, _ = self.module_assignment(params["backbone"])

        def grad_map(shared, h):
            values, grads, _, _ = self.task_gradients_with(
                {**heads, "backbone": shared}, stats, batch, targets_of(h), axis_name)
            return importance_direction(grads["backbone"], h["importance"], modules,
                                        self.scale), values

        def dev_loss(shared, h):
            logits, _, _ = self.forward({**heads, "backbone": shared}, stats, dev["image"],
                                        axis_name, dev.get("mask"))
            return losses.batch_mean(self.primary_losses(logits, dev["primary"]), axis_name,
                                     dev.get("mask")), {}

        result = hypergradient(grad_map, dev_loss, params["backbone"], hyper, terms=self.terms,
                               alpha=self.alpha, scale_by_alpha=self.scale_by_alpha)
        grads = self.hypergradient_to_learned(state, batch, result.grad_hyper, axis_name)
        return grads, result, carry

    def hypergradient_to_learned(self, state, batch, grad_hyper, axis_name):
        """The hypergradient w.r.t. the learned state (here ``W`` itself)."""
        return {"importance": grad_hyper["importance"]}

    def meta_step(self, state, batches, axis_name=None):
        """One update of ``W`` (clipped hypergradient, L2 decay, Adam)."""
        grads, result, carry = self.hypergradient(state, batches, axis_name)
        learned = {k: state.method_state[k] for k in self.learned}
        new, opt_state, norms = steps.apply_update(self.meta_optimizer, learned,
                                                   state.method_state["opt_state"], grads)
        new_state = state.replace(meta_step=state.meta_step + 1,
                                  method_state={**state.method_state, **carry, **new,
                                                "opt_state": opt_state})
        relu = jax.nn.relu(new["importance"])
        return new_state, {"meta_loss": result.outer_loss, "train_task_losses": result.inner_aux,
                           "importance": relu, "importance_mean": jnp.mean(relu),
                           "importance_grad": grads["importance"], **norms}


# -------------------------------------------------------------------------- the generate variant


@register
class MaoalGenerate(Maoal):
    """MAOAL with one auxiliary task whose labels MAXL's label generator produces (mask softmax
    over ``psi``); ``W`` and the generator both follow the hypergradient through ``G``.

    Attributes:
      generator: the label generator (``models.LabelGenerator``, ``sum(psi)`` outputs).
      psi: the hierarchy of the generated labels.
    """

    name = "maoal_generate"
    config_fields = ("psi", "aux_per_class", "generator_lr", "weight_decay")
    learned = ("importance", "generator")

    generator: models.LabelGenerator
    psi: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "psi",
                           hierarchy.validate_psi(self.psi, self.multitask.num_primary))
        super().__post_init__()
        if not (self.multitask.num_auxiliary == self.generator.num_auxiliary == sum(self.psi)):
            raise ValueError(f"the auxiliary head ({self.multitask.num_auxiliary}) and the "
                             f"generator ({self.generator.num_auxiliary}) need sum(psi) = "
                             f"{sum(self.psi)} outputs")

    @classmethod
    def from_config(cls, config, setup: base.Setup):
        psi = base.psi_of(config, setup)
        multitask, generator = base.networks(config, setup, sum(psi))
        fields = cls.common_fields(config, setup)
        c = config[cls.name]
        # W: Adam (the authors'); the generator: MAXL's SGD with L2 weight decay. One clip on both.
        fields["meta_optimizer"] = optax.chain(
            optax.clip_by_global_norm(float(c.clip)),
            optax.multi_transform(
                {"importance": cls.importance_optimizer(c),
                 "generator": optax.chain(optax.add_decayed_weights(float(config.weight_decay)),
                                          optax.sgd(float(config.generator_lr)))},
                lambda tree: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in tree.items()}))
        return cls(multitask=multitask, generator=generator, psi=psi, **fields)

    @property
    def aux_sizes(self) -> tuple[int, ...]:
        return (sum(self.psi),)

    def init_method_state(self, rng, dummy_images):
        m_key, g_key = jax.random.split(rng)
        shapes = jax.eval_shape(lambda: self.multitask.init(m_key, dummy_images, False))
        _, names = self.module_assignment(shapes["params"]["backbone"])
        g_vars = self.generator.init(g_key, dummy_images, False)
        learned = {"importance": jnp.full((1, len(names)), self.initial_importance, jnp.float32),
                   "generator": g_vars["params"]}
        return {**learned, "generator_batch_stats": g_vars["batch_stats"],
                "opt_state": self.meta_optimizer.init(learned)}

    def _generate(self, state, batch, axis_name, gen_params=None):
        return base.generated_labels(self, state, batch, axis_name, gen_params)

    def targets(self, state, batch, axis_name):
        # G sees the generator only through this batch's soft labels; hypergradient_to_learned
        # chains their gradient to the generator's parameters.
        soft, g_stats = self._generate(state, batch, axis_name)
        return ({"importance": state.method_state["importance"], "soft": soft},
                lambda hyper: hyper["soft"], {"generator_batch_stats": g_stats})

    def hypergradient_to_learned(self, state, batch, grad_hyper, axis_name):
        _, labels_vjp = jax.vjp(lambda g: self._generate(state, batch, axis_name, g)[0],
                                state.method_state["generator"])
        (gen_grad,) = labels_vjp(grad_hyper["soft"])
        return {"importance": grad_hyper["importance"], "generator": gen_grad}

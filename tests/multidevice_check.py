"""Run as a script with 8 fake CPU devices (set before JAX starts): the same steps on 1 device, on 8
devices through jit + NamedSharding, and on 8 devices through shard_map with axis_name; and every
registered method's training and meta steps on 1 and 8 devices.

Prints one JSON line: the largest relative difference against the 1-device result for each path
(``methods``: per method). Used by tests/test_parallel.py in a subprocess.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import tiny  # noqa: E402
from maxl_jax import maxl, methods, models, parallel, steps  # noqa: E402
from maxl_jax.methods.maxl import Maxl  # noqa: E402

PSI = (2, 3, 2)


def rel_diff(a, b) -> float:
    fa = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(a)])
    fb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(b)])
    return float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-30))


def main():
    assert jax.device_count() == 8, jax.devices()
    mt, gen = models.make_networks("small", len(PSI), sum(PSI), sum(PSI), width=4)
    f_opt, g_opt, inner = steps.reference_optimizers(10)
    trainer = Maxl(multitask=mt, multitask_optimizer=f_opt, generator=gen, psi=PSI,
                   generator_optimizer=g_opt, inner_lr=inner)
    state0 = trainer.init(jax.random.PRNGKey(0), (16, 16, 3))
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.normal(size=(32, 16, 16, 3)), jnp.float32),
             "primary": jnp.asarray(rng.integers(0, len(PSI), 32), jnp.int32)}

    def run(step_set):
        # A copy: the compiled steps donate their state argument.
        s = step_set.place_state(jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0))
        s, m1 = step_set.train_step(s, batch)
        s, m2 = step_set.meta_step(s, {"train": batch})
        ev = step_set.eval_step(s, batch)
        return jax.device_get((s, m1["loss"], m2["meta_loss"], ev))

    one = run(parallel.DataParallelSteps(trainer, (16, 16, 3), parallel.make_mesh(jax.devices()[:1])))
    eight = run(parallel.DataParallelSteps(trainer, (16, 16, 3), parallel.make_mesh()))

    mesh = parallel.make_mesh()

    class ShardMapped:
        theta1_step = staticmethod(parallel.shard_map_step(trainer.train_step, mesh))
        theta2_step = staticmethod(parallel.shard_map_step(trainer.meta_step, mesh))
        eval_step = staticmethod(parallel.shard_map_step(
            lambda s, b, axis_name: (s, trainer.eval_step(s, b, axis_name)), mesh))

    sm_state, sm_l1 = ShardMapped.theta1_step(state0, batch)
    sm_state, sm_l2 = ShardMapped.theta2_step(sm_state, {"train": batch})
    _, sm_ev = ShardMapped.eval_step(sm_state, batch)
    shard_mapped = jax.device_get((sm_state, sm_l1["loss"], sm_l2["meta_loss"], sm_ev))

    # The bare meta-gradient too, on 8 devices via shard_map.
    f_vars, g_vars = state0.multitask_variables, Maxl.generator_variables(state0)
    mg1 = jax.jit(lambda x, y: maxl.generator_meta_gradient(mt, gen, f_vars, g_vars, x, y, PSI).grad)(
        batch["image"], batch["primary"])
    mg8 = jax.jit(jax.shard_map(
        lambda x, y: maxl.generator_meta_gradient(mt, gen, f_vars, g_vars, x, y, PSI,
                                        axis_name=parallel.DATA_AXIS).grad,
        mesh=mesh, in_specs=(jax.P(parallel.DATA_AXIS), jax.P(parallel.DATA_AXIS)),
        out_specs=jax.P()))(batch["image"], batch["primary"])
    def update_of(result):
        """What the two steps changed (params and BatchNorm statistics), plus losses and eval sums:
        differences here are not hidden by the much larger unchanged parameters."""
        s = result[0]
        moved = jax.tree_util.tree_map(
            lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
            (s.multitask_params, s.multitask_batch_stats, s.method_state["params"],
             s.method_state["batch_stats"]),
            (state0.multitask_params, state0.multitask_batch_stats, state0.method_state["params"],
             state0.method_state["batch_stats"]))
        return moved, result[1:]

    # Every method on a batch the 8 devices do not divide (30: padded to 32 and masked), against
    # the same batch on 1 device. (MAXL on a divisible batch: jit_8_devices above; every method's
    # whole loop on 8 devices with a divisible batch: tests/test_every_method.py for two.)
    odd = {k: v[:30] for k, v in batch.items()}
    per_method = {name: every_method(name, mesh, odd) for name in methods.names()}

    # MAXL on 12 examples (padded to 16) against 1 device, with the evaluation sums too.
    twelve = {k: v[:12] for k, v in batch.items()}

    def run_12(step_set):
        s = step_set.place_state(jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0))
        s, m1 = step_set.train_step(s, twelve)
        s, m2 = step_set.meta_step(s, {"train": twelve})
        return jax.device_get((s, m1["loss"], m2["meta_loss"], step_set.eval_step(s, twelve)))

    padded_12 = rel_diff(update_of(run_12(parallel.DataParallelSteps(trainer, (16, 16, 3), mesh))),
                         update_of(run_12(parallel.DataParallelSteps(
                             trainer, (16, 16, 3), parallel.make_mesh(jax.devices()[:1])))))

    print(json.dumps({
        "jit_8_devices": rel_diff(update_of(eight), update_of(one)),
        "shard_map_8_devices": rel_diff(update_of(shard_mapped), update_of(one)),
        "update_norm": float(np.sqrt(sum(np.sum(x ** 2) for x in
                                         jax.tree_util.tree_leaves(update_of(one)[0])))),
        "padded_12_on_8_devices": padded_12,
        "meta_gradient_shard_map": rel_diff(mg8, mg1),
        "meta_gradient_norm": float(steps.global_norm(mg1)),
        "methods": per_method,
    }))


def every_method(name: str, mesh, batch) -> dict:
    """One training step and (if any) one meta step of method ``name`` on 1 and on 8 devices: the
    relative difference of what they changed, and the size of the change."""
    config = tiny.get_config()
    config.method, config.width, config.aux_tasks = name, 2, "human,random"
    setup = methods.Setup(num_primary=len(PSI), psi_human=PSI, steps_per_epoch=10, dataset="test")
    method = methods.build(config, setup)
    state0 = method.init(jax.random.PRNGKey(1), (16, 16, 3))
    rng = np.random.default_rng(2)
    primary = np.asarray(batch["primary"])

    def labels(psi):  # a class inside each example's block of psi
        psi = np.asarray(psi)
        starts = np.concatenate([[0], np.cumsum(psi)[:-1]])
        return starts[primary] + rng.integers(0, 99, len(primary)) % psi[primary]

    aux = (np.stack([labels(t.psi) for t in method.aux_tasks], 1) if method.aux_tasks else None)
    train_batch = dict(batch, **({"aux": jnp.asarray(aux, jnp.int32)} if aux is not None else {}))
    meta_batches = {s: (train_batch if s == "same" else
                        {k: jnp.roll(v, 5, axis=0) for k, v in train_batch.items()})
                    for s in method.schedule.sources}

    def run(step_set):
        s = step_set.place_state(jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0))
        s, _ = step_set.train_step(s, train_batch)
        if method.has_meta:
            s, _ = step_set.meta_step(s, meta_batches)
        return jax.device_get(s)

    def moved(s):
        return jax.tree_util.tree_map(
            lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
            (s.multitask_params, s.multitask_batch_stats, s.method_state),
            (state0.multitask_params, state0.multitask_batch_stats, state0.method_state))

    one = moved(run(parallel.DataParallelSteps(method, (16, 16, 3),
                                               parallel.make_mesh(jax.devices()[:1]))))
    eight = moved(run(parallel.DataParallelSteps(method, (16, 16, 3), mesh)))
    size = float(np.sqrt(sum(np.sum(x ** 2) for x in jax.tree_util.tree_leaves(one))))
    return {"rel_diff": rel_diff(eight, one), "update_norm": size}


if __name__ == "__main__":
    sys.exit(main())

"""Backbones beyond VGG-16 and the small CNN: the CIFAR ResNet-18 (``--config.arch=resnet18``) and a
Flax module of the user's own (``models.make_networks(arch=...)``,
``--config.arch=package.module:Factory``; the modules are in ``tests/user_backbone.py``).

Parameter counts and every method's steps are checked with ``jax.eval_shape`` (traced, nothing
compiled or run); the runs use the tiny config at width 1-3.
"""

import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from experiments.configs import tiny
from maxl_jax import conv, methods, models, validation
from maxl_jax.checkpoint import CheckpointError
from maxl_jax.methods.maoal import Maoal

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import user_backbone  # noqa: E402
from run_outputs import final_state, records  # noqa: E402
from test_every_method import run_in_process  # noqa: E402


def param_shapes(module, image_shape=(32, 32, 3)):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              jnp.zeros((2, *image_shape)), False))


def cifar_resnet18_count(w: int = 64) -> int:
    """The CIFAR ResNet-18's parameters without its fc, summed layer by layer (convolutions have no
    bias; a BatchNorm has a scale and a bias per channel), filters ``(w, 2w, 4w, 8w)``.

    At ``w = 64``:
      stem: 3x3x3x64 conv 1,728 + BN 128 = 1,856
      stage 1 (64): 2 blocks x (2 x 3x3x64x64 = 73,728 + 2 BN x 128) = 147,968
      stage 2 (128): block 1: 3x3x64x128 73,728 + 3x3x128x128 147,456 + 2 BN 512 + shortcut
        1x1x64x128 8,192 + BN 256 = 230,144; block 2: 2 x 147,456 + 512 = 295,424; = 525,568
      stage 3 (256): 294,912 + 589,824 + 1,024 + 32,768 + 512 = 919,040; + 2 x 589,824 + 1,024
        = 1,180,672; = 2,099,712
      stage 4 (512): 1,179,648 + 2,359,296 + 2,048 + 131,072 + 1,024 = 3,673,088; + 2 x 2,359,296
        + 2,048 = 4,720,640; = 8,393,728
      total 1,856 + 147,968 + 525,568 + 2,099,712 + 8,393,728 = 11,168,832
    = 11,173,962 (the torchvision-style CIFAR ResNet-18 with a 10-class fc) - (512 x 10 + 10).
    """
    total = 3 * 3 * 3 * w + 2 * w  # stem
    cin = w
    for features, stride in zip((w, 2 * w, 4 * w, 8 * w), (1, 2, 2, 2)):
        for b in range(2):
            total += 9 * cin * features + 2 * features + 9 * features * features + 2 * features
            if b == 0 and (stride != 1 or cin != features):
                total += cin * features + 2 * features  # 1x1 projection + BN
            cin = features
    return total


def test_resnet18_at_full_width_has_the_cifar_resnet18s_parameters():
    assert cifar_resnet18_count(64) == 11_168_832 == 11_173_962 - (512 * 10 + 10)
    multitask, generator = models.make_networks("resnet18", 20, 100, 100)
    variables = param_shapes(multitask)
    backbone = variables["params"]["backbone"]
    assert models.count_params(backbone) == 11_168_832
    assert models.count_params(param_shapes(generator)["params"]["backbone"]) == 11_168_832
    # its layers: a 3x3 stem of 64 filters, stride 1 (no max-pool: 32x32 stays 32x32 into stage 1),
    # no conv bias, projections exactly where the shape changes, 512 features into 512-wide heads
    assert backbone["stem"]["conv"]["kernel"].shape == (3, 3, 3, 64)
    assert not any(path[-1].key == "bias" and "conv" in path[-2].key
                   for path, _ in jax.tree_util.tree_leaves_with_path(backbone))
    shortcuts = sorted(f"{s}/{b}" for s in backbone for b in backbone[s]
                       if "shortcut_conv" in backbone[s][b])
    assert shortcuts == ["stage2/block1", "stage3/block1", "stage4/block1"]
    assert backbone["stage4"]["block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert variables["params"]["primary_head"]["hidden"]["kernel"].shape == (512, 512)
    assert variables["batch_stats"]["backbone"]["stage1"]["block2"]["bn_1"]["mean"].shape == (64,)
    features = jax.eval_shape(lambda x: multitask.backbone.init_with_output(
        jax.random.PRNGKey(0), x, False)[0], jnp.zeros((2, 32, 32, 3)))
    assert features.shape == (2, 512)


@pytest.mark.parametrize("width", [1, 3])
def test_width_scales_every_resnet18_filter_count(width):
    multitask, _ = models.make_networks("resnet18", 4, 8, 8, width=width)
    backbone = param_shapes(multitask, (28, 28, 1))["params"]["backbone"]
    assert models.count_params(backbone) == cifar_resnet18_count(width) - 9 * 3 * width + 9 * width
    assert backbone["stage4"]["block2"]["conv_1"]["kernel"].shape == (3, 3, 8 * width, 8 * width)
    assert multitask.head_width == 8 * width


def test_resnet18_computes_in_the_compute_dtype_with_float32_parameters_and_logits():
    multitask, _ = models.make_networks("resnet18", 4, 8, 8, width=1, dtype="bfloat16")
    variables = param_shapes(multitask)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    features = jax.eval_shape(lambda v, x: multitask.backbone.apply(
        {k: c["backbone"] for k, c in v.items()}, x, False), variables, x)
    assert features.dtype == jnp.bfloat16
    primary, aux = jax.eval_shape(lambda v, x: multitask.apply(v, x, False), variables, x)
    assert primary.dtype == aux.dtype == jnp.float32


@pytest.mark.parametrize("impl", ["xla", "patches", "shifted_matmul", "hybrid"])
@pytest.mark.parametrize("size", [8, 7])
def test_strided_conv3x3_is_lax_strided_convolution_and_its_gradient(impl, size):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    want = lambda x, k: lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = lambda x, k: conv.conv3x3(x, k, impl=impl, stride=2)  # noqa: E731
    assert got(x, k).shape == (2, (size + 1) // 2, (size + 1) // 2, 4)
    np.testing.assert_allclose(got(x, k), want(x, k), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    for a, b in zip(jax.grad(loss(got), (0, 1))(x, k), jax.grad(loss(want), (0, 1))(x, k)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv1x1_shortcut_is_flax_1x1_strided_conv():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 7, 3)), jnp.float32)
    ours = models.Conv1x1(5, stride=2)
    variables = ours.init(jax.random.PRNGKey(0), x)
    flax_conv = nn.Conv(5, (1, 1), strides=(2, 2), use_bias=False, padding="VALID")
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x),
                               rtol=1e-5, atol=1e-6)


def test_maoal_modules_of_resnet18_are_its_stem_and_stages_or_its_60_tensors():
    multitask, _ = models.make_networks("resnet18", 20, 100, 100, width=1)
    for level, count in (("blocks", 5), ("tensors", 60)):
        m = Maoal(multitask=multitask, multitask_optimizer=optax.sgd(0.01),
                  aux_tasks=(methods.AuxTask("human", (5,) * 20),), meta_optimizer=optax.adam(1e-2),
                  modules=level)
        backbone = param_shapes(multitask)["params"]["backbone"]
        modules, names = m.module_assignment(backbone)
        assert len(names) == count
        assert sorted(set(jax.tree_util.tree_leaves(modules))) == list(range(count))
    blocks, names = Maoal(multitask=multitask, multitask_optimizer=optax.sgd(0.01),
                          aux_tasks=(methods.AuxTask("human", (5,) * 20),),
                          meta_optimizer=optax.adam(1e-2)).module_assignment(backbone)
    assert names == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert blocks["stem"]["conv"]["kernel"] == 0
    assert blocks["stage3"]["block1"]["shortcut_bn"]["scale"] == 3


# --------------------------------------------------------------------- a backbone of one's own


@pytest.mark.parametrize("arch", [user_backbone.Tiny, user_backbone.tiny_factory,
                                  user_backbone.Tiny(width=3), "user_backbone:Tiny"])
def test_any_flax_module_is_a_backbone_of_both_networks(arch):
    """A Module class, a function returning a Module, an instance, or the CLI's string: f and g
    each get their own instance; the heads are as wide as the module's features (a feature map
    pooled: Tiny's 3 channels); its flax BatchNorm statistics are the networks' batch_stats."""
    width = None if isinstance(arch, nn.Module) else 3
    multitask, generator = models.make_networks(arch, 4, 20, 20, width=width)
    assert multitask.backbone.module is not generator.backbone.module
    assert multitask.head_width == generator.head_width == 3
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    f_vars = multitask.init(jax.random.PRNGKey(0), x, False)
    assert f_vars["params"]["backbone"]["module"]["Conv_0"]["kernel"].shape == (3, 3, 3, 3)
    assert f_vars["params"]["primary_head"]["hidden"]["kernel"].shape == (3, 3)
    (primary, aux), updated = multitask.apply(f_vars, x, True, mutable=["batch_stats"])
    assert primary.shape == (4, 4) and aux.shape == (4, 20)
    stats = updated["batch_stats"]["backbone"]["module"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], 0)  # train=True reached the module's BatchNorm
    assert generator.apply(generator.init(jax.random.PRNGKey(1), x, False), x, False).shape == (4, 20)


def test_a_module_without_batchnorm_or_train_argument_gets_an_empty_batch_stats():
    multitask, _ = models.make_networks(user_backbone.Pooled, 2, 5, 5, width=7)
    assert multitask.head_width == 7
    variables = param_shapes(multitask)
    assert variables["batch_stats"] == {"backbone": {"none": jax.ShapeDtypeStruct((),
                                                                                  jnp.float32)}}


@pytest.mark.parametrize("arch, width, message", [
    ("no_such_module_xyz:Net", None, "there is no module 'no_such_module_xyz' to import. Fix"),
    ("user_backbone:Nope", None, "module 'user_backbone' ("),
    ("user_backbone", None, "unknown architecture 'user_backbone'; give one of vgg16, resnet18"),
    ("user_backbone:not_a_module", None, "returned a str, not a flax.linen Module"),
    ("user_backbone:no_width", 4, "no_width takes no 'width' argument"),
    ("user_backbone:returns_nonsense_features", None, "fails on images of shape (batch, 32, 32, 3)"),
])
def test_a_bad_backbone_is_one_config_error_naming_the_problem_and_the_fix(arch, width, message):
    with pytest.raises(validation.ConfigError) as e:
        models.make_networks(arch, 2, 5, 5, width=width)
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert text.startswith("--config.arch")


def test_a_backbone_of_ones_own_refuses_a_precision_it_would_not_get():
    with pytest.raises(validation.ConfigError, match="computes in its own precision"):
        models.make_networks(user_backbone.Tiny, 2, 5, 5, dtype="bfloat16")


# ----------------------------------------------------------------------------- every method


def _step_shapes(name, arch, width):
    config = tiny.get_config()
    config.method, config.arch, config.width, config.aux_tasks = name, arch, width, "human,random"
    config.dataset = "cifar100"
    psi = (2, 3, 1, 2)
    setup = methods.Setup(num_primary=4, psi_human=psi, steps_per_epoch=3, dataset="cifar100")
    method = methods.build(config, setup)
    state = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), (32, 32, 3)))
    b = 8
    batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32),
             "primary": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if method.aux_tasks:
        batch["aux"] = jax.ShapeDtypeStruct((b, len(method.aux_tasks)), jnp.int32)
    after, _ = jax.eval_shape(method.train_step, state, batch)
    if method.has_meta:
        after, _ = jax.eval_shape(method.meta_step, after,
                                  {s: batch for s in method.schedule.sources})
    return state, after


def _same_shapes(state, after):
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(state)
    assert (jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), after)
            == jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), state))


@pytest.mark.parametrize("name", methods.names())
def test_every_methods_steps_trace_on_a_module_of_ones_own(name):
    """Each method's training and meta steps, traced with ``jax.eval_shape`` on a user's module
    (flax BatchNorm, a feature map to pool), return a state of the initial state's structure and
    shapes."""
    state, after = _step_shapes(name, "user_backbone:Tiny", 2)
    assert "Conv_0" in state.multitask_params["backbone"]["module"]
    _same_shapes(state, after)


# the methods that reach into the backbone themselves (MAOAL's modules, DTG's features, RL-AUX's
# policy on the generator's backbone) and MAXL's generator; the others go through the networks'
# apply alone (all of them: the slow test below)
@pytest.mark.parametrize("name", ["maxl", "maoal_generate", "dtg", "rlaux"])
def test_steps_that_reach_into_the_backbone_trace_on_resnet18(name):
    _same_shapes(*_step_shapes(name, "resnet18", 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_every_methods_steps_trace_on_resnet18(name):
    _same_shapes(*_step_shapes(name, "resnet18", 1))


# ------------------------------------------------------------------------------------ runs


def test_resnet18_trains_single_through_the_loop(tmp_path):
    """One epoch of two steps at width 1 (XLA's convolution: it compiles fastest on the CPU; the
    other forms compute the same, test_strided_conv3x3_...)."""
    summary = run_in_process(tmp_path, "single", arch="resnet18", width=1, epochs=1,
                             max_steps_per_epoch=2, conv_impl="xla")
    assert np.isfinite(summary["final_test_accuracy"])
    state = final_state(tmp_path)
    params = "['multitask_params']['backbone']"
    assert state[f"{params}['stem']['conv']['kernel']"].shape == (3, 3, 3, 1)
    assert state[f"{params}['stage4']['block1']['conv_0']['kernel']"].shape == (3, 3, 4, 8)
    # trained: the running statistics moved off their initial (0, 1)
    assert not np.allclose(state["['multitask_batch_stats']['backbone']['stem']['bn']['var']"], 1)
    assert [r["epoch"] for r in records(tmp_path)] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_resnet18_trains_every_method_through_the_loop(tmp_path, name):
    summary = run_in_process(tmp_path, name, arch="resnet18", width=1, epochs=1)
    assert np.isfinite(summary["final_test_accuracy"])
    assert all(np.isfinite(v) for r in records(tmp_path) for v in r["train"].values()
               if isinstance(v, float))


def test_a_module_of_ones_own_trains_maxl_through_the_cli(tmp_path):
    """``--config.arch=user_backbone:Tiny --config.width=3`` (tests/ on PYTHONPATH) trains MAXL:
    the multi-task network and the label generator each hold a 3-filter Tiny."""
    from test_every_method import cli

    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), old) if p)
    try:
        out = cli(tmp_path, "maxl", cache, "--config.arch=user_backbone:Tiny", "--config.width=3",
                  "--config.epochs=1")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert "final test accuracy" in out.stdout
    state = final_state(tmp_path)
    for tree in ("['multitask_params']", "['method_state']['params']"):  # f's and g's
        assert state[f"{tree}['backbone']['module']['Conv_0']['kernel']"].shape == (3, 3, 3, 3)
    assert "['multitask_batch_stats']['backbone']['module']['BatchNorm_0']['mean']" in state


def test_a_checkpoint_of_another_backbone_is_refused_naming_both(tmp_path):
    run_in_process(tmp_path, "single", arch="user_backbone:Pooled", epochs=1)
    with pytest.raises(CheckpointError, match="arch: checkpoint 'user_backbone:Pooled' vs this run "
                                              "'user_backbone:Tiny'"):
        run_in_process(tmp_path, "single", arch="user_backbone:Tiny")


def test_a_bad_backbone_path_on_the_cli_is_one_paragraph_with_exit_2(tmp_path):
    from test_cli import entry_point

    out = entry_point("--config=experiments/configs/tiny.py", "--config.dataset=cifar100",
                      "--config.arch=no_such_pkg.nets:ResNet", f"--workdir={tmp_path / 'w'}",
                      cwd=ROOT, mock=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    paragraph = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert paragraph[0].startswith("Error: --config.arch='no_such_pkg.nets:ResNet': there is no "
                                   "module 'no_such_pkg' to import"), out.stderr
    assert len(paragraph) <= 2 and "PYTHONPATH" in paragraph[0]
    assert not (tmp_path / "w").exists()


def test_the_library_example_trains_maxl_on_a_module_of_ones_own():
    """The README's library example (/tmp/readme_backbones.md at the time of writing), at 16x16
    images: a Module class straight into make_networks, MAXL built on the networks by hand; a
    training step moves f, a meta step moves g, both finite."""
    class Net(nn.Module):
        width: int = 16

        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(self.width, (3, 3))(x)
            return nn.relu(nn.BatchNorm(use_running_average=not train)(x))  # pooled to (B, width)

    multitask, generator = models.make_networks(Net, num_primary=4, num_auxiliary=20,
                                                generator_classes=20, width=8)
    assert multitask.head_width == 8
    maxl = methods.get("maxl")(multitask=multitask, multitask_optimizer=optax.sgd(0.01),
                               generator=generator, psi=[5] * 4,
                               generator_optimizer=optax.sgd(1e-3))
    state = maxl.init(jax.random.PRNGKey(0), (16, 16, 3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "primary": rng.integers(0, 4, 16).astype(np.int32)}
    trained, metrics = jax.jit(maxl.train_step)(state, batch)
    meta, meta_metrics = jax.jit(maxl.meta_step)(trained, {"train": batch})
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(meta_metrics["meta_loss"]))
    moved = lambda a, b: any(not np.allclose(x, y) for x, y in zip(  # noqa: E731
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert moved(trained.multitask_params, state.multitask_params)
    assert not moved(trained.method_state["params"], state.method_state["params"])
    assert moved(meta.method_state["params"], trained.method_state["params"])

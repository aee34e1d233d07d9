"""The reference setup: CIFAR-100, 20 superclasses, VGG-16-BN, MAXL with psi = [5] * 20, 200 epochs.

Every field can be overridden on the command line, e.g. ``--config.method=single``.
"""

import ml_collections

from maxl_jax import methods


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "cifar100"          # cifar100 | cifar10 | fashion_mnist | fashion_mnist_coarse |
                                    # emnist_letters
    c.data_dir = ""                 # TFDS data_dir, or a folder with the data set's official archives
    c.download = True               # fetch the official archive if absent (no TensorFlow needed)
    c.primary_level = 20            # cifar100 only: 20, 10 or 3 primary classes
    c.train_fraction = 1.0          # stratified fraction of the training set (low-data protocol)
    c.eval_split = "test"           # test | validation: evaluate on validation_size training images
                                    # that train_fraction leaves unused (to choose budgets without
                                    # the test set)
    c.validation_size = 5000        # training images of the validation split (eval_split)
    c.augment = True                # random crop (padding 4) + horizontal flip, as the reference
    # Method and hierarchy.
    c.method = "maxl"               # any of maxl_jax.methods.names(); see the README's method table
    c.psi = ()                      # auxiliary classes per primary class; empty: aux_per_class each
    c.aux_per_class = 5             # auxiliary classes per primary class when psi is empty
    c.aux_tasks = ""                # equal/gcs/olaux/...: "human", "random" or "human,random"
                                    # (empty: human where the data set has fine labels, else random)
    # Networks.
    c.arch = "vgg16"                # vgg16 | resnet18 | small | package.module:Factory (a Flax
                                    # module of your own: maxl_jax.models.CustomBackbone)
    c.width = 0                     # small CNN: first block's filters (0: 32); resnet18: the
                                    # stem's (0: 64, stages 64-128-256-512); your Factory: called
                                    # as Factory(width=...) when non-zero, Factory() when 0
    c.head_width = 0                # 0: 512 for vgg16, the backbone's feature width otherwise
    c.conv_impl = "auto"            # auto | xla | shifted_matmul | patches | hybrid
    c.dtype = "float32"             # the networks' compute dtype: float32 | bfloat16 | float16
                                    # (parameters, optimizer states, losses stay float32)
    c.loss_scale = 1.0              # static loss scale, a power of two (1: none); only for methods
                                    # without a meta step (see maxl_jax/precision.py)
    # Optimisation (the reference's values).
    c.batch_size = 100              # training batch (all devices together)
    c.epochs = 200                  # epochs to train (a resumed run trains up to this many)
    c.lr = 0.01                     # theta1's (the multi-task network's): SGD, no momentum
    c.generator_lr = 1e-3           # theta2's (the label generator's): SGD with L2 weight decay
    c.weight_decay = 5e-4           # L2 weight decay of the generator (theta2) and MAOAL's
    c.inner_lr = 0.01               # alpha of the differentiated inner step
    c.decay_every = 50              # rates halved from epochs 50, 100, ... (inner alpha: 49, 99, ...)
    c.inner_steps = 1               # differentiated inner steps of the meta step (MAXL, WAMAL)
    c.entropy_weight = 0.2          # weight of the generated labels' entropy regulariser
    c.aux_weight = 1.0              # weight of the auxiliary loss (per task) in the training loss
    c.gamma = 2.0                   # focal loss's gamma (0: cross-entropy)
    c.meta_form = "reverse"         # reverse | forward_over_reverse (exact) | finite_difference | reference_first_order (MAXL)
    # Run.
    c.seed = 0                      # initialisation, data order and training subset
    c.eval_batch_size = 500         # evaluation batch (all devices together)
    c.max_steps_per_epoch = 0       # 0: the whole training set each epoch
    c.checkpoint_every_steps = 0    # N: also a checkpoint every N steps (training and meta steps)
    c.steps_per_call = 0            # up to N consecutive steps of one kind in one compiled call
                                    # (a scan): fewer host round-trips, the same numbers as 1.
                                    # 0: 1 on the CPU (a step outlasts its dispatch by far, and
                                    # Ctrl-C is answered after each step), 20 on a GPU or TPU
    c.keep_checkpoints = 3          # >= 1: the newest checkpoints kept
    c.resume_step = 0               # N: resume from the checkpoint of step N (0: the newest)
    c.resume_from_intact = False    # if the newest checkpoint is damaged, resume from the newest
                                    # intact one (moving the damaged ones to damaged_checkpoints/)
    c.last_k = 15                   # report the mean test accuracy of the last k epochs
    c.eval_every = 1                # evaluate after every N-th epoch, and after each of the last
                                    # last_k epochs (the reported ones) whatever N is
    # Each method's own settings: --config.<method>.<field>.
    for name, fields in methods.defaults().items():
        c[name] = ml_collections.ConfigDict(fields)
    return c

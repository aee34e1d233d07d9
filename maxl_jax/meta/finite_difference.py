"""The finite-difference first-order estimator (MAXL's ``model_vgg_maxl_firstorder.py``, DARTS).

The one-step meta-gradient (see ``maxl_jax.meta.unroll``) is

    dL_out/dh = dL_out/dh|direct + (d g / d h)^T w,     g = grad_theta L_in(theta, h),
    w = (dU/dg)^T grad L_out(theta+),                     theta+ = theta + U(g)

(for plain SGD with step alpha, ``w = -alpha grad L_out(theta+)``). The exact forms compute the mixed
second derivative ``(d g / d h)^T w`` by reverse-over-reverse or a JVP. This estimator replaces it with
a central difference of first derivatives only:

    (d g / d h)^T w  ~=  [grad_h L_in(theta + eps w, h) - grad_h L_in(theta - eps w, h)] / (2 eps),
    eps = radius / ||w||,  radius = 0.01

which is the reference's ``eps = 0.01 / ||v||`` with ``v = grad L_out(theta+)``: the two evaluation
points ``theta -+ 0.01 v / ||v||`` are the same, and the factor ``-alpha`` is inside ``w``. It needs
three first-order gradient evaluations instead of one second-order one.

Its error is ``O(radius^2)`` only where the loss is smooth between the two points, and a ReLU network
is not: at the reference's radius the points ``theta -+ eps w`` put hundreds of ReLU pre-activations
and max-pool windows on different sides of their kinks, and the error is the first-order effect of
those flips. Measured (``python -m benchmarks.fd_radius --vgg16``, ``benchmarks/results/fd_radius.md``;
error of the second-order part, relative, against the exact float64 meta-gradient):

=========================  ==========  =========  =========  =========  ==============
 network (2nd-order part)   radius      1e-2       1e-3       1e-4       1e-5
=========================  ==========  =========  =========  =========  ==============
 small CNN (6% of grad)     float64     9.8e-2     5.1e-2     4.2e-3     3.3e-10
 small CNN                  float32     9.8e-2     5.1e-2     5.8e-3     3.9e-2
 VGG-16, batch 4 (33%)      float64     4.9e-2     1.0e-2     6.9e-3     1.2e-10
 VGG-16, batch 4            float32     4.8e-2     1.0e-2     1.1e-2     5.2e-2
=========================  ==========  =========  =========  =========  ==============

At 1e-2, 2241 of 706,560 ReLUs and ~1010 of 168,960 pool windows flip (small CNN); at 1e-5, none
(one window), and float64 reaches rounding level. In float32, rounding grows as the radius shrinks
(0.27 at 1e-6 on the small CNN): the best radius there is about 1e-4, and no radius gets the
second-order part better than about 0.5%. The full meta-gradient's error is that times the
second-order part's share (5.4e-3 at 1e-2 on the small CNN, 1.6e-2 on VGG-16). The ``radius``
argument takes another step; ``--config.meta_form=finite_difference`` uses the reference's.

Two differences from the reference code, both deliberate:

* The direct term ``dL_out/dh|direct`` (MAXL's entropy term) is kept; the reference overwrites the
  generator's gradient with the finite difference, so its entropy term never reaches the generator.
* ``theta+`` is one update of the given optimizer from a fresh state, exactly as in the exact forms
  (so the estimators agree as ``radius -> 0``); the reference also folds the live optimizer's
  momentum buffer and weight decay into theta+ (neither is used by MAXL's plain SGD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from maxl_jax.meta.core import LossFn, MetaGradient, PyTree, one_step_meta_gradient

#: The reference's radius: eps = 0.01 / ||v||.
REFERENCE_RADIUS = 0.01


def finite_difference_meta_gradient(inner_loss: LossFn, outer_loss: LossFn, params: PyTree,
                                    hyper: PyTree, optimizer: optax.GradientTransformation, *,
                                    radius: float = REFERENCE_RADIUS) -> MetaGradient:
    """First-order estimate of ``d/d hyper L_out(theta+(hyper), hyper)``, one inner step.

    Args:
      inner_loss / outer_loss: ``(params, hyper) -> (loss, aux)`` as for ``meta_gradient``.
      params, hyper, optimizer: as for ``meta_gradient`` (one step from a fresh optimizer state).
      radius: the length of the finite-difference step in parameter space (``eps * ||w||``).
    Returns:
      ``MetaGradient``; ``grad_hyper`` approximates the exact meta-gradient: ``O(radius^2)`` only
      below the scale where ReLU and max-pool kinks fall between the two points (about 1e-5 on our
      networks; at the reference's 1e-2 the second-order part is 5-10% off, see the module
      docstring), and float32 rounding grows as ``radius`` shrinks.
    """
    def central_difference(grad_hyper_at, w):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(w)))
        eps = radius / jnp.maximum(norm, 1e-30)
        plus = grad_hyper_at(jax.tree_util.tree_map(lambda p, d: p + eps * d, params, w))
        minus = grad_hyper_at(jax.tree_util.tree_map(lambda p, d: p - eps * d, params, w))
        return jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), plus, minus)

    return one_step_meta_gradient(inner_loss, outer_loss, params, hyper, optimizer,
                                  central_difference)

"""Permutation alignment of networks before connecting them (beyond the papers).

Hidden units can be reordered, together with the weights that read them, without changing the function a
network computes. Two networks trained from different seeds therefore land in different permutation copies
of their basins, and the straight line between them crosses a loss barrier that largely disappears once one
network's units are permuted to match the other's (Entezari, Sedghi, Saukh & Neyshabur 2022; Ainsworth,
Hayase & Srinivasa 2023, "Git Re-Basin"). The Bézier-surface paper (Anonymous, 2024, §4.1, Figure 3) finds linear
surfaces between independent networks poor and trains a nonlinear one instead; this module supplies the
alignment step that the paper's related work points to, so that *aligned* linear paths and surfaces can be
measured and used as the starting point of curve and surface training.

**The spec** (:class:`PermutationSpec`) says which axes of which leaves share a permutation, as data, in the
spirit of Git Re-Basin's permutation specs. Leaves are named by ``/``-joined paths with the collection
first (``"params/Dense_0/kernel"``, ``"batch_stats/stem_bn/mean"``); each maps to one entry per axis:

- ``None``: the axis is not permuted (input features, classes, kernel height and width);
- ``"P"``: the whole axis is permuted by group ``P`` (a layer's hidden units or channels);
- ``("A", "B", "C")``: the axis is the concatenation of groups ``A``, ``B``, ``C`` in that order, each
  permuted within its own block (a DenseNet's concatenated features; a ResNet's zero-padded option-A
  shortcut, whose stream after the padding is ``(pad_lo, previous stream, pad_hi)``);
- ``Axis(("P",), tiled=True)``: the axis is a flattened ``[..., P]`` (NHWC feature maps flattened before a
  dense layer: channels fastest), permuted identically in every spatial position.

A residual stream is one group shared by every layer that writes to or reads from it. BatchNorm statistics
are leaves like any other (``batch_stats/.../mean`` and ``.../var`` follow their channels). Group sizes come
from the leaves (an axis bound to one group alone) or from ``sizes``; axes that disagree raise a
``ValueError`` naming both leaves. Groups listed in ``odd`` may also flip signs (units with an odd activation
such as ``tanh``: ``(w_in, b, w_out) -> (-w_in, -b, -w_out)`` leaves the function unchanged).
:func:`permutation_spec` derives the spec of every zoo architecture (MLP, simple CNN, ConvFC, VGG16 with
and without BatchNorm, ResNet-18/20 with either shortcut, PreResNet-20/164, DenseNet-BC, ViT) from the
model's ``spec``.

**The algorithms** (one generic implementation for every spec):

- :func:`weight_matching` (Ainsworth et al. 2023, §3.2): maximise ``sum_l <W_l^ref, P_l W_l P_{l-1}^T>``
  over the groups' permutations by coordinate descent: for one group at a time, with the others fixed, the
  problem is a linear assignment (``scipy.optimize.linear_sum_assignment``) on the cost
  ``C_ij = sum over the group's axes of <unit i of the reference, unit j of the other>``; sweeps (in an order
  drawn from ``key``) repeat until no group improves. Equivalently it minimises ``|ref - P(other)|_2``;
  with sign flips the cost is ``|C_ij|`` and the sign ``sign(C_ij)``. For a single group (a one-hidden-layer
  MLP) the first sweep is exact.
- :func:`activation_matching` (Entezari et al. 2022; Ainsworth et al. 2023 §3.1): the cross-correlation of
  every layer output carrying a group (read by intercepting the Flax modules' calls) on data, summed over
  the layers that carry the group, solved by one assignment per group; groups no layer output carries alone
  (a ViT's attention heads) are then solved by weight matching with the others fixed.
- :func:`apply_permutation` permutes (and sign-flips) parameters and BatchNorm statistics; :func:`align`
  returns ``other`` permuted to match ``reference``; :func:`distance_modulo_permutation` is the distance
  between two networks once aligned (an upper bound on the distance modulo permutations for deep networks,
  exact for one hidden layer).

**Connecting after aligning.** The connectors need no change: align every corner to one reference, then
build::

    spec = permutation_spec(model)
    corners = [c0] + [align(model, c0, c, spec=spec) for c in (c1, c2, c3)]
    surface = bezier_surface(*corners)          # or bilinear_surface, simplex(corners), bezier_curve(c0, c1)

Aligning every corner to the *same* reference keeps them mutually consistent (the aligned copies all sit in
the reference's permutation frame); ``experiments/alignment.py`` measures what that does to linear paths,
bilinear surfaces and the epochs of surface training.
"""


from mclandscape.methods.alignment.matching import (
    METHODS,
    activation_matching,
    align,
    distance_modulo_permutation,
    weight_matching,
)
from mclandscape.methods.alignment.spec import (
    Axis,
    Permutation,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    random_permutation,
    spec_sizes,
)
from mclandscape.methods.alignment.zoo import ODD_ACTIVATIONS, permutation_spec

__all__ = [
    "Axis", "PermutationSpec", "Permutation", "permutation_spec", "spec_sizes", "identity_permutation",
    "random_permutation", "apply_permutation", "weight_matching", "activation_matching", "align",
    "distance_modulo_permutation", "ODD_ACTIVATIONS", "METHODS",
]

"""MTA — Multi-Granular Trajectory Alignment (ACL 2026). See MTA_SPEC and docs/method.md.

- :mod:`mtakd.mta.functional`: the equations (importance weights, span pooling, DSA, L_Hid).
- :mod:`mtakd.mta.layers`: the layer trajectory φ(l) and the key-layer maps.
- :mod:`mtakd.mta.loss`: the batched plug-in loss used by the trainer.
"""

from .functional import dsa_loss, hid_loss, importance_weights, pool_spans
from .layers import PRESETS, KeyLayer, phi, resolve_key_layers
from .loss import PROJECTORS, MTALoss

__all__ = [
    "PRESETS", "PROJECTORS", "KeyLayer", "MTALoss", "dsa_loss", "hid_loss", "importance_weights", "phi",
    "pool_spans", "resolve_key_layers",
]

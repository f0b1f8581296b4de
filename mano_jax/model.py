"""The model container: `ManoModel` holds a hand model's arrays, `ManoOutput` a posed result.

Both are frozen dataclasses registered as JAX pytrees, so a model can be passed straight into
`jax.jit`/`jax.grad`/`jax.vmap`-ed functions; its array fields are leaves, its topology
(`parents`, `tip_ids`, `side`, `name`, `provenance`) is static metadata.
All lengths are metres.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

#: MANO's kinematic tree over its 16 joints (0 wrist; index, middle, pinky, ring, thumb x MCP/PIP/DIP).
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)

#: Names of the 16 joints, in MANO's order.
JOINT_NAMES = (
    "wrist",
    "index1", "index2", "index3",
    "middle1", "middle2", "middle3",
    "pinky1", "pinky2", "pinky3",
    "ring1", "ring2", "ring3",
    "thumb1", "thumb2", "thumb3",
)  # fmt: skip

NUM_JOINTS = 16
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)

Side = Literal["right", "left"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ManoModel:
    """A MANO-layout hand model: any number of vertices V and shape components S, 16 joints."""

    v_template: jax.Array
    """(V, 3) rest-pose template vertices, metres."""
    shapedirs: jax.Array
    """(V, 3, S) shape blend shapes, metres per unit of `betas`."""
    posedirs: jax.Array
    """(V, 3, 135) pose blend shapes: metres per unit of (R - I) entries of joints 1..15, row-major."""
    J_regressor: jax.Array
    """(16, V) joint regressor (dense); rows sum to 1."""
    weights: jax.Array
    """(V, 16) linear-blend-skinning weights; rows sum to 1."""
    faces: jax.Array
    """(F, 3) int32 triangle vertex indices, counter-clockwise seen from outside."""
    hands_components: jax.Array
    """(45, 45) PCA basis of `hand_pose` (rows are components, not necessarily orthonormal)."""
    hands_mean: jax.Array
    """(45,) mean hand pose, axis-angle radians."""
    hands_var: jax.Array
    """(45,) variance of each PCA coefficient over the poses the basis was built from."""
    parents: tuple[int, ...] = dataclasses.field(default=MANO_PARENTS, metadata=dict(static=True))
    """(16,) parent joint of each joint, -1 for the root."""
    tip_ids: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    """(5,) fingertip vertex ids: thumb, index, middle, ring, pinky."""
    side: Side = dataclasses.field(default="right", metadata=dict(static=True))
    """Which hand: "right" or "left"."""
    name: str = dataclasses.field(default="", metadata=dict(static=True))
    """Short name of the model (e.g. "open-right", "MANO_RIGHT")."""
    provenance: str = dataclasses.field(default="", metadata=dict(static=True))
    """Where the model came from (file path, source assets, licence)."""

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_betas(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def dtype(self):
        return self.v_template.dtype

    def astype(self, dtype) -> "ManoModel":
        """The same model with all floating-point arrays cast to `dtype`."""
        return jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, self
        )

    def replace(self, **changes) -> "ManoModel":
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def numpy(self) -> dict[str, np.ndarray]:
        """All array fields as NumPy arrays (host copies), keyed by field name."""
        return {
            f.name: np.asarray(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("static")
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ManoOutput:
    """The posed hand returned by `mano_jax.forward`; leading batch axes `*` follow the inputs."""

    vertices: jax.Array
    """(*, V, 3) posed vertices, metres."""
    joints: jax.Array
    """(*, 16, 3) posed joints from the kinematic chain (not J_regressor @ vertices), metres."""
    keypoints: jax.Array
    """(*, 21, 3) the 16 joints plus 5 fingertip vertices, in the order asked for, metres."""
    transforms: jax.Array
    """(*, 16, 4, 4) world transform of each joint relative to its rest pose (what skins the mesh)."""

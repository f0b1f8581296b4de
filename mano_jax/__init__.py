"""mano-jax: the MANO hand model in JAX. Lengths are metres throughout."""

from . import conventions, lbs
from .conventions import (
    MANO_FROM_OPENPOSE,
    OPENPOSE_ORDER,
    TIP_IDS,
    axis_angle_to_pca,
    flat_to_mean,
    mean_to_flat,
    mirror_model,
    mirror_pose,
    pca_to_axis_angle,
)
from .jacobian import vertex_jacobian
from .io import ManoFileError, load_model, save_model
from .lbs import axis_angle_to_matrix, matrix_to_axis_angle
from .mesh import export_mesh, wrist_cap
from .model import JOINT_NAMES, MANO_PARENTS, ManoModel, ManoOutput
from .posing import forward

__all__ = [
    "JOINT_NAMES",
    "MANO_FROM_OPENPOSE",
    "MANO_PARENTS",
    "OPENPOSE_ORDER",
    "TIP_IDS",
    "ManoFileError",
    "ManoModel",
    "ManoOutput",
    "axis_angle_to_matrix",
    "axis_angle_to_pca",
    "conventions",
    "export_mesh",
    "flat_to_mean",
    "forward",
    "lbs",
    "load_model",
    "matrix_to_axis_angle",
    "mean_to_flat",
    "mirror_model",
    "mirror_pose",
    "pca_to_axis_angle",
    "save_model",
    "vertex_jacobian",
    "wrist_cap",
]

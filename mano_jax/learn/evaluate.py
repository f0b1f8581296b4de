"""Measuring a learned model: fit errors on registrations, pose-space generalisation, subspace angles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ManoModel
from .pose_fit import Poses, fit_poses, pose_vertices, procrustes_init


def fit_error(model: ManoModel, templates, hand_index, targets, *, reference=None, iterations: int = 8,
              chunk_size: int = 32) -> np.ndarray:  # fmt: skip
    """(N,) root-mean-square vertex error (metres) of each registration after fitting its pose.

    `templates[hand_index[n]]` is registration n's rest template under `model` (its correctives, weights
    and regressor); targets are right-hand registrations, metres. With `reference` (N, V, 3) (e.g. the
    noise-free meshes of synthetic data) the fitted meshes are compared with it instead of the targets.
    """
    poses, rms = fit_poses(model, templates, hand_index, targets, iterations=iterations, chunk_size=chunk_size)
    if reference is None:
        return np.asarray(rms)
    dtype = model.v_template.dtype
    templates = jnp.asarray(templates, dtype)[jnp.asarray(hand_index)]
    fitted = jax.vmap(lambda t, r, p, x: pose_vertices(model, t, r, p, x))(
        templates, poses.global_rot, poses.hand_pose, poses.transl
    )
    diff = np.asarray(fitted) - np.asarray(reference)
    return np.sqrt(np.mean(np.sum(diff**2, axis=-1), axis=-1))


def pose_space_error(model: ManoModel, templates, hand_index, targets, num_components: int, *,
                     iterations: int = 8, chunk_size: int = 32) -> np.ndarray:  # fmt: skip
    """(N,) RMS vertex error (metres) when the hand pose is restricted to the model's first
    `num_components` PCA components (around `hands_mean`); global rotation and translation stay free.

    Starts from the per-part Procrustes pose projected onto the subspace.
    """
    dtype = model.v_template.dtype
    templates = jnp.asarray(templates, dtype)
    targets = jnp.asarray(targets, dtype)
    hand_index = jnp.asarray(hand_index, jnp.int32)
    rot, pose, transl = jax.vmap(lambda t, y: procrustes_init(model, t, y))(templates[hand_index], targets)
    comps = model.hands_components[:num_components]
    q, _ = jnp.linalg.qr(comps.T)  # the rows need not be orthonormal
    mean = model.hands_mean
    pose = mean[None] + ((pose - mean[None]) @ q) @ q.T
    # Always 45 rows (zeros past K), so every K shares one compiled fit; zero rows take no steps.
    basis = jnp.zeros((45, 45), dtype).at[:num_components].set(comps)
    _, rms = fit_poses(model, templates, hand_index, targets, Poses(rot, pose, transl),
                       iterations=iterations, basis=basis, chunk_size=chunk_size)  # fmt: skip
    return np.asarray(rms)


def principal_angles(a, b) -> np.ndarray:
    """Principal angles (degrees, increasing) between the row spaces of (k, D) `a` and (m, D) `b`."""
    qa, _ = np.linalg.qr(np.asarray(a, np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, np.float64).T)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.degrees(np.arccos(np.clip(s, -1.0, 1.0)))

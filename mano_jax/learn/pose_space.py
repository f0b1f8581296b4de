"""Pose space: PCA of the fitted hand poses -> `hands_mean`, `hands_components` (rows), `hands_var`.

The components are orthonormal (so `axis_angle_to_pca` is a plain projection, although mano-jax never
assumes that); `hands_var` holds the variance of each PCA coefficient over the training poses.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoseSpace:
    hands_mean: np.ndarray
    """(45,) mean hand pose, axis-angle radians."""
    hands_components: np.ndarray
    """(45, 45) principal directions of the hand pose, rows, orthonormal, by decreasing variance."""
    hands_var: np.ndarray
    """(45,) variance of each component's coefficient, radians^2."""

    @property
    def explained(self) -> np.ndarray:
        """(45,) cumulative fraction of the pose variance explained by the first 1..45 components."""
        return np.cumsum(self.hands_var) / max(float(np.sum(self.hands_var)), 1e-300)


def pose_pca(hand_pose) -> PoseSpace:
    """PCA of (N, 45) axis-angle hand poses (N >= 2); with N <= 45 the trailing variances are zero."""
    poses = np.asarray(hand_pose, np.float64)
    if poses.ndim != 2 or poses.shape[1] != 45 or poses.shape[0] < 2:
        raise ValueError(f"pose space: need (N >= 2, 45) hand poses, got {poses.shape}")
    mean = poses.mean(axis=0)
    cov = np.cov(poses - mean, rowvar=False)
    var, vecs = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1]
    var, comps = np.maximum(var[order], 0.0), vecs[:, order].T
    sign = np.sign(comps[np.arange(45), np.argmax(np.abs(comps), axis=1)])
    return PoseSpace(mean, comps * sign[:, None], var)


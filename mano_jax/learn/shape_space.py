"""Shape space: PCA of the per-hand templates (already pose-normalised: rest pose, correctives removed).

`v_template` is the mean template; `shapedirs` are the principal directions scaled by their standard
deviation, so betas of the training hands have unit variance, as in MANO. Host NumPy; metres.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShapeSpace:
    mean: np.ndarray
    """(V, 3) mean template, metres."""
    shapedirs: np.ndarray
    """(V, 3, K) principal directions times their standard deviation, metres per unit beta."""
    variance: np.ndarray
    """(M,) variance of every principal component (M = min(H - 1, 3V)), metres^2, decreasing."""

    @property
    def explained(self) -> np.ndarray:
        """(M,) cumulative fraction of the shape variance explained by the first 1..M components."""
        return np.cumsum(self.variance) / max(float(np.sum(self.variance)), 1e-300)


def _principal(data: np.ndarray):
    """Mean, orthonormal principal directions (rows) and variances of (H, D) data (rows = samples)."""
    mean = data.mean(axis=0)
    _, s, vt = np.linalg.svd(data - mean, full_matrices=False)
    m = max(data.shape[0] - 1, 0)
    vt, s = vt[:m], s[:m]
    # A deterministic sign: each direction's largest entry is positive.
    sign = np.sign(vt[np.arange(m), np.argmax(np.abs(vt), axis=1)])
    return mean, vt * sign[:, None], s**2 / max(data.shape[0] - 1, 1)


def shape_pca(templates, num_components: int) -> ShapeSpace:
    """PCA of (H, V, 3) templates; keeps `num_components` directions (fewer if there are fewer hands)."""
    templates = np.asarray(templates, np.float64)
    h, v, _ = templates.shape
    if h < 2:
        raise ValueError(f"shape space: need templates of at least 2 hands, got {h}")
    mean, directions, variance = _principal(templates.reshape(h, -1))
    k = min(num_components, directions.shape[0])
    dirs = directions[:k] * np.sqrt(variance[:k])[:, None]
    return ShapeSpace(mean.reshape(v, 3), dirs.reshape(k, v, 3).transpose(1, 2, 0), variance)


def shape_generalization(templates, max_components: int) -> np.ndarray:
    """(max_components + 1,) leave-one-hand-out error: mean vertex distance (metres) between each hand's
    template and its best reconstruction from the first K components learned from the other hands,
    for K = 0..max_components (MANO's generalisation curve)."""
    templates = np.asarray(templates, np.float64)
    h, v, _ = templates.shape
    flat = templates.reshape(h, -1)
    errors = np.zeros((h, max_components + 1))
    for i in range(h):
        mean, directions, _ = _principal(np.delete(flat, i, axis=0))
        residual = flat[i] - mean
        for k in range(max_components + 1):
            d = directions[:k]
            r = residual - (residual @ d.T) @ d
            errors[i, k] = np.linalg.norm(r.reshape(v, 3), axis=1).mean()
    return errors.mean(axis=0)

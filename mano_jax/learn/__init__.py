"""Learning a MANO-style hand model from registrations (meshes in the model's topology), metres.

    from mano_jax.learn import learn, LearnConfig, load_registrations
    result = learn(load_registrations("regs.npz"), mano_jax.load_model(dtype=jnp.float64))
    mano_jax.save_model(result.model, "learned.npz")

Modules: `data` (registrations), `locality` (geodesic cost matrix), `pose_fit` (per-registration pose),
`templates` (unposing, per-hand templates), `blendshapes` (closed-form pose blend shapes),
`shape_space` / `pose_space` (PCA), `skinning` (optional refinement of skinning weights and joint
regressor), `trainer` (the alternation and its report), `evaluate`,
`synthetic` (planted ground truth for tests and benchmarks), `cli` (`mano-jax learn`).
"""

from .data import Registrations, load_registrations, save_registrations
from .trainer import LearnConfig, LearnResult, learn

__all__ = ["LearnConfig", "LearnResult", "Registrations", "learn", "load_registrations", "save_registrations"]

"""The registration result container and its `params.npz` file format.

A `RegistrationResult` holds everything a registered sequence needs to be re-posed: the subject template
(`betas` + per-vertex `offsets` on the model's template), per-frame pose and translation, and the global
`scale` between the model (metres) and the scans. It is host data (NumPy), not a pytree.

Frame convention: the posed model of frame t in the scans' coordinates is

    scale * forward(model.replace(v_template=model.v_template + offsets),
                    betas=betas, global_orient=global_orient[t], hand_pose=hand_pose[t],
                    transl=transl[t]).vertices

so `scale` is 1 when the scans were in known units (metres after loading), and `transl` is in model metres.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from mano_jax._atomic import atomic_path

FORMAT = "mano-jax-registration/1"

_ARRAY_FIELDS = (
    "betas",
    "offsets",
    "global_orient",
    "hand_pose",
    "transl",
    "frame_residual",
    "frame_cost",
)


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """A registered scan sequence (or unordered scan set) of one hand. Lengths in metres."""

    betas: np.ndarray
    """(S,) shape coefficients of the subject template."""
    offsets: np.ndarray
    """(V, 3) per-vertex offsets added to the model's `v_template` (metres), capturing shape the shape
    space cannot express."""
    global_orient: np.ndarray
    """(T, 3) axis-angle rotation of the wrist per frame, radians."""
    hand_pose: np.ndarray
    """(T, 45) axis-angle pose of joints 1..15 per frame (flat-hand convention), radians."""
    transl: np.ndarray
    """(T, 3) translation per frame, model metres (before `scale`)."""
    scale: float = 1.0
    """Scan units per model metre: scan coordinates ~ scale * posed model. 1 unless units were unknown."""
    model_name: str = ""
    """Name of the model fitted (`ManoModel.name`)."""
    side: str = "right"
    """"right" or "left"."""
    frame_residual: np.ndarray | None = None
    """(T,) median scan-to-model distance per frame after the fit, metres (0 for bad frames)."""
    frame_cost: np.ndarray | None = None
    """(T,) final value of the robust objective per frame (0 for bad frames)."""
    bad_frames: tuple[int, ...] = ()
    """Frames without usable data (skipped input); their parameters are bridged from neighbours."""
    retried_frames: tuple[int, ...] = ()
    """Frames whose fit diverged and was retried from a neighbour's solution."""
    keyframes: tuple[int, ...] = ()
    """Frames used to fit the subject template (stage 1)."""
    unordered: bool = False
    """True for an unordered scan set (no temporal smoothness, each frame initialised on its own)."""
    stage_times: dict = dataclasses.field(default_factory=dict)
    """Wall-clock seconds per stage ("stage0", "stage1", "stage2", ...; "compile" where measured)."""
    config: dict = dataclasses.field(default_factory=dict)
    """The `RegistrationConfig` used, as a plain dict (for provenance)."""

    def __post_init__(self):
        t = self.global_orient.shape[0]
        expected = {"global_orient": (t, 3), "hand_pose": (t, 45), "transl": (t, 3)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"RegistrationResult.{name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.offsets.ndim != 2 or self.offsets.shape[1] != 3:
            raise ValueError(f"RegistrationResult.offsets has shape {self.offsets.shape}, expected (V, 3)")
        for name in ("frame_residual", "frame_cost"):
            value = getattr(self, name)
            if value is not None and value.shape != (t,):
                raise ValueError(f"RegistrationResult.{name} has shape {value.shape}, expected ({t},)")

    @property
    def num_frames(self) -> int:
        return self.global_orient.shape[0]

    def template_model(self, model):
        """`model` with the subject's offsets added to its template (betas are still applied by `forward`)."""
        import jax.numpy as jnp

        return model.replace(v_template=model.v_template + jnp.asarray(self.offsets, model.dtype))

    def posed_vertices(self, model, frames=None) -> np.ndarray:
        """(T', V, 3) posed model vertices in the scans' coordinates (see the module docstring).

        `frames`: indices to pose (default all frames).
        """
        import jax.numpy as jnp

        idx = np.arange(self.num_frames) if frames is None else np.asarray(frames)
        dtype = model.dtype
        out = _jitted_forward()(
            self.template_model(model),
            hand_pose=jnp.asarray(self.hand_pose[idx], dtype),
            betas=jnp.asarray(np.broadcast_to(self.betas, (len(idx), self.betas.shape[0])), dtype),
            global_orient=jnp.asarray(self.global_orient[idx], dtype),
            transl=jnp.asarray(self.transl[idx], dtype),
        )
        return self.scale * np.asarray(out.vertices)

    def template_vertices(self, model) -> np.ndarray:
        """(V, 3) the subject template in the flat rest pose, model metres (what `template.ply` shows)."""
        import jax.numpy as jnp

        out = _jitted_forward()(
            self.template_model(model),
            hand_pose=jnp.zeros((45,), model.dtype),
            betas=jnp.asarray(self.betas, model.dtype),
        )
        return np.asarray(out.vertices)


@functools.cache
def _jitted_forward():
    """`mano_jax.forward` compiled as one program (run eagerly it dispatches hundreds of small ones)."""
    import jax

    from mano_jax import forward

    return jax.jit(forward)


def save_result(result: RegistrationResult, path: str | os.PathLike) -> None:
    """Write `result` to `path` (`params.npz`) atomically."""
    arrays = {}
    for name in _ARRAY_FIELDS:
        value = getattr(result, name)
        if value is not None:
            arrays[name] = np.asarray(value, np.float64)
    meta = {
        "scale": float(result.scale),
        "model_name": result.model_name,
        "side": result.side,
        "bad_frames": [int(i) for i in result.bad_frames],
        "retried_frames": [int(i) for i in result.retried_frames],
        "keyframes": [int(i) for i in result.keyframes],
        "unordered": bool(result.unordered),
        "stage_times": {k: float(v) for k, v in result.stage_times.items()},
        "config": result.config,
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                scale=np.array(float(result.scale)),
                model_name=np.array(result.model_name),
                side=np.array(result.side),
                metadata=np.array(json.dumps(meta)),
                **arrays,
            )


def load_result(path: str | os.PathLike) -> RegistrationResult:
    """Read a `params.npz` written by `save_result` (or a registration output directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such registration result")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            fmt = str(data["format"]) if "format" in files else None
            if fmt != FORMAT:
                raise ValueError(f"{path}: not a mano-jax registration result (format={fmt!r}, expected {FORMAT!r})")
            missing = [k for k in ("betas", "offsets", "global_orient", "hand_pose", "transl") if k not in files]
            if missing:
                raise ValueError(f"{path}: registration result is missing {', '.join(missing)}")
            arrays = {k: np.array(data[k]) for k in _ARRAY_FIELDS if k in files}
            meta = json.loads(str(data["metadata"]))
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable registration result ({e})") from e
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: unreadable registration result ({e})") from e
    return RegistrationResult(
        **arrays,
        scale=meta["scale"],
        model_name=meta["model_name"],
        side=meta["side"],
        bad_frames=tuple(meta["bad_frames"]),
        retried_frames=tuple(meta["retried_frames"]),
        keyframes=tuple(meta["keyframes"]),
        unordered=meta["unordered"],
        stage_times=meta["stage_times"],
        config=meta["config"],
    )

"""Render the open hand model for the README: rest, fist, spread, and +-2 sigma of shape components 1, 2.

Offscreen with matplotlib only (flat-shaded triangles drawn far to near, orthographic camera), so it
runs anywhere the package does. Writes small PNGs (600 px wide) into docs/images/:

    python tools/render_open_hand.py [--model PATH_OR_NAME] [--out-dir docs/images]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import mano_jax  # noqa: E402
from mano_jax._atomic import atomic_path  # noqa: E402

SKIN = np.array([0.93, 0.76, 0.65])
WIDTH_PX, DPI = 600, 100
# Camera rotations (model frame -> camera, camera looks down -z): the model's fingers point +y and the
# palm faces -z, so the identity shows the back of the hand with the fingers up.
VIEWS = {
    "back": Rotation.identity(),
    "palm": Rotation.from_euler("y", 180, degrees=True),
    "knuckles": Rotation.from_euler("xy", [-60, 200], degrees=True),
    "side": Rotation.from_euler("xy", [-20, 100], degrees=True),
}


def draw(ax, vertices, faces, view: str, title: str, lim=None) -> None:
    """Flat-shaded mesh in an orthographic view; faces sorted far to near (painter's algorithm)."""
    p = VIEWS[view].apply(vertices)
    tri = p[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-15
    light = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0.0, 1.0)
    colour = np.clip(SKIN[None] * shade[:, None], 0, 1)
    order = np.argsort(tri[:, :, 2].mean(axis=1))
    ax.add_collection(PolyCollection(tri[order, :, :2], facecolors=colour[order],
                                     edgecolors=colour[order], linewidths=0.3))  # fmt: skip
    if lim is None:
        lim = (p[:, 0].min(), p[:, 0].max(), p[:, 1].min(), p[:, 1].max())
    pad = 0.005
    ax.set_xlim(lim[0] - pad, lim[1] + pad)
    ax.set_ylim(lim[2] - pad, lim[3] + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    print(f"wrote {path}")


def figure(panels: int, height_in: float):
    fig, axes = plt.subplots(1, panels, figsize=(WIDTH_PX / DPI, height_in), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.02)
    return fig, axes[0]


def common_limits(meshes, view):
    pts = np.concatenate([VIEWS[view].apply(v) for v in meshes])
    return pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "mano_jax" / "data" / "open_hand_right.npz"),
                        help="model file (an .npz with the pose_fist / pose_spread extras)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args(argv)
    model = mano_jax.load_model(args.model, dtype=np.float64)
    with np.load(args.model) as npz:
        poses = {name: npz[f"pose_{name}"] for name in ("fist", "spread")}
    faces = np.concatenate([np.asarray(model.faces), mano_jax.wrist_cap(model.faces)])

    def verts(pose=None, betas=None):
        pose = np.zeros(45) if pose is None else pose
        return np.array(mano_jax.forward(model, hand_pose=pose, betas=betas).vertices)

    rest = verts()
    fig, ax = figure(3, 3.2)
    for a, view, title in zip(ax, ("back", "palm", "side"), ("back", "palm", "thumb side")):
        draw(a, rest, faces, view, title)
    save(fig, args.out_dir / "open_hand_rest.png")

    for name in ("fist", "spread"):
        fig, ax = figure(2, 3.2)
        posed = verts(poses[name])
        for a, view in zip(ax, ("palm", "knuckles" if name == "fist" else "back")):
            draw(a, posed, faces, view, f"{name} ({view})")
        save(fig, args.out_dir / f"open_hand_{name}.png")

    sigma = 2.0
    for k in (0, 1):
        betas = np.zeros((3, k + 1))
        betas[:, k] = (-sigma, 0.0, sigma)
        meshes = [verts(betas=b) for b in betas]
        lim = common_limits(meshes, "palm")
        fig, ax = figure(3, 3.2)
        for a, mesh, b in zip(ax, meshes, betas[:, k]):
            draw(a, mesh, faces, "palm", f"shape {k + 1}: {b:+.0f} sigma" if b else "mean", lim=lim)
        save(fig, args.out_dir / f"open_hand_shape{k + 1}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

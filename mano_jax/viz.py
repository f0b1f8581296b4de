"""Looking at hands: shaded matplotlib renders (PNG, inline in notebooks) and an offline plotly view.

matplotlib is a core dependency (PNG output works everywhere, headless); plotly is the `viz` extra.
"""

from __future__ import annotations

import os

import numpy as np

from ._atomic import atomic_path

_LIGHT = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])


def _rotation_to_view(elev: float, azim: float) -> np.ndarray:
    """Camera rotation: world -> view, looking down -z after turning by azimuth then elevation."""
    a, e = np.radians(azim), np.radians(elev)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    return rx @ rz


def plot_mesh(
    ax,
    vertices,
    faces,
    *,
    color=(0.85, 0.65, 0.55),
    view=(0.0, 0.0),
    points=None,
    point_color="tab:blue",
    point_size=1.0,
    scalars=None,
    cmap="viridis",
):
    """Draw a shaded triangle mesh orthographically on a 2D matplotlib axis.

    Faces are sorted back to front (painter's algorithm) and Lambert-shaded from a head light, which
    looks right for a single hand and needs no 3D axes. `view` = (elevation, azimuth) in degrees about
    the world x and z axes. `points` (N, 3) are drawn on top (e.g. a scan), `scalars` (V,) colour the
    vertices instead of `color`. Returns the view rotation so callers can project more things.
    """
    from matplotlib.collections import PolyCollection

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    rot = _rotation_to_view(*view)
    v = vertices @ rot.T
    tri = v[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    shade = 0.35 + 0.65 * np.abs(normals @ _LIGHT)
    if scalars is not None:
        import matplotlib

        s = np.asarray(scalars, dtype=np.float64)[faces].mean(axis=1)
        span = np.ptp(s) or 1.0
        base = matplotlib.colormaps[cmap]((s - s.min()) / span)[:, :3]
    else:
        base = np.broadcast_to(np.asarray(color, dtype=np.float64), (len(faces), 3))
    order = np.argsort(tri[:, :, 2].mean(axis=1))
    ax.add_collection(
        PolyCollection(tri[order, :, :2], facecolors=(base * shade[:, None])[order], edgecolors="none")
    )
    extent = v[:, :2]
    if points is not None and len(points):
        p = np.asarray(points, dtype=np.float64) @ rot.T
        ax.scatter(p[:, 0], p[:, 1], s=point_size, c=point_color, linewidths=0, zorder=3)
        extent = np.concatenate([extent, p[:, :2]])
    lo, hi = extent.min(axis=0), extent.max(axis=0)
    pad = 0.05 * (hi - lo).max()
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return rot


def render_png(
    path: str | os.PathLike,
    meshes,
    faces,
    *,
    titles=None,
    view=(0.0, 0.0),
    size=(3.0, 3.0),
    dpi=100,
    **plot_kwargs,
) -> None:
    """Render one or more meshes side by side into a PNG file (written atomically).

    `meshes` is (V, 3) or (N, V, 3) vertices sharing `faces`; `titles` labels each panel.
    """
    # A bare Figure renders without pyplot or a backend: nothing global changes, and a notebook's
    # inline plots keep working after this call.
    from matplotlib.figure import Figure

    meshes = np.asarray(meshes)
    if meshes.ndim == 2:
        meshes = meshes[None]
    fig = Figure(figsize=(size[0] * len(meshes), size[1]))
    axes = fig.subplots(1, len(meshes), squeeze=False)
    for i, (ax, verts) in enumerate(zip(axes[0], meshes)):
        plot_mesh(ax, verts, faces, view=view, **plot_kwargs)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def plotly_mesh(vertices, faces, *, points=None, color="#d9a68c", title=None):
    """An interactive plotly figure of a mesh (and optional points); needs the `viz` extra.

    Show it offline in a notebook with `fig.show()` after `plotly.io.renderers.default =
    "notebook_connected"` online, or `"notebook"` (plotly.js embedded, works offline).
    """
    import plotly.graph_objects as go

    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    data = [
        go.Mesh3d(
            x=v[:, 0], y=v[:, 1], z=v[:, 2], i=f[:, 0], j=f[:, 1], k=f[:, 2],
            color=color, flatshading=False, lighting=dict(ambient=0.4, diffuse=0.8, specular=0.1),
        )
    ]  # fmt: skip
    if points is not None:
        p = np.asarray(points, dtype=np.float64)
        data.append(go.Scatter3d(x=p[:, 0], y=p[:, 1], z=p[:, 2], mode="markers", marker=dict(size=1.5)))
    fig = go.Figure(data=data)
    fig.update_layout(
        title=title, scene=dict(aspectmode="data"), margin=dict(l=0, r=0, t=30 if title else 0, b=0)
    )
    return fig

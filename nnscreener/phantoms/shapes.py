"""Implicit shapes in body-model millimetres and the voxel canvas that rasterises them, one bounding box at a time.

Every shape has a signed distance `sdf(z, y, x)` (mm, <= 0 inside; exact for tubes, a first-order estimate for
superellipsoids) that works on broadcastable coordinate arrays: the (nz,1,1)/(1,ny,1)/(1,1,nx) axes of a box of the
grid, or flat arrays of points. Painting evaluates a shape only inside its bounding box, which keeps a 512 x 512 x 200
volume with thousands of vessel segments fast.
"""
import numpy as np

KEEP = 255  # entry of a remap table: leave voxels of this tissue untouched


def rotation(about_z: float = 0., about_y: float = 0., about_x: float = 0.) -> np.ndarray:
    """Rotation matrix acting on (z, y, x) vectors; angles in degrees, applied x first, then y, then z."""
    cz, sz = np.cos(np.radians(about_z)), np.sin(np.radians(about_z))
    cy, sy = np.cos(np.radians(about_y)), np.sin(np.radians(about_y))
    cx, sx = np.cos(np.radians(about_x)), np.sin(np.radians(about_x))
    rot_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # turns the (y, x) plane
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # turns the (z, x) plane
    rot_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # turns the (z, y) plane
    return rot_z @ rot_y @ rot_x


class Superellipsoid:
    """(y/b)^2 + (x/a)^2 + |z/c|^pz <= 1 in a rotated frame: pz=2 is an ellipsoid, pz>=6 a round-edged cylinder."""

    def __init__(self, center, semi_axes, rot: np.ndarray | None = None, pz: float = 2.):
        self.center = np.asarray(center, dtype=float)
        self.semi = np.asarray(semi_axes, dtype=float)
        self.rot = rot
        self.pz = pz

    def bbox(self, margin: float = 0.):
        extent = self.semi + margin
        if self.rot is not None:
            extent = np.sqrt((self.rot ** 2) @ extent ** 2)
        return self.center - extent, self.center + extent

    def sdf(self, z, y, x):
        # python floats keep float32 coordinate arrays float32 (numpy scalars would promote them to float64)
        c, semi = self.center.tolist(), self.semi.tolist()
        d = (z - c[0], y - c[1], x - c[2])
        if self.rot is not None:  # local = R^T d
            rot = self.rot.tolist()
            d = tuple(rot[0][i] * d[0] + rot[1][i] * d[1] + rot[2][i] * d[2] for i in range(3))
        rho = np.abs(d[0] / semi[0]) ** self.pz + (d[1] / semi[1]) ** 2 + (d[2] / semi[2]) ** 2
        # sqrt(rho) - 1 is the relative distance; times the smallest semi-axis it is a conservative mm estimate
        return (np.sqrt(rho) - 1) * self.semi.min()


class Segment:
    """A capsule from a to b whose radius tapers linearly from ra to rb; z distances are divided by zscale, so
    zscale > 1 gives a cross-section taller than wide (ribs)."""

    def __init__(self, a, b, ra: float, rb: float | None = None, zscale: float = 1.):
        self.a = np.asarray(a, dtype=float)
        self.b = np.asarray(b, dtype=float)
        self.ra = float(ra)
        self.rb = self.ra if rb is None else float(rb)
        self.zscale = zscale

    def bbox(self, margin: float = 0.):
        r = max(self.ra, self.rb) + margin
        ext = np.array([r * self.zscale, r, r])
        return np.minimum(self.a, self.b) - ext, np.maximum(self.a, self.b) + ext

    def sdf(self, z, y, x):
        s = np.array([1. / self.zscale, 1., 1.])
        a, ab = (self.a * s).tolist(), ((self.b - self.a) * s).tolist()
        p = (z * s[0].item() - a[0], y - a[1], x - a[2])
        t = np.clip((p[0] * ab[0] + p[1] * ab[1] + p[2] * ab[2]) / max(ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2, 1e-9),
                    0., 1.)
        dist = np.sqrt((p[0] - t * ab[0]) ** 2 + (p[1] - t * ab[1]) ** 2 + (p[2] - t * ab[2]) ** 2)
        return dist - (self.ra + t * (self.rb - self.ra))


class Tube:
    """A polyline of capsules through `points` (N, 3) with per-point radii."""

    def __init__(self, points, radii, zscale: float = 1.):
        points = np.asarray(points, dtype=float)
        radii = np.broadcast_to(np.asarray(radii, dtype=float), (len(points),))
        self.parts = [Segment(points[i], points[i + 1], radii[i], radii[i + 1], zscale) for i in range(len(points) - 1)]

    def bbox(self, margin: float = 0.):
        boxes = [p.bbox(margin) for p in self.parts]
        return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)

    def sdf(self, z, y, x):
        return np.minimum.reduce([p.sdf(z, y, x) for p in self.parts])


def parts_of(shape):
    """The pieces a shape is rasterised by, each in its own bounding box."""
    return getattr(shape, 'parts', [shape])


def remap(mapping: dict, default: int | None = None) -> np.ndarray:
    """Lookup table old tissue -> new tissue for Canvas.paint; tissues not in `mapping` get `default` (None: kept)."""
    table = np.full(256, KEEP if default is None else default, dtype=np.uint8)
    for old, new in mapping.items():
        table[old] = new
    return table


class Grid:
    """Voxel-centre coordinates of one case in body-model mm, one monotonic 1-D array per axis (z, y, x).

    The axes are separable because the phantom's direction matrices are diagonal (axis flips only)."""

    def __init__(self, axes):
        self.axes = tuple(np.asarray(a, dtype=np.float32) for a in axes)
        self.shape = tuple(len(a) for a in self.axes)
        self.step = tuple(float(abs(a[1] - a[0])) if len(a) > 1 else 1. for a in self.axes)

    def box(self, lo, hi):
        """Index slices of the voxels whose centres lie in [lo, hi] (mm), or None when that is empty."""
        slices = []
        for coords, l, h in zip(self.axes, lo, hi):
            idx = np.flatnonzero((coords >= l) & (coords <= h))
            if idx.size == 0:
                return None
            slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(slices)

    def coords(self, box=None):
        """Broadcastable (z, y, x) coordinate arrays of a box (default: the whole grid)."""
        box = box or (slice(None),) * 3
        z, y, x = (a[s] for a, s in zip(self.axes, box))
        return z[:, None, None], y[None, :, None], x[None, None, :]


class Canvas:
    """A tissue-label volume that shapes are painted into; `remap` tables decide which tissues a shape may cover."""

    def __init__(self, grid: Grid, tissue: np.ndarray):
        self.grid = grid
        self.tissue = tissue

    def paint(self, shape, table: np.ndarray, margin: float = 0.):
        """Relabel the voxels within `margin` mm of the shape through `table` (see `remap`)."""
        for part in parts_of(shape):
            box = self.grid.box(*part.bbox(margin))
            if box is not None:
                self.paint_mask(box, part.sdf(*self.grid.coords(box)) <= margin, table)

    def paint_mask(self, box, mask: np.ndarray, table: np.ndarray):
        view = self.tissue[box]
        new = table[view]
        np.copyto(view, new, where=mask & (new != KEEP))

    def paint_bone(self, shapes, onto: np.ndarray, cortical: int, cancellous: int, cortex_mm: float):
        """Bones with a cortex: the union of `shapes` becomes cortical bone, then everything deeper than `cortex_mm`
        inside any one shape becomes cancellous, so the cortex follows the outline of the union only."""
        parts = [part for shape in shapes for part in parts_of(shape)]
        depths = []
        for part in parts:
            box = self.grid.box(*part.bbox())
            if box is not None:
                sdf = part.sdf(*self.grid.coords(box))
                self.paint_mask(box, sdf <= 0, onto)
                depths.append((box, sdf))
        to_cancellous = remap({cortical: cancellous})
        for box, sdf in depths:
            self.paint_mask(box, sdf <= -cortex_mm, to_cancellous)

"""The phantom's body model: a randomised adult torso in model millimetres, rasterised into a tissue-label map.

Model frame (mm, before the per-patient scaling to world mm): x towards the patient's left, y posterior, z superior
(the LPS convention of DICOM/ITK); x = y = 0 on the body axis; z runs from the lower lumbar spine (0) to the base of
the neck (600). Landmarks follow adult anatomy (diaphragm domes at T9-T10, carina at T5, kidneys at T12-L3, aortic
bifurcation at L4); sizes, shapes and positions are jittered per patient. Everything (vessel trees included) is drawn
from the rng when the model is built, so one patient looks the same whatever field of view is rasterised.
"""
from enum import IntEnum

import numpy as np

from nnscreener.phantoms.shapes import KEEP, Canvas, Grid, Superellipsoid, Tube, parts_of, remap, rotation


class Tissue(IntEnum):
    """Codes of the tissue-label map; `generator.TISSUE_HU` gives their mean HU."""
    AIR = 0
    SKIN = 1
    FAT = 2  # subcutaneous
    FAT_VISCERAL = 3  # mediastinal, mesenteric, retroperitoneal, renal sinus
    MUSCLE = 4  # body wall, paraspinal, psoas, diaphragm
    LUNG = 5  # lung parenchyma
    LUNG_VESSEL = 6
    LUNG_AIRWAY = 7  # bronchial lumen inside the lung
    LUNG_AIRWAY_WALL = 8
    AIRWAY = 9  # tracheal / main-bronchus lumen
    SOFT = 10  # airway and bowel walls, oesophagus, pancreas, spinal canal
    BLOOD = 11  # great vessels (non-contrast)
    HEART = 12
    LIVER = 13
    SPLEEN = 14
    KIDNEY = 15
    FLUID = 16  # gall bladder, bowel and gastric fluid
    GAS = 17  # bowel and gastric gas
    STOOL = 18
    CARTILAGE = 19  # costal cartilage, intervertebral discs
    BONE_CANCELLOUS = 20
    BONE_CORTICAL = 21
    TABLE = 22  # carbon-fibre shell of the patient table
    TABLE_FOAM = 23


T = Tissue
LUNG_REGION = (T.LUNG, T.LUNG_VESSEL, T.LUNG_AIRWAY, T.LUNG_AIRWAY_WALL)
NOT_BONE_ONTO = (T.AIR, T.TABLE, T.TABLE_FOAM) + LUNG_REGION

# Body outline and wall control points along z (model mm).
Z_CTRL = np.array([0., 100, 200, 300, 380, 460, 540, 600])
HALF_WIDTH = np.array([150., 147, 145, 150, 160, 163, 158, 145])
HALF_DEPTH_ANT = np.array([125., 123, 115, 105, 102, 100, 92, 82])
HALF_DEPTH_POST = np.array([88., 90, 95, 102, 106, 108, 106, 100])
MUSCLE_LAT = np.array([12., 12, 11, 10, 10, 12, 30, 45])  # the shoulder girdle closes the thoracic inlet
MUSCLE_ANT = np.array([10., 10, 10, 10, 12, 14, 22, 30])
BACK_TO_CANAL = np.array([55., 52, 48, 42, 40, 40, 40, 40])  # inner edge of the back fat to the spinal canal
BELLY = np.array([1., 1, 0.9, 0.4, 0, 0, 0, 0])  # where abdominal fat bulges
FAT_LAT = np.array([1.2, 1.2, 1.1, 1.0, 0.8, 0.8, 0.8, 0.8])
FAT_ANT = np.array([1.3, 1.3, 1.2, 1.0, 0.8, 0.8, 0.9, 0.9])
FAT_POST = np.array([1.0, 1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7])
SKIN_MM = 1.5
# spine: canal radius, vertebral-body half-depth (AP) and half-width along z
SPINE_Z = np.array([0., 220, 300, 450, 600])
CANAL_R = np.array([11., 10, 8, 8, 8])
BODY_RY = np.array([17., 16, 13, 12, 11])
BODY_RX = np.array([25., 22, 17, 15, 13])
CAVITY_BEHIND_CANAL = 25.  # lungs and kidneys reach this far behind the spinal canal, lateral to the back muscles
LUNG_CLOUD = 6000  # territory points per lung and tree: ~3000 terminal vessels


def _interp(z, table, xp=Z_CTRL):
    """np.interp that keeps float32 arrays float32 (np.interp returns float64)."""
    out = np.interp(z, xp, table)
    return out.astype(np.float32) if isinstance(z, np.ndarray) and z.dtype == np.float32 else out


def _spine(table, z):
    """A spine profile (CANAL_R, BODY_RY or BODY_RX) at height z."""
    return _interp(z, table, SPINE_Z)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-9)


class BodyModel:
    """One randomised patient. `render(grid)` rasterises it into a tissue map (see `Tissue`)."""

    def __init__(self, rng: np.random.Generator, min_vessel_radius: float = 0.6):
        u = rng.uniform
        self.px, self.py_ant, self.py_post = u(1.9, 2.3), u(1.9, 2.3), u(2.6, 3.4)
        belly, fat = 40 * u(0, 1) ** 2, u(5, 28)
        jitter = u(0.96, 1.04, (3, len(Z_CTRL)))  # a slightly different outline per patient
        self.prof = {'width': HALF_WIDTH * jitter[0], 'ant': HALF_DEPTH_ANT * jitter[1] + belly * BELLY,
                     'post': HALF_DEPTH_POST * jitter[2], 'fat_lat': fat * FAT_LAT,
                     'fat_ant': fat * FAT_ANT + 0.5 * belly * BELLY, 'fat_post': fat * FAT_POST,
                     'muscle_lat': MUSCLE_LAT * u(0.8, 1.2), 'muscle_ant': MUSCLE_ANT * u(0.8, 1.2),
                     'back': BACK_TO_CANAL * u(0.9, 1.1)}
        self._build_spine(rng)
        self._build_thorax(rng)
        self._build_abdomen(rng)
        self._build_trees(rng, min_vessel_radius)
        self._build_ribcage(rng)

    # ----------------------------------------------------------------------------------------------- body outline
    def p(self, name, z):
        return _interp(z, self.prof[name])

    def half_axes(self, z, layer: str, grow: float = 0., x=None):
        """Half-width, anterior and posterior half-depth of a body layer at z: 'skin' (outline), 'dermis' (inner
        edge of the skin), 'fat' (inner edge of subcutaneous fat) or 'cavity' (inner edge of the muscle wall).

        The cavity's posterior half-depth depends on x: next to the spine (|x| < 22 mm) the back muscles fill
        everything behind the transverse processes; lateral to them (|x| > 60 mm, or x=None) lungs and kidneys reach
        CAVITY_BEHIND_CANAL mm behind the spinal canal."""
        lat = ant = post = 0.
        if layer != 'skin':
            lat = ant = post = SKIN_MM
        if layer in ('fat', 'cavity'):
            lat, ant, post = lat + self.p('fat_lat', z), ant + self.p('fat_ant', z), post + self.p('fat_post', z)
        if layer == 'cavity':
            lat, ant = lat + self.p('muscle_lat', z), ant + self.p('muscle_ant', z)
            lateral = 1. if x is None else np.clip((np.abs(x) - 22) / 38, 0, 1)
            post = self.y_canal(z) + 3 + (CAVITY_BEHIND_CANAL - 3) * lateral * lateral * (3 - 2 * lateral)
            return self.p('width', z) - lat + grow, self.p('ant', z) - ant + grow, post + grow
        return self.p('width', z) - lat + grow, self.p('ant', z) - ant + grow, self.p('post', z) - post + grow

    def rho(self, z, y, x, layer: str, grow: float = 0.):
        """Superellipse radius of a body layer (< 1 inside); separable in x and y (except behind the spine), so cheap
        on a whole grid."""
        a, b_ant, b_post = self.half_axes(z, layer, grow, x)
        y_term = np.where(y < 0, (np.abs(y) / b_ant) ** self.py_ant, (np.abs(y) / b_post) ** self.py_post)
        return (np.abs(x) / a) ** self.px + y_term

    def y_canal(self, z):
        return self.p('post', z) - self.p('fat_post', z) - self.p('back', z)

    def y_body(self, z):
        """Centre of the vertebral bodies."""
        return self.y_canal(z) - _spine(CANAL_R, z) - 6 - _spine(BODY_RY, z)

    def dome(self, side, y, x):
        """Height of the diaphragm dome of one side (-1 right, +1 left); deepest in the posterior recess."""
        zd = np.where(side < 0, self.dome_z[0], self.dome_z[1])
        ry = np.where(y < self.dome_y, self.dome_r_ant, self.dome_r_post)
        return zd - (x - side * 55) ** 2 / 240 - (y - self.dome_y) ** 2 / (2 * ry)

    def below_dome(self, z, y, x):
        return z < self.dome(np.where(x < 0, -1., 1.), y, x)

    def lung_inside(self, z, y, x):
        """True inside either lung (points or broadcastable grid axes)."""
        side = np.where(x < 0, -1., 1.)
        ok = (self.rho(z, y, x, 'cavity', grow=-2) < 1) & (np.abs(x) > 1.5)
        ok &= (z > self.dome(side, y, x) + 4) & (z < self.apex_z - ((x - side * 40) ** 2 + (y - 5) ** 2) / 76)
        for shape, margin in self.lung_exclusions:
            ok &= shape.sdf(z, y, x) > margin
        return ok

    # ------------------------------------------------------------------------------------------------- construction
    def _build_spine(self, rng):
        scale = rng.uniform(0.97, 1.03)
        levels = [('C7', 16, 5)] + [(f'T{k}', 20 + 6 * (k - 1) / 11, 5) for k in range(1, 13)]
        levels += [(f'L{k}', 29, 10) for k in range(1, 6)]
        self.vertebrae, self.level, z = [], {}, 590.
        for name, height, disc in levels:
            bottom = z - height * scale
            self.vertebrae.append((name, bottom, z, disc * scale))
            self.level[name] = (z + bottom) / 2
            z = bottom - disc * scale

    def _build_thorax(self, rng):
        u, lv = rng.uniform, self.level
        self.dome_z = np.array([lv['T9'] + u(-5, 15), 0.])
        self.dome_z[1] = self.dome_z[0] - u(5, 20)
        self.dome_y, self.dome_r_ant, self.dome_r_post = u(-20, -10), u(140, 180), u(65, 85)
        self.apex_z = lv['T1'] - u(5, 20)
        y_vb = self.y_body

        def ry(z):
            return _spine(BODY_RY, z)

        def rx(z):
            return _spine(BODY_RX, z)

        def y_eso(z):  # the oesophagus lies just in front of the vertebral bodies, the trachea in front of it
            return y_vb(z) - ry(z) - 9

        def y_tr(z):
            return y_eso(z) - 17

        hs = u(0.9, 1.15)
        z_h = self.dome_z[1] + 55 * hs
        y_h = -self.half_axes(z_h, 'cavity')[1] + 50 * hs
        self.heart = Superellipsoid((z_h, y_h, u(28, 40)), np.array([48, 48, 62]) * hs,
                                    rotation(about_z=u(20, 40), about_y=u(-25, -10)))
        z_arch, z_carina = lv['T3'], lv['T5'] + 8
        y_asc, y_desc = y_tr(lv['T4']) - 24, y_vb(lv['T4'])
        desc = [(z, y_vb(z) - 0.3 * ry(z), rx(z) + 11) for z in (lv['T6'], lv['T8'], lv['T10'])]
        abd = [(z, y_vb(z) - ry(z) - 12, 8) for z in (lv['T12'], lv['L2'])]
        bif = (lv['L4'], y_vb(lv['L4']) - ry(lv['L4']) - 10, 5)
        self.aorta = Tube([(z_h + 20, y_h + 10, 2), (lv['T4'], y_asc, 2), (z_arch + 8, (y_asc + y_desc) / 2, 8),
                           (lv['T4'], y_desc - 2, rx(lv['T4']) + 10)] + desc + abd + [bif],
                          [14, 15, 13, 12, 12, 11, 11, 10, 10, 9])
        self.iliacs = [Tube([bif, (10, bif[1] + 5, s * 45)], [7, 6]) for s in (-1, 1)]
        self.great_vessels = [
            Tube([(z_arch + 10, y_asc + 8, -2), (590, y_tr(590) - 10, -22)], 7),
            Tube([(z_arch + 10, (y_asc + y_desc) / 2, 8), (590, y_tr(590) - 6, 16)], 4.5),
            Tube([(z_arch + 8, y_desc - 4, 14), (575, y_tr(575) + 8, 30), (560, y_tr(560) + 4, 60)], 5)]
        self.svc = Tube([(lv['T2'] + 10, y_asc - 2, -28), (z_h + 40, y_asc + 4, -25)], 9)
        self.ivc = Tube([(z_h - 30, y_h + 20, -25), (self.dome_z[0] - 20, y_vb(lv['T11']) - ry(lv['T11']) - 14, -24),
                         (lv['L1'], y_vb(lv['L1']) - ry(lv['L1']) - 9, -20),
                         (lv['L4'], y_vb(lv['L4']) - ry(lv['L4']) - 8, -16)], 11)
        pa_split = (lv['T5'], y_tr(lv['T5']) - 14, 14)
        self.hilum = {s: np.array([lv['T5'] - 10, y_tr(lv['T5']) + 12, s * 42.]) for s in (-1, 1)}
        self.pulmonary_arteries = [Tube([(z_h + 35, y_h - 30, 12), pa_split], 13)] + [
            Tube([pa_split, self.hilum[s] + (2, -8, 0)], 10) for s in (-1, 1)]
        self.oesophagus = Tube([(595, y_eso(595), 3), (lv['T6'], y_eso(lv['T6']), 5),
                                (self.dome_z[1] - 5, y_eso(self.dome_z[1]) - 10, 22),
                                (self.dome_z[1] - 30, -25, 45)], 7)
        self.trachea = Tube([(595, y_tr(595), 0), (z_carina, y_tr(z_carina), 0)], 9)
        self.main_bronchi = [Tube([(z_carina, y_tr(z_carina), 0), self.hilum[s]], 6.5) for s in (-1, 1)]
        self.upper_mediastinum = Superellipsoid((lv['T2'], y_tr(lv['T2']) - 25, 0), (50, 30, 24))
        self.left_atrium = np.array([z_h + 15, y_h + 30, 8.])
        spine = Tube([(z, y_vb(z), 0) for z in np.linspace(self.dome_z[1] - 120, 600, 8)],
                     [max(rx(z), ry(z)) + 2 for z in np.linspace(self.dome_z[1] - 120, 600, 8)])
        self.lung_exclusions = [(self.heart, 5), (self.aorta, 3), (self.svc, 3), (self.oesophagus, 3),
                                (self.trachea, 3), (self.upper_mediastinum, 0), (spine, 4)] + \
                               [(t, 3) for t in self.pulmonary_arteries + self.great_vessels]

    def _build_abdomen(self, rng):
        u, lv, y_vb = rng.uniform, self.level, self.y_body
        d_r, d_l = self.dome_z
        ls = u(0.85, 1.15)
        self.liver = [Superellipsoid((d_r - 70 * ls, u(-10, 0), -62), np.array([90, 95, 85]) * ls,
                                     rotation(about_z=u(-15, 0))),
                      Superellipsoid((d_l - 30 * ls, -45, u(15, 35)), np.array([35, 35, 55]) * ls,
                                     rotation(about_z=u(5, 25)))]
        # the liver stays right of the spine and out of the left retroperitoneum (aorta, left crus, adrenal)
        z_mid = d_r - 70 * ls
        y_front = y_vb(z_mid) - _spine(BODY_RY, z_mid) - 20
        self.liver_limit = Superellipsoid((z_mid, y_front + 200, -_spine(BODY_RX, z_mid) + 200), (200, 200, 200),
                                          pz=8)
        self.gallbladder = Superellipsoid((d_r - 120 * ls, -45, -50), (u(25, 38), u(12, 17), u(11, 15)),
                                          rotation(about_x=u(15, 40)))
        ss = u(0.75, 1.25)
        self.spleen = Superellipsoid((d_l - 55, 40, 85), np.array([45, 55, 24]) * ss, rotation(about_z=u(-55, -35)))
        self.stomach = Superellipsoid((d_l - 45, -35, 50), (u(45, 60), u(32, 42), u(32, 42)),
                                      rotation(about_z=u(10, 30)))
        self.stomach_gas_y = -35 - 40 + u(0.15, 0.5) * 80
        y_panc = y_vb(lv['L1']) - 40
        self.pancreas = Tube([(lv['L1'] - 10, y_panc + 5, -35), (lv['L1'], y_panc - 3, 0), (lv['L1'] + 10, y_panc, 45),
                              (lv['L1'] + 20, 30, 80)], [13, 10, 10, 8])
        self.kidneys = []
        for s, z in ((-1, lv['L2'] + u(0, 15)), (1, lv['L2'] + u(15, 30))):
            c = np.array([z, y_vb(z) + 25, s * (_spine(BODY_RX, z) + 45)])
            rot = rotation(about_z=s * u(-40, -20), about_y=s * u(5, 20))
            self.kidneys.append((Superellipsoid(c, (52, 24, 28), rot),
                                 Superellipsoid(c + rot @ (0, -4, -s * 14.), (28, 9, 10), rot)))
        self.psoas = [Tube([(lv['T12'], y_vb(lv['T12']), s * (_spine(BODY_RX, lv['T12']) - 4)),
                            (lv['L3'], y_vb(lv['L3']) + 2, s * (_spine(BODY_RX, lv['L3']) + 12)),
                            (lv['L5'] - 30, y_vb(lv['L5']) - 5, s * (_spine(BODY_RX, lv['L5']) + 22))], [6, 16, 22])
                      for s in (-1, 1)]
        # colon frame: caecum, ascending, hepatic flexure, transverse, splenic flexure, descending
        colon = np.array([(20, -20, -80), (140, 0, -90), (d_r - 110, -30, -75), (d_r - 130, -70, -25),
                          (d_r - 125, -70, 30), (d_l - 80, -25, 85), (140, 15, 90), (20, 10, 80)], float)
        colon += rng.normal(0, 6, colon.shape)
        self.colon = Tube(colon, [25, 22, 20, 18, 18, 17, 15, 15])
        # stool is mottled: many small gas bubbles plus a few larger pockets
        self.colon_gas = self._bubbles(rng, self.colon, int(rng.integers(30, 90)), (1.5, 5), anterior=0.3) + \
            self._bubbles(rng, self.colon, int(rng.integers(2, 10)), (5, 14), anterior=0.8)
        # small-bowel loops (random walks) packed into the anterior mid-abdomen: fluid-filled, collapsed or gassy
        self.small_bowel, self.bowel_gas = [], []
        for _ in range(int(rng.integers(30, 45))):
            pts = [np.array([u(20, min(200, d_r - 120)), u(-110, 20), u(-90, 90)])]
            step = _unit(rng.normal(0, 1, 3))
            for _ in range(int(rng.integers(4, 10))):
                step = _unit(step + rng.normal(0, 0.8, 3))
                pts.append(pts[-1] + step * u(15, 25))
            loop = Tube(pts, u(8, 14))
            self.small_bowel.append((loop, [T.FLUID, T.SOFT, T.FLUID][rng.integers(3)]))
            self.bowel_gas += self._bubbles(rng, loop, int(rng.integers(0, 3)), (2, 7), anterior=0.7)

    @staticmethod
    def _bubbles(rng, tube: Tube, n: int, radius_range, anterior: float):
        """Gas pockets along a tube, shifted anteriorly (gas rises in a supine patient)."""
        out = []
        for _ in range(n):
            seg = tube.parts[rng.integers(len(tube.parts))]
            c = seg.a + rng.uniform() * (seg.b - seg.a)
            r = rng.uniform(*radius_range)
            c[1] -= anterior * max(seg.ra - r, 0.)
            out.append(Superellipsoid(c, (r, r, r)))
        return out

    def _build_trees(self, rng, r_min):
        """Per lung: pulmonary arteries paired with bronchi (same tree, artery beside bronchus) and veins."""
        self.airways, self.arteries, self.veins = [], [], []
        for s in (-1, 1):
            tree = territory_tree(rng, self.hilum[s], self._lung_cloud(rng, s, LUNG_CLOUD), 7., r_min)
            for a, b, r0, r1, off_a, off_b in tree:
                self.arteries.append(Tube([a + off_a, b + off_b], [r0, r1]))
                if 0.85 * r1 >= max(1.5 * r_min, 1.2):
                    self.airways.append(Tube([a, b], [0.85 * r0, 0.85 * r1]))
            v_root = self.hilum[s] + (-35, 14, -s * 4.)
            self.veins.append(Tube([v_root, self.left_atrium], 8))
            tree = territory_tree(rng, v_root, self._lung_cloud(rng, s, LUNG_CLOUD), 6.5, r_min)
            self.veins += [Tube([a, b], [r0, r1]) for a, b, r0, r1, _, _ in tree]

    def _lung_cloud(self, rng, side: int, n: int) -> np.ndarray:
        """n points uniformly distributed inside one lung (rejection sampling)."""
        a = float(self.prof['width'].max())
        lo = np.array([self.dome_z.min() - 100, -a, 0 if side > 0 else -a])
        hi = np.array([self.apex_z, a, a if side > 0 else 0])
        points = np.zeros((0, 3))
        while len(points) < n:
            candidates = lo + (hi - lo) * rng.uniform(size=(4 * n, 3))
            points = np.concatenate([points, candidates[self._lung_points(candidates)]])
        return points[:n]

    def _lung_points(self, points):
        return self.lung_inside(points[:, 0], points[:, 1], points[:, 2])

    def _build_ribcage(self, rng):
        u, lv = rng.uniform, self.level
        drops = [25, 35, 45, 55, 60, 65, 70, 75, 75, 70, 45, 35]
        self.ribs, self.cartilages = [], []

        def y_st(z):  # sternum: just in front of the thoracic cavity
            return -self.half_axes(z, 'cavity')[1] - 7

        for k in range(1, 13):
            z_att, drop = lv[f'T{k}'], drops[k - 1] * u(0.85, 1.15)
            if k <= 7:
                x_end = 28 + 4 * k
            elif k <= 10:
                x_end = 60 + 15 * (k - 8)
            for s in (-1, 1):
                rc = _spine(CANAL_R, z_att)
                pts = [(z_att, self.y_canal(z_att) + 6, s * (rc + 22))]
                a0 = self.half_axes(z_att, 'cavity', grow=5)[0]
                t_start = np.arcsin(min(1., (40 / a0) ** (self.px / 2)))
                if k <= 10:
                    a1 = self.half_axes(z_att - drop, 'cavity', grow=5)[0]
                    t_end = np.pi - np.arcsin(min(1., (x_end / a1) ** (self.px / 2)))
                else:
                    t_end = np.pi / 2 + (0.35 if k == 11 else -0.1)
                for t in np.linspace(0, 1, 14):
                    z = z_att - drop * (1 - (1 - t) ** 2)  # steepest just lateral to the rib's angle
                    th = t_start + t * (t_end - t_start)
                    a, b_ant, _ = self.half_axes(z, 'cavity', grow=5)
                    x = a * np.sin(th) ** (2 / self.px)
                    b_post = self.half_axes(z, 'cavity', grow=5, x=x)[2]
                    c = np.cos(th)
                    y = b_post * abs(c) ** (2 / self.py_post) if c > 0 else -b_ant * abs(c) ** (2 / self.py_ant)
                    pts.append((z, y, s * x))
                self.ribs.append(Tube(pts, 3.2, zscale=1.4))
                end = np.array(pts[-1])
                if k <= 7:
                    z_st = 545 - (k - 1) * (545 - self.dome_z[1] - 15) / 6
                    self.cartilages.append(Tube([end, (z_st, y_st(z_st), s * 12)], 3.5, zscale=1.3))
                elif k <= 10:
                    self.cartilages.append(Tube([end, end + (25, -8, -s * 25)], 3.5, zscale=1.3))
        z_lo = self.dome_z[1] - 15
        self.sternum = [Superellipsoid(((z_lo + 515) / 2, y_st(450), 0), ((515 - z_lo) / 2, 6, 13), pz=6),
                        Superellipsoid((540, y_st(540) + 2, 0), (25, 7, 24), pz=4)]
        self.scapulae = [Superellipsoid((495, self.y_canal(495) + 26, s * 85), (60, 4, 42),
                                        rotation(about_z=-s * 25)) for s in (-1, 1)]

    def _vertebra(self, bottom, top):
        zc, h = (bottom + top) / 2, top - bottom
        rc, ry, rx = (_spine(t, zc) for t in (CANAL_R, BODY_RY, BODY_RX))
        yc, yb = self.y_canal(zc), self.y_body(zc)
        lumbar = zc < self.level['T12'] - 10
        ring = [(zc, yc + (rc + 3) * np.cos(a), (rc + 3) * np.sin(a)) for a in np.radians(np.linspace(-110, 110, 7))]
        spinous_end = (zc, yc + rc + 30, 0) if lumbar else (zc - 20, yc + rc + 28, 0)
        shapes = [Superellipsoid((zc, yb, 0), (h / 2, ry, rx), pz=8), Tube(ring, 3.5, zscale=1.8),
                  Tube([(zc, yc + rc + 3, 0), spinous_end], 4.5 if lumbar else 3.5, zscale=1.5)]
        for s in (-1, 1):
            tip = (zc, yc - 4, s * (rc + 32)) if lumbar else (zc + 2, yc + 6, s * (rc + 24))
            shapes += [Tube([(zc, yc - 0.3 * rc, s * (rc + 2)), (zc, yb + 0.6 * ry, s * 0.6 * rx)], 4),
                       Tube([(zc, yc, s * (rc + 2)), tip], 4.5 if not lumbar else 3.5, zscale=1.4)]
        return shapes

    # ----------------------------------------------------------------------------------------------- rasterisation
    def landmarks(self) -> dict:
        """Model z ranges (mm) of the fields of view the generator picks from."""
        return {'chest': (self.dome_z.min() - 80, self.apex_z + 25), 'abdomen': (30., self.dome_z.max() + 15),
                'chest_abdomen': (30., self.apex_z + 25)}

    def render(self, grid: Grid) -> np.ndarray:
        """The tissue-label map (uint8, codes of `Tissue`) of this patient on `grid`."""
        z, y, x = grid.coords()
        layers = np.zeros(grid.shape, np.uint8)
        for layer in ('skin', 'dermis', 'fat', 'cavity'):
            layers += self.rho(z, y, x, layer) < 1
        canvas = Canvas(grid, np.array([T.AIR, T.SKIN, T.FAT, T.MUSCLE, T.FAT_VISCERAL], np.uint8)[layers])
        del layers
        self._paint_table(canvas)
        self._paint_diaphragm(canvas)
        self._paint_mediastinum(canvas)
        self._paint_lungs(canvas)
        self._paint_abdomen(canvas)
        self._paint_bones(canvas)
        return canvas.tissue

    def _paint_table(self, canvas):
        """Gently curved carbon-fibre table (thin shells around foam) that the most posterior point of the back in
        the scanned range rests on."""
        grid = canvas.grid
        top = float(self.p('post', grid.axes[0]).max()) + 1
        shell = max(2., grid.step[1])  # at least a voxel, or the shell breaks up into dashes
        box = grid.box((-np.inf, top - 40, -230), (np.inf, top + 50, 230))
        if box is None:
            return
        _, y, x = grid.coords(box)
        depth = y - (top - x ** 2 / 3000)  # distance below the table's upper surface
        table = np.where((depth >= 0) & (depth <= 40), np.where((depth < shell) | (depth > 40 - shell), T.TABLE,
                                                                 T.TABLE_FOAM), T.AIR).astype(np.uint8)
        view = canvas.tissue[box]
        np.copyto(view, np.broadcast_to(table, view.shape), where=(view == T.AIR) & (table != T.AIR))

    def _paint_diaphragm(self, canvas):
        lo = self.dome_z.min() - 100
        box = canvas.grid.box((lo, -200, -200), (self.dome_z.max() + 5, 200, 200))
        if box is not None:
            z, y, x = canvas.grid.coords(box)
            dome = self.dome(np.where(x < 0, -1., 1.), y, x)
            canvas.paint_mask(box, (z >= dome) & (z <= dome + 4), remap({T.FAT_VISCERAL: T.MUSCLE}))

    def _paint_mediastinum(self, canvas):
        blood = remap({T.FAT_VISCERAL: T.BLOOD, T.MUSCLE: T.BLOOD})
        canvas.paint(self.heart, remap({T.FAT_VISCERAL: T.HEART, T.MUSCLE: T.HEART}))
        for tube in [self.aorta, self.svc, self.ivc] + self.iliacs + self.great_vessels + self.pulmonary_arteries:
            canvas.paint(tube, blood)
        into_fat = remap({T.FAT_VISCERAL: T.SOFT, T.MUSCLE: T.SOFT})
        canvas.paint(self.oesophagus, into_fat)
        for tube in [self.trachea] + self.main_bronchi:
            canvas.paint(tube, remap({T.FAT_VISCERAL: T.AIRWAY, T.MUSCLE: T.AIRWAY}), margin=-2)
            canvas.paint(tube, into_fat)

    def _paint_lungs(self, canvas):
        grid = canvas.grid
        a = float(self.prof['width'].max())
        box = grid.box((self.dome_z.min() - 100, -a, -a), (self.apex_z, a, a))
        if box is None:
            return
        z, y, x = grid.coords(box)
        side = np.where(x < 0, -1., 1.)
        mask = (self.rho(z, y, x, 'cavity', grow=-2) < 1) & (np.abs(x) > 1.5)
        mask &= (z > self.dome(side, y, x) + 4) & (z < self.apex_z - ((x - side * 40) ** 2 + (y - 5) ** 2) / 76)
        for shape, margin in self.lung_exclusions:
            for part in parts_of(shape):
                sub = grid.box(*part.bbox(margin))
                rel = _relative(sub, box)
                if rel is not None:
                    mask[rel] &= part.sdf(*grid.coords(_absolute(rel, box))) > margin
        canvas.paint_mask(box, mask, remap({T.FAT_VISCERAL: T.LUNG}))
        # bronchi: lumen first, then the wall around it (painted only where the lumen left lung)
        for tube in self.airways:
            canvas.paint(tube, remap({T.LUNG: T.LUNG_AIRWAY, T.SOFT: T.AIRWAY, T.FAT_VISCERAL: T.AIRWAY}),
                         margin=-0.2 * tube.parts[0].rb - 0.4)
        for tube in self.airways:
            canvas.paint(tube, remap({T.LUNG: T.LUNG_AIRWAY_WALL, T.FAT_VISCERAL: T.SOFT}))
        vessel = remap({T.LUNG: T.LUNG_VESSEL, T.FAT_VISCERAL: T.BLOOD})
        for tube in self.arteries + self.veins:
            canvas.paint(tube, vessel)

    def _paint_abdomen(self, canvas):
        fat = T.FAT_VISCERAL

        def paint(shape, mapping, margin=0.):
            _paint_below(canvas, self, shape, remap(mapping), margin)

        for kidney, _ in self.kidneys:
            paint(kidney, {fat: T.KIDNEY})
        for muscle in self.psoas:
            paint(muscle, {fat: T.MUSCLE})
        for lobe in self.liver:
            _paint_below(canvas, self, lobe, remap({fat: T.LIVER}), 0., exclude=self.liver_limit)
        paint(self.gallbladder, {fat: T.FLUID, T.LIVER: T.FLUID})
        paint(self.spleen, {fat: T.SPLEEN})
        paint(self.stomach, {fat: T.FLUID}, margin=-3.5)
        box = canvas.grid.box(*self.stomach.bbox())
        if box is not None:
            canvas.paint_mask(box, canvas.grid.coords(box)[1] < self.stomach_gas_y, remap({T.FLUID: T.GAS}))
        paint(self.stomach, {fat: T.SOFT})
        paint(self.pancreas, {fat: T.SOFT})
        paint(self.colon, {fat: T.STOOL}, margin=-2)
        for bubble in self.colon_gas:
            paint(bubble, {T.STOOL: T.GAS})
        paint(self.colon, {fat: T.SOFT})
        for loop, content in self.small_bowel:
            paint(loop, {fat: content}, margin=-2)
        for bubble in self.bowel_gas:
            paint(bubble, {T.FLUID: T.GAS})
        for loop, _ in self.small_bowel:
            paint(loop, {fat: T.SOFT})
        for _, sinus in self.kidneys:
            paint(sinus, {T.KIDNEY: fat})

    def _paint_bones(self, canvas):
        onto_bone = remap({t: KEEP for t in NOT_BONE_ONTO}, default=T.CARTILAGE)
        canal = Tube([(z, self.y_canal(z), 0) for z in np.linspace(0, 600, 7)],
                     [_spine(CANAL_R, z) for z in np.linspace(0, 600, 7)])
        canvas.paint(canal, remap({T.MUSCLE: T.SOFT, T.FAT_VISCERAL: T.SOFT, T.FAT: T.SOFT}))
        vertebrae = []
        for _, bottom, top, disc in self.vertebrae:
            ry, rx = (_spine(t, bottom) for t in (BODY_RY, BODY_RX))
            canvas.paint(Superellipsoid((bottom - disc / 2, self.y_body(bottom), 0), (disc / 2 + 1, ry, rx), pz=8),
                         onto_bone)
            vertebrae += self._vertebra(bottom, top)
        for cartilage in self.cartilages:
            canvas.paint(cartilage, onto_bone)
        onto_cortical = remap({t: KEEP for t in NOT_BONE_ONTO}, default=T.BONE_CORTICAL)
        canvas.paint_bone(vertebrae + self.ribs + self.sternum + self.scapulae, onto_cortical, T.BONE_CORTICAL,
                          T.BONE_CANCELLOUS, cortex_mm=1.2)


def _paint_below(canvas: Canvas, body: BodyModel, shape, table, margin, exclude=None):
    """Paint an abdominal organ, clipped below the diaphragm and outside `exclude`."""
    for part in parts_of(shape):
        box = canvas.grid.box(*part.bbox(margin))
        if box is not None:
            z, y, x = canvas.grid.coords(box)
            mask = (part.sdf(z, y, x) <= margin) & body.below_dome(z, y, x)
            if exclude is not None:
                mask &= exclude.sdf(z, y, x) > 0
            canvas.paint_mask(box, mask, table)


def _relative(sub, box):
    """`sub` (absolute slices) intersected with `box`, as slices relative to `box`; None if they do not overlap."""
    if sub is None:
        return None
    out = []
    for s, b in zip(sub, box):
        lo, hi = max(s.start, b.start), min(s.stop, b.stop)
        if lo >= hi:
            return None
        out.append(slice(lo - b.start, hi - b.start))
    return tuple(out)


def _absolute(rel, box):
    return tuple(slice(r.start + b.start, r.stop + b.start) for r, b in zip(rel, box))


def territory_tree(rng, root, territory: np.ndarray, radius: float, r_min: float, leaf: int = 2, reach=(0.45, 0.7)):
    """A space-filling vessel tree by recursive territory splitting (as in constrained constructive vascular models).

    Each branch runs from its parent's end part of the way towards the centroid of the points it supplies; the
    points are then split across their (jittered) principal axis at a random quantile, one half per child. Radii
    follow Murray's law r^3 = r1^3 + r2^3 with r^3 proportional to the supplied points. Terminal branches (too few
    points, or a child would be thinner than `r_min`) end at their centroid. Returns segments
    (a, b, r_a, r_b, off_a, off_b); off_* place a companion vessel beside the branch (a pulmonary artery beside its
    bronchus), continuous across joints because a child starts at its parent's end offset.
    """
    ref = _unit(rng.normal(size=3))
    segments, stack = [], [(np.asarray(root, float), territory, float(radius), np.zeros(3))]
    while stack:
        start, points, r, off = stack.pop()
        centre = points.mean(0)
        terminal = len(points) < 2 * leaf or r * 0.5 ** (1 / 3) < r_min
        end = centre if terminal else start + (centre - start) * rng.uniform(*reach)
        d = _unit(end - start)
        off_end = _unit(ref - (ref @ d) * d) * (r * 1.8 + 0.6)
        segments.append((start, end, r, 0.95 * r, off, off_end))
        if terminal:
            continue
        centred = points - centre
        axis = _unit(np.linalg.eigh(centred.T @ centred)[1][:, -1] + rng.normal(0, 0.3, 3))
        proj = centred @ axis
        split = proj <= np.quantile(proj, rng.uniform(0.3, 0.7))
        for half in (points[split], points[~split]):
            if len(half):
                stack.append((end, half, r * (len(half) / len(points)) ** (1 / 3), off_end))
    return segments

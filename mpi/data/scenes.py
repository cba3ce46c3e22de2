"""CLEVR-style scenes: a sampler, a Pillow renderer and a loader for the real CLEVR scene files.

A scene is a plain dict in CLEVR's own JSON schema (`CLEVR_<split>_scenes.json`):

    {"image_index": 0, "image_filename": "...png", "split": "train",
     "objects": [{"shape": "cube", "color": "red", "size": "large", "material": "metal",
                  "3d_coords": [x, y, z], "rotation": deg, "pixel_coords": [u, v, depth]}, ...]}

so the same policy and item code runs on rendered scenes and on real CLEVR scenes. Rendered scenes
add one field per object, `bbox` ([x1, y1, x2, y2] in pixels), used by GTAPolicy's box tools.

The renderer ray-casts each object once into a small shaded sprite (sphere, cylinder and rotated
cube are exact 3-D primitives seen from above), caches the sprite, and pastes the sprites far to
near on a CLEVR-gray floor with soft shadows. Rubber is matte (diffuse only); metal has a dark
body, a sharp sky/floor reflection band and a hot specular spot, so the material reads even at
56 px. Large objects have twice the radius of small ones, as in CLEVR.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# CLEVR's ontology and its RGB values (mpi.data.ontology), named here as well.
from .ontology import ATTRIBUTES, COLOR_RGB, COLORS, MATERIALS, SHAPES, SIZES  # noqa: F401

SIZE_RADIUS = {"small": 0.35, "large": 0.7}  # CLEVR's world radii; large = 2 x small

# Camera: perspective for where things are, orthographic per sprite for how they look.
_ELEV = math.radians(35.0)
_CAM_DIST = 12.0
_FOCAL = 1.6
_WORLD_SCALE = 1.25  # CLEVR radii are small for a 56-112 px image; enlarge the objects, not the floor
_GROUND = 3.0  # objects sit in [-3, 3]^2 on the floor, as in CLEVR
_LIGHT = np.array([-0.55, 0.75, 0.45])
_LIGHT = _LIGHT / np.linalg.norm(_LIGHT)


class SceneError(ValueError):
    """A scene file or image folder that does not match the CLEVR schema."""


# ----------------------------------------------------------------------------- sampling
def _project(x: float, z: float, height: float) -> tuple[float, float, float]:
    """World point (x right, height up, z toward the camera) -> (s, t, depth) in focal units."""
    sin_e, cos_e = math.sin(_ELEV), math.cos(_ELEV)
    # camera at (0, D sin e, D cos e) looking at the origin
    wx, wy, wz = x, height - _CAM_DIST * sin_e, z - _CAM_DIST * cos_e
    depth = -(wy * sin_e + wz * cos_e)
    up = wy * cos_e - wz * sin_e
    return _FOCAL * wx / depth, _FOCAL * up / depth, depth


def _to_pixels(s: float, t: float, image_size: int) -> tuple[float, float]:
    return image_size * (0.5 + s), image_size * (0.56 - t)


def sample_object(rng: random.Random, **fixed: str) -> dict[str, Any]:
    """Attributes of one object, uniform over CLEVR's values unless fixed by keyword."""
    obj = {attr: fixed.get(attr) or rng.choice(values) for attr, values in ATTRIBUTES.items()}
    for attr, value in fixed.items():
        check_attribute(attr, value, where="sample_object")
    return obj


def check_attribute(attr: str, value: Any, where: str) -> None:
    if attr not in ATTRIBUTES:
        raise SceneError(f"{where}: unknown attribute field '{attr}'; CLEVR has {list(ATTRIBUTES)}")
    if value not in ATTRIBUTES[attr]:
        raise SceneError(
            f"{where}: field '{attr}' has unknown value {value!r}; expected one of {list(ATTRIBUTES[attr])}"
        )


def place_objects(
    rng: random.Random, objects: list[dict[str, Any]], image_size: int = 224, max_restarts: int = 200
) -> list[dict[str, Any]]:
    """Give each object a floor position and rotation, with no 3-D contact and little 2-D overlap.

    Like CLEVR's generator: rejection-sample positions, restart the whole layout when stuck.
    """
    for restart in range(max_restarts):
        # Relax the 2-D overlap rule slowly if a crowded scene keeps failing.
        min_sep = max(0.45, 0.8 - 0.01 * restart)
        placed: list[dict[str, Any]] = []
        for obj in objects:
            radius = SIZE_RADIUS[obj["size"]] * _WORLD_SCALE
            for _ in range(60):
                x, z = rng.uniform(-_GROUND, _GROUND), rng.uniform(-_GROUND, _GROUND)
                s, t, depth = _project(x, z, radius)
                r_px = image_size * _FOCAL * radius / depth
                u, v = _to_pixels(s, t, image_size)
                # Keep the whole object inside the frame.
                ok = (u - 1.05 * r_px >= 0 and u + 1.05 * r_px <= image_size
                      and v - 1.15 * r_px >= 0 and v + 1.2 * r_px <= image_size)
                for other in placed if ok else ():
                    ox, _, oz = other["3d_coords"]
                    if math.hypot(x - ox, z - oz) < radius + other["_r"] + 0.1:
                        ok = False
                        break
                    ou, ov, _ = other["pixel_coords"]
                    if math.hypot(u - ou, v - ov) < min_sep * (r_px + other["_rpx"]):
                        ok = False
                        break
                if ok:
                    new = dict(obj)
                    new["3d_coords"] = [round(x, 4), round(z, 4), round(radius, 4)]
                    new["rotation"] = round(rng.uniform(0.0, 360.0), 3)
                    new["pixel_coords"] = [round(u, 2), round(v, 2), round(depth, 4)]
                    new["_r"], new["_rpx"] = radius, r_px
                    placed.append(new)
                    break
            else:
                break
        if len(placed) == len(objects):
            for obj in placed:
                r_px = obj.pop("_rpx")
                obj.pop("_r")
                u, v, _ = obj["pixel_coords"]
                x1, y1, x2, y2 = _sprite_extent(obj["shape"])
                obj["bbox"] = [
                    max(0, int(round(u + x1 * r_px))),
                    max(0, int(round(v + y1 * r_px))),
                    min(image_size, int(round(u + x2 * r_px))),
                    min(image_size, int(round(v + y2 * r_px))),
                ]
            return placed
    raise RuntimeError(f"could not place {len(objects)} objects without overlap; use fewer objects")


def sample_scene(
    rng: random.Random,
    image_size: int = 224,
    n_objects: tuple[int, int] = (3, 10),
    objects: list[dict[str, str]] | None = None,
    index: int = 0,
    split: str = "rendered",
) -> dict[str, Any]:
    """A CLEVR-schema scene: 3-10 random objects (or the given attribute dicts), placed on the floor."""
    if objects is None:
        n = rng.randint(*n_objects)
        objects = [sample_object(rng) for _ in range(n)]
    return {
        "image_index": index,
        "image_filename": f"MPI_{split}_{index:06d}.png",
        "split": split,
        "image_size": image_size,
        "objects": place_objects(rng, objects, image_size),
    }


# ----------------------------------------------------------------------------- rendering
def _camera_rays(n: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic rays through an n x n grid covering [-extent, extent]^2 (object units)."""
    sin_e, cos_e = math.sin(_ELEV), math.cos(_ELEV)
    view = np.array([0.0, -sin_e, -cos_e])
    right = np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, cos_e, -sin_e])
    coords = (np.arange(n) + 0.5) / n * 2 * extent - extent
    s, t = np.meshgrid(coords, -coords)  # row 0 is the top of the sprite
    origin = s[..., None] * right + t[..., None] * up - 10.0 * view
    return origin, np.broadcast_to(view, origin.shape)


def _hit_sphere(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    disc = b * b - c
    hit = disc > 0
    lam = -b - np.sqrt(np.where(hit, disc, 0.0))
    p = o + lam[..., None] * d
    return hit, p  # normal = p


def _hit_cylinder(o: np.ndarray, d: np.ndarray, radius: float = 0.9, top: float = 0.85) -> tuple:
    # side: x^2 + z^2 = r^2, -1 <= y <= top ; cap: y = top
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2]
    c = o[..., 0] ** 2 + o[..., 2] ** 2 - radius**2
    disc = b * b - a * c
    lam_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    p_side = o + lam_side[..., None] * d
    side = (disc > 0) & (p_side[..., 1] >= -1.0) & (p_side[..., 1] <= top)
    lam_cap = (top - o[..., 1]) / d[..., 1]
    p_cap = o + lam_cap[..., None] * d
    cap = (p_cap[..., 0] ** 2 + p_cap[..., 2] ** 2) <= radius**2
    use_cap = cap & (~side | (lam_cap < lam_side))
    normal = np.where(use_cap[..., None], np.array([0.0, 1.0, 0.0]), p_side * np.array([1, 0, 1]) / radius)
    point = np.where(use_cap[..., None], p_cap, p_side)
    return side | cap, normal, point


def _hit_cube(o: np.ndarray, d: np.ndarray, rotation: float, half: float = 0.8) -> tuple:
    # Box [-half, half] x [-1, -1 + 2 half] x [-half, half], rotated about the vertical axis.
    th = math.radians(rotation)
    rot = np.array([[math.cos(th), 0, -math.sin(th)], [0, 1, 0], [math.sin(th), 0, math.cos(th)]])
    ol, dl = o @ rot, d @ rot  # into box coordinates
    lo = np.array([-half, -1.0, -half])
    hi = np.array([half, -1.0 + 2 * half, half])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - ol) / dl, (hi - ol) / dl
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    t_near = tmin.max(-1)
    t_far = tmax.min(-1)
    hit = t_near < t_far
    axis = tmin.argmax(-1)
    sign = -np.sign(np.take_along_axis(dl, axis[..., None], -1)[..., 0])
    normal_local = np.zeros_like(ol)
    np.put_along_axis(normal_local, axis[..., None], sign[..., None], -1)
    point = o + np.where(hit, t_near, 0.0)[..., None] * d
    return hit, normal_local @ rot.T, point


def _shade_maps(normal: np.ndarray, point: np.ndarray, material: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (A, B) so that the shaded colour is clip(rgb * A + B): colour-independent, cacheable."""
    sin_e, cos_e = math.sin(_ELEV), math.cos(_ELEV)
    view = np.array([0.0, -sin_e, -cos_e])
    ndotl = np.clip((normal * _LIGHT).sum(-1), 0.0, 1.0)
    half = _LIGHT - view
    half = half / np.linalg.norm(half)
    ndoth = np.clip((normal * half).sum(-1), 0.0, 1.0)
    if material == "rubber":
        return 0.3 + 0.8 * ndotl, 0.05 * ndoth**4
    # Metal: a mirror of a bright sky over a light floor with a dark band at the horizon, plus a
    # hot highlight and a vertical highlight stripe, so flat cube faces and cylinder sides shine too.
    refl = view - 2.0 * (normal * view).sum(-1, keepdims=True) * normal
    with np.errstate(divide="ignore", invalid="ignore"):
        floor_dist = np.where(refl[..., 1] < 0, (point[..., 1] + 1.0) / -refl[..., 1], np.inf)
    env = np.where(refl[..., 1] > 0.02, 1.0, np.where(floor_dist < 1.1, 0.55, 0.05))
    nh = normal[..., [0, 2]]
    nh = nh / np.maximum(np.linalg.norm(nh, axis=-1, keepdims=True), 1e-6)
    lh = np.array([half[0], half[2]]) / np.linalg.norm([half[0], half[2]])
    stripe = np.clip((nh * lh).sum(-1), 0, 1) ** 40 * (1 - np.abs(normal[..., 1]))
    return 0.1 + 0.2 * ndotl + 0.85 * env, 1.2 * ndoth**50 + 0.7 * stripe


def _extent(shape: str) -> float:
    return 1.35


@functools.lru_cache(maxsize=2048)
def _sprite_maps(shape: str, material: str, n_px: int, rot_bucket: int) -> tuple[np.ndarray, ...]:
    """Ray-cast one primitive (radius 1) at 2x and return premultiplied (A, B, alpha), n_px x n_px."""
    ss = 2
    o, d = _camera_rays(n_px * ss, _extent(shape))
    if shape == "sphere":
        hit, normal = _hit_sphere(o, d)
        point = normal
    elif shape == "cylinder":
        hit, normal, point = _hit_cylinder(o, d)
    else:
        hit, normal, point = _hit_cube(o, d, rotation=rot_bucket * 90.0 / 8 + 5.0)
    a, b = _shade_maps(normal, point, material)
    alpha = hit.astype(np.float64)
    def down(x: np.ndarray) -> np.ndarray:
        return x.reshape(n_px, ss, n_px, ss).mean((1, 3))
    return down(a * alpha), down(b * alpha), down(alpha)


_MASTER_SIZES = (64, 160)  # sprites are resized from one ray-cast master per look and size class


@functools.lru_cache(maxsize=1024)
def _master_sprite(shape: str, color: str, material: str, rot_bucket: int, master_px: int = 64) -> Image.Image:
    a, b, alpha = _sprite_maps(shape, material, master_px, rot_bucket)
    col = np.array(COLOR_RGB[color], dtype=np.float64) / 255.0
    safe = np.maximum(alpha, 1e-6)[..., None]
    rgb = np.clip((a[..., None] * col + b[..., None]) / safe, 0.0, 1.0)
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    return Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA")


@functools.lru_cache(maxsize=8192)
def _sprite(shape: str, color: str, material: str, n_px: int, rot_bucket: int) -> Image.Image:
    """RGBA sprite of one object (anti-aliased), n_px x n_px, resized from a cached master."""
    master_px = _MASTER_SIZES[0] if n_px <= _MASTER_SIZES[0] else _MASTER_SIZES[1]
    master = _master_sprite(shape, color, material, rot_bucket, master_px)
    if n_px == master_px:
        return master
    # Resize premultiplied so that transparent black does not darken the rim.
    return master.convert("RGBa").resize((n_px, n_px), Image.Resampling.BOX
                                         if n_px < master_px else Image.Resampling.BICUBIC).convert("RGBA")


def warm_sprites() -> None:
    """Ray-cast every object look once (about a second), e.g. before forking render workers."""
    for shape in SHAPES:
        for color in COLORS:
            for material in MATERIALS:
                for bucket in range(8 if shape == "cube" else 1):
                    for master_px in _MASTER_SIZES:
                        _master_sprite(shape, color, material, bucket, master_px)


@functools.lru_cache(maxsize=8)
def _sprite_extent(shape: str) -> tuple[float, float, float, float]:
    """Tight box of a shape's sprite around its centre, in units of its radius in pixels."""
    n = 64
    alpha = np.asarray(_sprite(shape, "gray", "rubber", n, 0))[..., 3]
    ys, xs = np.nonzero(alpha > 40)
    scale = 2 * _extent(shape) / n
    return (xs.min() * scale - _extent(shape), ys.min() * scale - _extent(shape),
            (xs.max() + 1) * scale - _extent(shape), (ys.max() + 1) * scale - _extent(shape))


@functools.lru_cache(maxsize=16)
def _background(size: int) -> Image.Image:
    # CLEVR's floor: a light gray that darkens toward the back.
    ramp = np.linspace(0.78, 0.56, size)[:, None] * np.ones((1, size))
    rgb = np.stack([ramp * 0.97, ramp * 0.97, ramp], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _supersample(image_size: int) -> int:
    # Sprites are anti-aliased already; supersampling only refines small images' placement.
    return 1 if image_size >= 160 else (2 if image_size >= 80 else 4)


def render_scene(scene: dict[str, Any], image_size: int | None = None) -> Image.Image:
    """Draw a scene (with `pixel_coords`) into an RGB image of `image_size` pixels (square)."""
    size = int(image_size or scene.get("image_size", 224))
    native = scene.get("image_size", size)
    ss = _supersample(size)
    big = size * ss
    scale = big / native
    canvas = _background(big).copy()
    objects = sorted(scene["objects"], key=lambda o: -o["pixel_coords"][2])  # far to near
    # Soft shadows first, thrown away from the light (to the right and back).
    shadow = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(shadow)
    for obj in objects:
        u, v, depth = obj["pixel_coords"]
        radius = obj["3d_coords"][2] if len(obj.get("3d_coords", [])) == 3 else SIZE_RADIUS[obj["size"]]
        r = native * _FOCAL * radius / depth * scale
        cx, cy = u * scale + 0.45 * r, v * scale + 0.75 * r
        draw.ellipse([cx - 1.15 * r, cy - 0.5 * r, cx + 1.15 * r, cy + 0.5 * r], fill=110)
    # blur at quarter resolution: soft shadows do not need detail, and it is 16x cheaper
    small = shadow.reduce(4).filter(ImageFilter.GaussianBlur(max(0.5, big / 360)))
    canvas.paste((30, 30, 35), (0, 0), small.resize((big, big), Image.Resampling.BILINEAR))
    for obj in objects:
        u, v, depth = obj["pixel_coords"]
        radius = obj["3d_coords"][2] if len(obj.get("3d_coords", [])) == 3 else SIZE_RADIUS[obj["size"]]
        r = native * _FOCAL * radius / depth * scale
        n_px = max(4, int(round(2 * _extent(obj["shape"]) * r)))
        bucket = int(obj.get("rotation", 0.0) % 90.0 // (90.0 / 8)) if obj["shape"] == "cube" else 0
        sprite = _sprite(obj["shape"], obj["color"], obj["material"], n_px, bucket)
        canvas.paste(sprite, (int(round(u * scale - n_px / 2)), int(round(v * scale - n_px / 2))), sprite)
    return canvas.reduce(ss) if ss > 1 else canvas  # box filter: exact anti-aliasing of the supersample


def render_object(obj: dict[str, str], image_size: int = 64, rotation: float = 30.0) -> Image.Image:
    """One object alone on the floor, filling the frame: the image crop that an -M policy shows."""
    ss = 3
    big = image_size * ss
    canvas = _background(big).copy()
    n_px = int(big * 0.82)
    bucket = int(rotation % 90.0 // (90.0 / 8)) if obj["shape"] == "cube" else 0
    sprite = _sprite(obj["shape"], obj["color"], obj["material"], n_px, bucket)
    # Large objects fill the crop, small ones are drawn at half the size so size stays readable.
    if obj["size"] == "small":
        sprite = sprite.resize((n_px // 2, n_px // 2), Image.Resampling.LANCZOS)
    w = sprite.size[0]
    canvas.paste(sprite, ((big - w) // 2, (big - w) // 2), sprite)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def crop_object(image: Image.Image, obj: dict[str, Any], scene_size: int | None = None, pad: float = 0.25) -> Image.Image:
    """Crop one object out of a scene image (works for real CLEVR images via `pixel_coords`)."""
    scale = image.size[0] / float(scene_size or image.size[0])
    if "bbox" in obj:
        x1, y1, x2, y2 = (c * scale for c in obj["bbox"])
    else:  # real CLEVR: a box around the projected centre, sized from the depth
        u, v, depth = obj["pixel_coords"]
        r = 0.09 * image.size[1] * (2 if obj["size"] == "large" else 1) * 10.0 / max(depth, 1.0)
        x1, y1, x2, y2 = u * scale - r, v * scale - r, u * scale + r, v * scale + r
    w, h = x2 - x1, y2 - y1
    side = max(w, h) * (1 + 2 * pad)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return image.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))


# ----------------------------------------------------------------------------- real CLEVR
# A real CLEVR scene graph is validated field by field when loaded, so that a bad file fails at once
# with the file, the scene index and the field named, not later inside a policy or the renderer.
_SCENE_FIX = "fix or remove this scene in the file (real CLEVR scenes come from CLEVR_<split>_scenes.json)"


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_scene(scene: Any, where: str = "scene") -> None:
    """Raise SceneError naming the field if a scene does not follow CLEVR's scene schema.

    Checks: the scene is an object with a non-empty `objects` list; each object is an object with
    CLEVR's four attributes (known values) and `pixel_coords` = [x, y, depth] of finite numbers;
    `3d_coords` (if present) = three finite numbers, `rotation` (if present) a finite number.
    """
    if not isinstance(scene, dict):
        raise SceneError(f"{where}: a scene must be a JSON object with an 'objects' field, got "
                         f"{type(scene).__name__} {str(scene)[:60]!r}; {_SCENE_FIX}")
    objects = scene.get("objects")
    if not isinstance(objects, list):
        raise SceneError(f"{where}: missing field 'objects' (a list of CLEVR objects), got "
                         f"{type(objects).__name__}; {_SCENE_FIX}")
    if not objects:
        raise SceneError(f"{where}: field 'objects' is empty; CLEVR scenes hold 3-10 objects and a policy "
                         f"needs at least one; {_SCENE_FIX}")
    for k, obj in enumerate(objects):
        at = f"{where} object {k}"
        if not isinstance(obj, dict):
            raise SceneError(f"{at}: an object must be a JSON object, got {type(obj).__name__}; {_SCENE_FIX}")
        for attr in ATTRIBUTES:
            if attr not in obj:
                raise SceneError(f"{at}: missing field '{attr}' (one of {list(ATTRIBUTES[attr])}); {_SCENE_FIX}")
            check_attribute(attr, obj[attr], where=at)
        coords = obj.get("pixel_coords")
        if coords is None:
            raise SceneError(f"{at}: missing field 'pixel_coords' ([x, y, depth] in pixels); {_SCENE_FIX}")
        if not (isinstance(coords, (list, tuple)) and len(coords) == 3 and all(map(_is_real_number, coords))):
            raise SceneError(f"{at}: field 'pixel_coords' must be [x, y, depth], three finite numbers, got "
                             f"{coords!r:.60}; {_SCENE_FIX}")
        if coords[2] <= 0:
            raise SceneError(f"{at}: field 'pixel_coords' has depth {coords[2]!r}; the depth (third value) is "
                             f"the distance to the camera and must be > 0; {_SCENE_FIX}")
        if "3d_coords" in obj and not (isinstance(obj["3d_coords"], (list, tuple)) and len(obj["3d_coords"]) == 3
                                       and all(map(_is_real_number, obj["3d_coords"]))):
            raise SceneError(f"{at}: field '3d_coords' must be three finite numbers, got "
                             f"{obj['3d_coords']!r:.60}; {_SCENE_FIX}")
        if "rotation" in obj and not _is_real_number(obj["rotation"]):
            raise SceneError(f"{at}: field 'rotation' must be a finite number (degrees), got "
                             f"{obj['rotation']!r:.60}; {_SCENE_FIX}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header only (PNG: 24 bytes; others: Pillow's lazy open).

    Raises SceneError naming the file when it is not a readable image. Reading the header of every
    file is cheap (microseconds); decoding errors further in are reported by `scene_image`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        else:
            with Image.open(path) as img:
                width, height = img.size
    except Exception as exc:  # UnidentifiedImageError, OSError, ...
        raise SceneError(f"{path}: not a readable image ({type(exc).__name__}: {exc}); replace the file with "
                         f"the original CLEVR image") from exc
    if width < 1 or height < 1:
        raise SceneError(f"{path}: image header says {width}x{height} pixels; replace the file with the original")
    return width, height


def letterbox_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(side, dx, dy): a width x height image centred on a side x side square (side = the longer edge)."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def load_clevr_scenes(
    scenes_json: str | Path,
    image_dir: str | Path | None = None,
    limit: int | None = None,
    *,
    require_images: bool = False,
) -> list[dict[str, Any]]:
    """Load a real `CLEVR_<split>_scenes.json`; with `image_dir`, check and attach every image.

    Every scene is validated (`validate_scene`); errors name the file, the scene index, the object
    and the field. A scene listed twice (same `image_filename` and objects) is kept once, with a
    warning; the same filename with different objects is an error.

    With `image_dir`, each scene gets `image_path`, and its `pixel_coords` are moved into the frame
    of the square picture that `scene_image` makes: the whole image letterboxed onto a square of
    side max(width, height) (`image_size`), so no object that the policy counts is cut away. The
    original pixel coordinates stay in `clevr_pixel_coords`. `require_images=True` makes a missing
    `image_dir` an error instead of keeping the scene graphs only.
    """
    import warnings

    scenes_json = Path(scenes_json)
    if not scenes_json.is_file():
        raise SceneError(f"scenes_json: no file at {scenes_json} (expected CLEVR_<split>_scenes.json)")
    if require_images and image_dir is None:
        raise SceneError(f"{scenes_json}: no image folder given; pass the folder of this split's CLEVR images "
                         f"(DataConfig.clevr_image_dir, e.g. CLEVR_v1.0/images/val)")
    try:
        data = json.loads(scenes_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SceneError(f"{scenes_json}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         f"the file is probably truncated or corrupt, download it again") from exc
    except UnicodeDecodeError as exc:
        raise SceneError(f"{scenes_json}: not UTF-8 text ({exc}); is this really a CLEVR scenes JSON?") from exc
    scenes = data["scenes"] if isinstance(data, dict) and "scenes" in data else data
    if not isinstance(scenes, list):
        raise SceneError(f"{scenes_json}: expected a top-level field 'scenes' holding a list (CLEVR's layout) "
                         f"or a list of scenes, got {type(scenes).__name__}")
    scenes = scenes[:limit] if limit else scenes
    kept: list[dict[str, Any]] = []
    first_by_name: dict[str, tuple[int, list]] = {}
    n_duplicates = 0
    for i, scene in enumerate(scenes):
        where = f"{scenes_json.name} scene {i}"
        validate_scene(scene, where=where)
        name = scene.get("image_filename")
        if image_dir is not None or name is not None:
            if not isinstance(name, str) or not name.strip() or Path(name).name != name:
                raise SceneError(f"{where}: field 'image_filename' must be a plain file name such as "
                                 f"'CLEVR_val_000000.png', got {name!r}; {_SCENE_FIX}")
        if name is not None:
            if name in first_by_name:
                j, objects = first_by_name[name]
                if objects != scene["objects"]:
                    raise SceneError(f"{where}: image_filename {name!r} is also scene {j}'s, with other objects; "
                                     f"two scene graphs cannot describe one image; {_SCENE_FIX}")
                n_duplicates += 1
                continue
            first_by_name[name] = (i, scene["objects"])
        scene = dict(scene)  # the file's dicts stay untouched
        scene["clevr_source"] = f"{scenes_json.name} scene {i}"
        kept.append(scene)
    if n_duplicates:
        warnings.warn(f"{scenes_json}: {n_duplicates} scene(s) repeat an earlier scene (same image_filename and "
                      f"objects) and were dropped, so that no scene appears twice in one split", stacklevel=2)
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise SceneError(f"image_dir: {image_dir} is not a folder (expected the images of {scenes_json.name})")
        missing = [s["image_filename"] for s in kept if not (image_dir / s["image_filename"]).is_file()]
        if missing:
            raise SceneError(
                f"image_dir {image_dir} does not match {scenes_json.name}: {len(missing)} of {len(kept)} "
                f"'image_filename' entries are missing (first: {missing[:3]}); pass the folder of the same split"
            )
        for scene in kept:
            path = image_dir / scene["image_filename"]
            width, height = image_header_size(path)
            side, dx, dy = letterbox_offsets(width, height)
            scene["image_path"] = str(path)
            scene["clevr_image_size"] = [width, height]
            scene["image_size"] = side
            objects = []
            for obj in scene["objects"]:
                obj = dict(obj)
                u, v, depth = obj["pixel_coords"]
                obj["clevr_pixel_coords"] = list(obj["pixel_coords"])
                obj["pixel_coords"] = [u + dx, v + dy, depth]
                objects.append(obj)
            scene["objects"] = objects
    return kept


def _letterbox(img: Image.Image) -> Image.Image:
    """The whole picture centred on a square; the bars take the mean colour of the edges they extend."""
    width, height = img.size
    side, dx, dy = letterbox_offsets(width, height)
    if dx == dy == 0:
        return img
    pixels = np.asarray(img, dtype=np.float64)
    edges = (np.concatenate([pixels[0], pixels[-1]]) if dy else
             np.concatenate([pixels[:, 0], pixels[:, -1]]))
    fill = tuple(int(round(c)) for c in edges.mean(0))
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, (dx, dy))
    return square


def scene_image(scene: dict[str, Any], image_size: int, world: str = "clevr") -> Image.Image:
    """The scene's picture: the real CLEVR file when the scene has one, else a rendering (`world="sprites"`:
    the toy's flat sprite world, `mpi.data.sprites`).

    A real image (CLEVR's are 480x320) is letterboxed whole onto a square, then resized, so every
    object in the scene graph stays in the picture; `pixel_coords` from `load_clevr_scenes` are
    already in that square's frame (side `image_size` of the scene).
    """
    path = scene.get("image_path")
    if not path:
        if "clevr_source" in scene:  # a real scene graph: its coordinates are not the renderer's
            raise SceneError(f"{scene['clevr_source']}: a real CLEVR scene without its image; load it with "
                             f"image_dir (DataConfig.clevr_image_dir) instead of drawing an empty floor")
        if world == "sprites":
            from .sprites import render_sprites

            return render_sprites(scene, image_size)
        return render_scene(scene, image_size)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # decodes: a truncated or corrupt file fails here
    except Exception as exc:
        source = scene.get("clevr_source", scene.get("image_filename", "?"))
        raise SceneError(f"{path} ({source}): cannot decode the image ({type(exc).__name__}: {exc}); "
                         f"replace it with the original CLEVR file") from exc
    return _letterbox(img).resize((image_size, image_size), Image.Resampling.BICUBIC)


def describe_object(obj: dict[str, Any]) -> str:
    """'small cyan metal sphere' — CLEVR's word order."""
    return f"{obj['size']} {obj['color']} {obj['material']} {obj['shape']}"


def public_scene(scene: dict[str, Any]) -> dict[str, Any]:
    """The scene graph as stored in an item's `extra` (CLEVR fields only, no local paths)."""
    keep = ("shape", "color", "size", "material", "3d_coords", "rotation", "pixel_coords", "bbox")
    out = {
        "image_index": scene.get("image_index", 0),
        "image_filename": scene.get("image_filename", ""),
        "objects": [{k: o[k] for k in keep if k in o} for o in scene["objects"]],
    }
    if "clevr_image_size" in scene:  # real CLEVR: pixel_coords are in the letterboxed square of this side
        out["image_size"] = scene["image_size"]
    return out

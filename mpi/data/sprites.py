"""The sprite world: the same scenes as CLEVR's, drawn so that a toy VLM can see them.

A ClevrPolicy scene is a list of objects (shape, color, size, material). The CLEVR-like renderer
(`mpi.data.scenes.render_scene`) draws them in perspective, small and overlapping, which a pretrained
VLM reads and a 3M-parameter toy trained on a laptop does not. The toy and tiny presets draw the very
same object lists as flat sprites instead, one object per cell of a 4 x 4 grid:

- at 112 px a cell is 28 px = one merged visual token (patch 14, merge 2), so each image token holds at
  most one object and the grounding loss (`mpi.toy_base`) can name what a token shows;
- cube = square, sphere = disc, cylinder = triangle; CLEVR's 8 colors; large fills 86% of a cell, small 43%;
  metal = a white inner rim and a specular spot, rubber = matte with a thin dark rim.

Which cell holds which object is a pure function of the scene (a hash of its objects and index), so the
picture, the grounding targets and a re-render always agree.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from PIL import Image, ImageDraw

from .ontology import COLOR_RGB

GRID = 4  # cells per side: 16 cells = the 16 merged visual tokens of a 112-px image
BACKGROUND = (176, 176, 176)
SIZE_FRACTION = {"large": 0.86, "small": 0.43}  # of the cell's side


def sprite_layout(scene: dict[str, Any]) -> list[int]:
    """The grid cell (row-major, 0..15) of each of the scene's objects, in object order, all distinct."""
    objects = scene["objects"]
    if len(objects) > GRID * GRID:
        raise ValueError(f"scene {scene.get('image_filename', '?')}: {len(objects)} objects do not fit the sprite "
                         f"world's {GRID * GRID} cells; use at most {GRID * GRID} objects (DataConfig.n_objects)")
    key = json.dumps([scene.get("image_index", 0), scene.get("image_filename", ""),
                      [[o["shape"], o["color"], o["size"], o["material"]] for o in objects]], sort_keys=True)
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
    return rng.sample(range(GRID * GRID), len(objects))


def _jitter(scene: dict[str, Any], k: int) -> random.Random:
    return random.Random(f"sprite-jitter/{scene.get('image_filename', '')}/{scene.get('image_index', 0)}/{k}")


def draw_sprite(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cx: float, cy: float, side: float,
                brightness: int = 0) -> None:
    """One object centred at (cx, cy), `side` pixels across (its size class already applied)."""
    r = side / 2
    fill = tuple(max(0, min(255, c + brightness)) for c in COLOR_RGB[obj["color"]])
    metal = obj["material"] == "metal"
    box = (cx - r, cy - r, cx + r, cy + r)
    outline, width = ((255, 255, 255), max(1, round(side / 12))) if metal else ((40, 40, 40), 1)
    if obj["shape"] == "cube":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif obj["shape"] == "sphere":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:  # cylinder: a triangle, the one silhouette left that a few pixels still tell apart
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=outline, width=width)
    if metal:  # a specular spot
        s = max(1.0, side / 8)
        draw.rectangle((cx - s, cy - s / 2 - r / 4, cx + s / 2, cy - r / 4 + s / 2), fill=(255, 255, 255))


def render_sprites(scene: dict[str, Any], image_size: int) -> Image.Image:
    """The scene as sprites on a gray background, one object per grid cell (see `sprite_layout`)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for k, (obj, index) in enumerate(zip(scene["objects"], sprite_layout(scene))):
        rng = _jitter(scene, k)
        row, col = divmod(index, GRID)
        side = cell * SIZE_FRACTION[obj["size"]]
        slack = max(0.0, (cell - side) / 2 - 1)
        jitter = min(2.0, slack) * image_size / 112
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        draw_sprite(draw, obj, cx, cy, side, brightness=rng.randint(-10, 10))
    return image


def render_sprite_object(obj: dict[str, Any], image_size: int = 64) -> Image.Image:
    """One object alone, centred (a -M policy's image crop in the sprite world)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw_sprite(ImageDraw.Draw(image), obj, image_size / 2, image_size / 2, image_size * SIZE_FRACTION[obj["size"]])
    return image


def cell_objects(scene: dict[str, Any], tokens_per_side: int) -> dict[int, dict[str, Any]]:
    """Which object each visual token shows: {token index (row-major over tokens_per_side^2): object}.

    With tokens_per_side == GRID (112 px) a token is a cell; with fewer tokens (56 px: 2 x 2) a token
    covers several cells and names the first object in it."""
    if GRID % tokens_per_side:
        raise ValueError(f"a {GRID}x{GRID} sprite grid does not split into {tokens_per_side}x{tokens_per_side} tokens")
    per = GRID // tokens_per_side
    out: dict[int, dict[str, Any]] = {}
    for obj, index in zip(scene["objects"], sprite_layout(scene)):
        row, col = divmod(index, GRID)
        out.setdefault((row // per) * tokens_per_side + col // per, obj)
    return out

"""The built-in synthetic captioning data: rendered shapes with captions from a small grammar.

Deterministic by seed. Two tasks share one vocabulary:
- "pretrain": the broad distribution the default backbone is pre-trained on (several caption styles);
- "downstream": the adaptation task, a caption style the backbone never saw (new word order and
  attribute emphasis) built from the same words, so a frozen vocabulary can express it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "white": (240, 240, 240)}
SIZES = {"small": 7, "large": 13}  # half-extent in pixels
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "center": (16, 16)}

PRETRAIN_TEMPLATES = (
    "a {size} {color} {shape} on the {position}",
    "there is a {color} {shape} at the {position}",
    "a {shape} that is {color} and {size}",
    "the {position} shows a {size} {shape}",
)
DOWNSTREAM_TEMPLATES = (
    "the {shape} on the {position} is {size} and {color}",
    "the {size} and {color} {shape} is on the {position}",
)
TASKS = {"pretrain": PRETRAIN_TEMPLATES, "downstream": DOWNSTREAM_TEMPLATES}


def vocabulary() -> list[str]:
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(POSITIONS)
    for template in PRETRAIN_TEMPLATES + DOWNSTREAM_TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str

    def caption(self, template: str) -> str:
        return template.format(shape=self.shape, color=self.color, size=self.size, position=self.position)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + rng.randint(-2, 2), cy + rng.randint(-2, 2)
    r = SIZES[scene.size]
    color = COLORS[scene.color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        draw.ellipse(box, fill=color)
    elif scene.shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def make_split(task: str, size: int, seed: int, split: str) -> list[dict]:
    """Records {"image_id", "image" (PIL), "captions" (references), "target" (the training caption)}."""
    if task not in TASKS:
        raise ValueError(f"data.task: unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if size <= 0:
        raise ValueError(f"synthetic {split} split of size {size}: must be > 0")
    templates = TASKS[task]
    # Distinct streams per split, so train and eval images never coincide by construction of the seed.
    rng = random.Random(f"{seed}-{task}-{split}")
    records = []
    for i in range(size):
        scene = Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                      rng.choice(list(POSITIONS)))
        refs = [scene.caption(t) for t in templates]
        records.append({"image_id": f"{split}-{i}", "image": render(scene, rng), "captions": refs,
                        "target": rng.choice(refs)})
    return records

"""The built-in synthetic vision-language world: rendered scenes of several objects, captions from a small
grammar and questions about them. Deterministic by seed.

It is built so that PT-PEFT's premise can arise (paper §2.1): the backbone is pre-trained on a broad
distribution (five shapes, six colours, two sizes, nine positions, one to three objects per image, captions in
several styles that name attributes, counts and relations, and questions of six kinds), while the downstream
training set is deliberately narrower (three shapes, three colours, one or two objects, one new caption style or
two question kinds). Evaluation then asks three things of an adapted model (``make_eval_suite``):

- ``test``: the downstream task on held-out images of the narrow distribution;
- ``gen`` (generalisation): the downstream task on scenes holding at least one shape or colour the downstream
  training set never shows, which only pre-trained knowledge can name;
- ``ret`` (retention): the pre-training distribution itself, asked for with its own task prompt, so an adapted
  model can still be asked for what it knew.

Tasks (``data.task``): ``pretrain`` (the broad captions), ``downstream`` (narrow captioning in a new style),
``vqa`` (narrow visual question answering). Every record carries its own task prompt and its scene, so the
attribute accuracy (``attribute_accuracy``) can check a caption against what is in the image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
SHAPES = ("circle", "square", "triangle", "diamond", "bar")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "white": (240, 240, 240)}
SIZES = {"small": 5, "large": 8}  # half-extent in pixels
# A 3 x 3 grid of cells, 16 pixels each: (row, column) -> name; a position is one or two words.
_ROWS, _COLS = ("top", "", "bottom"), ("left", "", "right")
POSITIONS = {(r, c): " ".join(w for w in (_ROWS[r], _COLS[c]) if w) or "center" for r in range(3) for c in range(3)}
POSITION_WORDS = frozenset(w for name in POSITIONS.values() for w in name.split())
COUNTS = ("one", "two", "three")
# The downstream training set sees only these (the paper's "less diverse downstream data").
NARROW_SHAPES = ("circle", "square", "triangle")
NARROW_COLORS = ("red", "green", "blue")
MAX_OBJECTS = {"broad": 3, "narrow": 2}

# Task prompts: the style an answer takes is chosen by the prompt, so a model adapted to the downstream style
# can still be asked for the pre-training one.
PRETRAIN_PROMPT = "describe the image"
DOWNSTREAM_PROMPT = "list the objects"
VQA_PROMPT = "Question: {} Answer:"
PROMPTS = {"pretrain": PRETRAIN_PROMPT, "downstream": DOWNSTREAM_PROMPT}

# Bump when the world changes (shapes, grammar, rendering): the default backbone's cache key includes it.
DATA_VERSION = 2


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def words(self, order: str) -> str:
        return order.format(shape=self.shape, color=self.color, size=self.size, position=self.position)


Scene = tuple[Obj, ...]


# --- Captions -------------------------------------------------------------------------------------------------

def _count(scene: Scene, one: str, many: str) -> str:
    """``one shape`` / ``two shapes`` (``is`` / ``are`` when only the verb is asked for)."""
    if one in ("is", "are"):
        return one if len(scene) == 1 else many
    return f"{COUNTS[len(scene) - 1]} {one if len(scene) == 1 else many}"


def _relation(a: Obj, b: Obj) -> str:
    if a.cell[0] < b.cell[0]:
        return "above"
    if a.cell[0] > b.cell[0]:
        return "below"
    return "beside"


def _pretrain_captions(scene: Scene) -> list[str]:
    """Four styles: attribute lists, colour-shape with count, shape-first attributes, and relations."""
    caps = [" and ".join(o.words("a {size} {color} {shape} on the {position}") for o in scene),
            f"there {_count(scene, 'is', 'are')} {_count(scene, 'shape', 'shapes')} "
            + " and ".join(o.words("a {color} {shape}") for o in scene),
            " and ".join(o.words("a {shape} that is {color} and {size}") for o in scene)]
    if len(scene) > 1:
        a, b = scene[0], scene[1]
        caps.append(f"the {a.color} {a.shape} is {_relation(a, b)} the {b.color} {b.shape}")
    else:
        caps.append(scene[0].words("the {position} shows a {size} {shape}"))
    return caps


def _downstream_captions(scene: Scene) -> list[str]:
    """A style the backbone never saw: count first, then shape, colour, size and position per object."""
    head = _count(scene, "object", "objects") + " with "
    objs = sorted(scene, key=lambda o: o.cell)  # reading order: one canonical reference per scene ...
    first = head + " and ".join(o.words("a {shape} in {color} {size} at the {position}") for o in objs)
    # ... and a second one that lists the objects the other way round
    second = head + " and ".join(o.words("a {shape} in {color} {size} at the {position}") for o in reversed(objs))
    return [first] if len(objs) == 1 else [first, second]


CAPTION_STYLES = {"pretrain": _pretrain_captions, "downstream": _downstream_captions}


# --- Questions ------------------------------------------------------------------------------------------------

def _questions(scene: Scene, rng: random.Random, kinds: tuple[str, ...]) -> tuple[str, str, str]:
    """(question, answer, kind) about ``scene``, of one of ``kinds`` whose answer is unambiguous."""
    shapes = [o.shape for o in scene]
    options = []
    for o in scene:
        if "color" in kinds and shapes.count(o.shape) == 1:
            options.append((f"what color is the {o.shape}", o.color, "color"))
        if "shape" in kinds:
            options.append((f"what shape is on the {o.position}", o.shape, "shape"))
        if "size" in kinds:
            options.append((f"what size is the {o.color} {o.shape}", o.size, "size"))
        if "position" in kinds:
            options.append((f"where is the {o.color} {o.shape}", o.position, "position"))
    if "count" in kinds:
        options.append(("how many shapes are there", COUNTS[len(scene) - 1], "count"))
    if "exists" in kinds:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        present = any(o.shape == shape and o.color == color for o in scene)
        options.append((f"is there a {color} {shape}", "yes" if present else "no", "exists"))
    return rng.choice(options)


QUESTION_KINDS = {"broad": ("color", "shape", "size", "position", "count", "exists"), "narrow": ("color", "shape")}


# --- Scenes and images ----------------------------------------------------------------------------------------

def _scene(rng: random.Random, shapes, colors, max_objects: int) -> Scene:
    cells = rng.sample(sorted(POSITIONS), rng.randint(1, max_objects))
    return tuple(Obj(rng.choice(shapes), rng.choice(colors), rng.choice(list(SIZES)), cell) for cell in cells)


def _generalisation_scene(rng: random.Random) -> Scene:
    """A narrow-sized scene with at least one shape or colour outside the downstream training set."""
    while True:
        scene = _scene(rng, SHAPES, list(COLORS), MAX_OBJECTS["narrow"])
        if not is_narrow(scene):
            return scene


def is_narrow(scene: Scene) -> bool:
    """Whether every object of ``scene`` is of the downstream training set's shapes and colours."""
    return all(o.shape in NARROW_SHAPES and o.color in NARROW_COLORS for o in scene)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    for o in scene:
        cy, cx = 8 + 16 * o.cell[0] + rng.randint(-1, 1), 8 + 16 * o.cell[1] + rng.randint(-1, 1)
        r, color = SIZES[o.size], COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=color)
        else:  # bar: wide and flat
            draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=color)
    return img


# --- Splits ---------------------------------------------------------------------------------------------------

TASKS = ("pretrain", "downstream", "vqa")
KIND = {"pretrain": "caption", "downstream": "caption", "vqa": "vqa"}  # what a task's records are
EVAL_GROUPS = ("test", "gen", "ret")  # see the module docstring; "test" carries the plain metric names


def _distribution(task: str, group: str) -> tuple[str, str]:
    """(scene distribution, style) of a task's group: broad/narrow/gen and pretrain/downstream/vqa."""
    if group == "ret" or task == "pretrain":
        return "broad", "pretrain" if KIND[task] == "caption" else "vqa-broad"
    return ("gen" if group == "gen" else "narrow"), "downstream" if KIND[task] == "caption" else "vqa-narrow"


def _make(task: str, group: str, size: int, seed: int, split: str, first_id: int = 0) -> list[dict]:
    distribution, style = _distribution(task, group)
    # Distinct streams per split and group, so train and eval images never coincide by construction of the seed.
    rng = random.Random(f"{seed}-{task}-{split}-{group}")
    records = []
    for i in range(size):
        if distribution == "gen":
            scene = _generalisation_scene(rng)
        elif distribution == "narrow":
            scene = _scene(rng, NARROW_SHAPES, NARROW_COLORS, MAX_OBJECTS["narrow"])
        else:
            scene = _scene(rng, SHAPES, list(COLORS), MAX_OBJECTS["broad"])
        image_id = f"{split}-{i}" if group == "test" else f"{split}-{group}-{i}"
        record = {"image_id": image_id, "image": render(scene, rng), "scene": scene, "group": group}
        if style.startswith("vqa"):
            question, answer, kind = _questions(scene, rng, QUESTION_KINDS[style.split("-")[1]])
            record.update(question_id=first_id + i, question=question, prompt=VQA_PROMPT.format(question),
                          answers=[answer] * 10, target=answer, answer_type=kind, question_type=kind)
        else:
            refs = CAPTION_STYLES[style](scene)
            record.update(prompt=PROMPTS[style], captions=refs, target=rng.choice(refs))
        records.append(record)
    return records


def make_split(task: str, size: int, seed: int, split: str) -> list[dict]:
    """One split of ``task``: records {"image_id", "image" (PIL), "scene", "group", "prompt", "target"} plus
    "captions" (references) for captioning or "question_id", "question", "answers" for VQA. Training splits and
    ``split="eval"`` are the task's own distribution (the narrow one for downstream tasks)."""
    if task not in TASKS:
        raise ValueError(f"data.task: unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if size <= 0:
        raise ValueError(f"synthetic {split} split of size {size}: must be > 0")
    return _make(task, "test", size, seed, split)


def make_eval_suite(task: str, size: int, seed: int) -> list[dict]:
    """The evaluation records of a downstream task: ``size`` each of the test, generalisation and retention
    groups (``EVAL_GROUPS``), in that order; the pre-training task has only its own test group."""
    if task == "pretrain":
        return make_split(task, size, seed, "eval")
    records = []
    for g, group in enumerate(EVAL_GROUPS):
        records += _make(task, group, size, seed, "eval", first_id=g * size)
    return records


def pretraining_mixture(size: int, seed: int) -> list[dict]:
    """The backbone's pre-training data: broad captions (their prompt) and broad questions, half each."""
    captions = _make("pretrain", "test", size - size // 2, seed, "pretrain")
    questions = _make("vqa", "ret", size // 2, seed, "pretrain-vqa")
    return captions + questions


def vocabulary() -> list[str]:
    """Every word the world's captions, questions, answers and prompts use."""
    words = set(SHAPES) | set(COLORS) | set(SIZES) | POSITION_WORDS | set(COUNTS) | {"yes", "no"}
    text = " ".join([
        PRETRAIN_PROMPT, DOWNSTREAM_PROMPT, VQA_PROMPT.format(""),
        "a on the and there is are shape shapes that above below beside shows object objects with in at",
        "what color shape size where how many is there",
    ])
    return sorted(words | set(text.split()))


# --- Attribute accuracy ---------------------------------------------------------------------------------------

def wrong_attributes(text: str, scene: Scene) -> list[str]:
    """The shape, colour, size and position words of ``text`` that no object of ``scene`` has."""
    have = {"shape": {o.shape for o in scene}, "color": {o.color for o in scene}, "size": {o.size for o in scene},
            "position": {w for o in scene for w in o.position.split()}}
    vocab = {"shape": set(SHAPES), "color": set(COLORS), "size": set(SIZES), "position": POSITION_WORDS}
    return [w for w in text.split() for kind in have if w in vocab[kind] and w not in have[kind]]


def attribute_accuracy(texts: dict[str, str], scenes: dict[str, Scene]) -> float:
    """Share of ``texts`` (id -> caption) naming no shape, colour, size or position absent from its scene."""
    if not texts:
        raise ValueError("attribute accuracy of no captions")
    return sum(not wrong_attributes(t, scenes[k]) for k, t in texts.items()) / len(texts)

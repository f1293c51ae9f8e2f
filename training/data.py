"""Training batches from generated scenes: a pure function of (seed, step), so runs resume exactly.

Each image gets several prompts, present and absent ones, so the text has to condition the
answer: "red circle" must find the red circles and nothing else, "circle" every circle,
"blue triangle" on an image without one must find nothing. A share of the absent prompts are
everyday words outside the vocabulary ("person", "car"), so unknown prompts answer nothing too.
Pixels go through the runtime's own preprocessing and prompts through the bundle tokenizer,
so training sees exactly what the served model sees.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from engines.bundle import Preprocessing, TokenizerInfo
from engines.preprocess import to_pixel_values
from engines.tokenizer import PromptTokenizer
from engines.types import BOX_ONLY_TEXT  # "visual": what Meta's model is told for boxes alone
from scenes.generator import BASE_SHAPES, COLOURS, Scene, SceneOptions, generate_scene, vocabulary
from training.losses import PaddedTargets, Targets

# Everyday words a user may type: never drawn, so the model must answer nothing for them. The
# nouns are also what a known colour may be paired with ("blue hexagon").
UNKNOWN_NOUNS = (
    "person", "man", "woman", "child", "face", "hand", "dog", "cat", "bird", "horse", "car", "truck",
    "bus", "bicycle", "boat", "plane", "train", "tree", "flower", "grass", "house", "building", "road",
    "window", "door", "chair", "table", "bed", "cup", "bottle", "book", "phone", "laptop", "keyboard",
    "shoe", "hat", "ball", "box", "bag", "clock", "lamp", "sky", "cloud", "water", "rock", "sign",
    "apple", "banana", "pizza", "cake", "line", "text", "logo", "background", "shadow", "wall",
    "rectangle", "oval", "hexagon", "heart", "arrow", "cross", "diamond", "ring", "dot", "stripe",
)
DISTRACTORS = UNKNOWN_NOUNS + ("white", "black", "grey", "pink", "brown", "cyan")  # order kept: seeded draws
DISTRACTOR_SHARE = 0.2  # of absent prompts


@dataclass(frozen=True)
class DataOptions:
    image_size: int
    mask_size: int
    images_per_step: int = 8
    prompts_per_image: int = 4
    seed: int = 0
    shapes: tuple[str, ...] = BASE_SHAPES
    require_shape: str | None = None
    present_share: float = 0.5
    # Share of present prompts that also get one of their objects' boxes as a positive exemplar;
    # half of those drop the text ("visual": find everything of the boxed object's colour and shape).
    exemplar_share: float = 0.0
    # Share of absent prompts drawn from the image's near misses (see ``hard_negatives``): the
    # mistake the model makes is answering "blue circle" with a red circle, so show it that often.
    hard_negative_share: float = 0.0
    # Share of the distractor prompts that pair a known colour with an unknown word ("blue
    # hexagon", "red car"): whole unknown words alone never teach that a known colour is not
    # enough ("blue star", never trained on, gets answers).
    colour_distractor_share: float = 0.0
    # Share of present prompts that name a shape alone, the one with the most objects ("circle"
    # over four circles): shape-only prompts hold half the objects, yet a scene offers one shape
    # prompt beside several colour+shape ones, and recall falls with the objects a prompt names.
    shape_prompt_share: float = 0.0


@dataclass
class Batch:
    pixel_values: torch.Tensor  # [B, 3, S, S]
    image_index: torch.Tensor  # [N] long
    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] long
    targets: Targets
    prompts: list[str]
    # Exemplar boxes [N, 1, 4] normalised cxcywh and labels [N, 1] (1 positive, -10 none);
    # None when no prompt of the batch has one (the text path: the cached CLS token).
    exemplar_boxes: torch.Tensor | None = None
    exemplar_labels: torch.Tensor | None = None
    padded_targets: PaddedTargets | None = None  # ``targets`` padded (built in the worker)

    def to(self, device: str) -> Batch:
        """The tensors the step needs, on ``device`` (padded targets built here if missing)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        padded = self.padded_targets if self.padded_targets is not None else self.targets.padded()
        return Batch(pixel_values=self.pixel_values.to(device, non_blocking=True),
                     image_index=self.image_index.to(device, non_blocking=True),
                     input_ids=self.input_ids.to(device, non_blocking=True),
                     attention_mask=self.attention_mask.to(device, non_blocking=True),
                     targets=self.targets, prompts=self.prompts, exemplar_boxes=move(self.exemplar_boxes),
                     exemplar_labels=move(self.exemplar_labels), padded_targets=padded.to(device))


def training_tokenizer(directory: str | Path | None = None) -> PromptTokenizer:
    """The CLIP tokenizer every bundle ships (same ids as the runtime's)."""
    from export.tokenizer import write_tokenizer_json

    directory = Path(directory or tempfile.mkdtemp(prefix="sam3-train-tok-"))
    info = write_tokenizer_json(directory / "tokenizer.json")
    return PromptTokenizer(directory / "tokenizer.json", TokenizerInfo(**info))


def scene_seed(seed: int, step: int, index: int, images_per_step: int) -> int:
    """Training scenes live in [1e9, ...); held-out evaluation scenes use small seeds."""
    return 1_000_000_000 + seed * 100_000_000 + step * images_per_step + index


def hard_negatives(scene: Scene, shapes: Sequence[str]) -> list[str]:
    """Absent prompts one word away from an object in the scene, in vocabulary order.

    An object's shape in another colour ("blue circle" beside a red circle), its colour in
    another shape ("red square"), and the shapes the scene lacks ("circle" beside squares: the
    model read shape-only prompts as "any shape"). Each names something close to a real object.
    """
    present = {obj.category for obj in scene.objects} | {obj.shape for obj in scene.objects}
    near: set[str] = set()
    for obj in scene.objects:
        near.update(f"{colour} {obj.shape}" for colour in COLOURS)
        near.update(f"{obj.colour} {shape}" for shape in shapes)
        near.update(shapes)
    return [p for p in vocabulary(shapes) if p in near and p not in present]


def distractor(rng: np.random.Generator, shapes: Sequence[str], colour_share: float = 0.0) -> str:
    """An absent prompt outside the vocabulary; with ``colour_share``, a known colour + unknown word."""
    if colour_share and rng.random() < colour_share:  # no draw otherwise: earlier runs keep their batches
        nouns = [w for w in UNKNOWN_NOUNS if w not in shapes]
        return f"{rng.choice(list(COLOURS))} {rng.choice(nouns)}"
    return str(rng.choice(DISTRACTORS))


def sample_prompts(scene: Scene, rng: np.random.Generator, options: DataOptions) -> list[str]:
    """``options.prompts_per_image`` prompts for ``scene`` in the mix its shares ask for."""
    shapes = options.shapes
    vocab = vocabulary(shapes)
    present = sorted({obj.category for obj in scene.objects} | {obj.shape for obj in scene.objects})
    absent = [p for p in vocab if p not in present]
    hard = hard_negatives(scene, shapes) if options.hard_negative_share else []
    rng.shuffle(present)
    rng.shuffle(absent)
    if hard:  # no draw otherwise: runs without hard negatives keep their batches
        rng.shuffle(hard)
    per_shape = Counter(obj.shape for obj in scene.objects)

    def next_present() -> str:
        # no draw without the option: earlier runs keep their batches
        if options.shape_prompt_share and rng.random() < options.shape_prompt_share:
            shape_only = [p for p in present if p in per_shape]
            if shape_only:
                prompt = max(shape_only, key=per_shape.__getitem__)
                present.remove(prompt)
                return prompt
        return present.pop()

    chosen: list[str] = []
    for _ in range(options.prompts_per_image):
        if present and (rng.random() < options.present_share or not absent):
            chosen.append(next_present())
        elif hard and rng.random() < options.hard_negative_share:
            prompt = hard.pop()
            absent.remove(prompt)
            chosen.append(prompt)
        elif rng.random() < DISTRACTOR_SHARE:
            chosen.append(distractor(rng, shapes, options.colour_distractor_share))
        elif absent:
            prompt = absent.pop()
            if prompt in hard:
                hard.remove(prompt)
            chosen.append(prompt)
        else:
            chosen.append(distractor(rng, shapes, options.colour_distractor_share))
    return chosen


def make_batch(options: DataOptions, step: int, tokenizer: PromptTokenizer) -> Batch:
    rng = np.random.default_rng([options.seed, step])
    scene_options = SceneOptions(shapes=options.shapes, require_shape=options.require_shape)
    prep = Preprocessing(image_size=options.image_size)
    pixels, image_index, prompts, boxes, masks = [], [], [], [], []
    exemplars: list[tuple[float, float, float, float] | None] = []
    for i in range(options.images_per_step):
        scene = generate_scene(scene_seed(options.seed, step, i, options.images_per_step), scene_options)
        pixels.append(to_pixel_values(scene.image, prep)[0])
        height, width = scene.size
        scale = np.asarray([width, height, width, height], dtype=np.float32)
        small = [cv2.resize(obj.mask.astype(np.float32), (options.mask_size, options.mask_size),
                            interpolation=cv2.INTER_AREA) for obj in scene.objects]
        for prompt in sample_prompts(scene, rng, options):
            hits = scene.matching(prompt)
            exemplar = None
            if options.exemplar_share and hits and rng.random() < options.exemplar_share:
                chosen = scene.objects[hits[int(rng.integers(len(hits)))]]
                x0, y0, x1, y1 = np.asarray(chosen.box, dtype=np.float64) / scale
                exemplar = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
                if rng.random() < 0.5:  # boxes alone: the boxed object's colour and shape
                    prompt = BOX_ONLY_TEXT
                    hits = scene.matching(chosen.category)
            exemplars.append(exemplar)
            prompts.append(prompt)
            image_index.append(i)
            boxes.append(torch.from_numpy(np.asarray([np.asarray(scene.objects[k].box) / scale for k in hits],
                                                     dtype=np.float32).reshape(-1, 4)))
            masks.append(torch.from_numpy(np.asarray([small[k] for k in hits], dtype=np.float32).reshape(
                -1, options.mask_size, options.mask_size)))
    ids, attention = tokenizer.encode(prompts)
    exemplar_boxes = exemplar_labels = None
    if any(e is not None for e in exemplars):
        exemplar_boxes = torch.tensor([[e if e is not None else (0.5, 0.5, 1.0, 1.0)] for e in exemplars],
                                      dtype=torch.float32)
        exemplar_labels = torch.tensor([[1 if e is not None else -10] for e in exemplars], dtype=torch.long)
    return Batch(
        pixel_values=torch.from_numpy(np.stack(pixels)),
        image_index=torch.tensor(image_index, dtype=torch.long),
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(attention).long(),
        targets=Targets(boxes=boxes, masks=masks),
        prompts=prompts,
        exemplar_boxes=exemplar_boxes,
        exemplar_labels=exemplar_labels,
    )


class BatchStream(torch.utils.data.IterableDataset):
    """Batches for steps [start, stop), built in DataLoader workers while the model trains.

    With W workers, worker w builds steps start + w, start + w + W, ...; the DataLoader takes
    one batch from each worker in turn, so the steps still arrive in order.
    """

    def __init__(self, options: DataOptions, start: int, stop: int, tokenizer_dir: str) -> None:
        self.options, self.start, self.stop, self.tokenizer_dir = options, start, stop, tokenizer_dir

    def __iter__(self) -> Iterator[Batch]:
        tokenizer = PromptTokenizer(Path(self.tokenizer_dir) / "tokenizer.json",
                                    _tokenizer_info(Path(self.tokenizer_dir)))
        worker = torch.utils.data.get_worker_info()
        first, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for step in range(self.start + first, self.stop, stride):
            batch = make_batch(self.options, step, tokenizer)
            batch.padded_targets = batch.targets.padded()
            yield batch


def _tokenizer_info(directory: Path) -> TokenizerInfo:
    from export.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, PAD_ID

    return TokenizerInfo(file="tokenizer.json", sha256="", context_length=CONTEXT_LENGTH, pad_id=PAD_ID,
                         bos_id=BOS_ID, eos_id=EOS_ID)


__all__ = ["Batch", "BatchStream", "DataOptions", "DISTRACTORS", "make_batch", "training_tokenizer", "COLOURS"]

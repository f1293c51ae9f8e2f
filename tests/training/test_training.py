"""Training code on the tiny model: the forward is the exported semantics, the objective can
learn, runs resume exactly, and both adapter formats merge to the same weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from export.split import reference_forward
from tests.conftest import SHAPES_MODEL
from training.data import DISTRACTORS, DataOptions, make_batch, training_tokenizer
from training.forward import forward_train
from training.losses import LossWeights, Targets, detection_loss, hungarian_match
from training.trainer import TrainConfig, train

TINY = DataOptions(image_size=112, mask_size=32, images_per_step=2, prompts_per_image=3, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return training_tokenizer(tmp_path_factory.mktemp("tok"))


def _fresh(seed: int = 0):
    from tests.conftest import make_tiny_model

    return make_tiny_model(seed=seed)


def test_forward_last_layer_equals_the_exported_reference(tokenizer) -> None:
    model = _fresh()
    batch = make_batch(TINY, 0, tokenizer)
    with torch.no_grad():
        out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask)
        first = batch.image_index == 0
        ref = reference_forward(model, batch.pixel_values[:1], batch.input_ids[first], batch.attention_mask[first])
    assert out.logits.shape[0] == model.config.detr_decoder_config.num_layers
    torch.testing.assert_close(out.logits[-1][first], ref["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[-1][first], ref["pred_boxes"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.masks[first], ref["pred_masks"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.presence[-1][first], ref["presence_logits"], atol=1e-5, rtol=0)


def test_forward_with_exemplar_boxes_equals_the_reference_per_prompt(tokenizer) -> None:
    """Prompts with a box go through the geometry encoder as the exemplar graphs do; prompts
    without one in the same batch still get the CLS token alone (the text path)."""
    model = _fresh()
    batch = make_batch(dataclasses.replace(TINY, prompts_per_image=4, exemplar_share=1.0), 1, tokenizer)
    assert batch.exemplar_boxes is not None and batch.exemplar_labels is not None
    assert (batch.exemplar_labels == 1).any() and (batch.exemplar_labels == -10).any()
    with torch.no_grad():
        out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask,
                            batch.exemplar_boxes, batch.exemplar_labels)
        for row in range(len(batch.prompts)):
            image = int(batch.image_index[row])
            has_box = int(batch.exemplar_labels[row, 0]) == 1
            boxes = (batch.exemplar_boxes[row:row + 1], batch.exemplar_labels[row:row + 1]) if has_box else ()
            ref = reference_forward(model, batch.pixel_values[image:image + 1], batch.input_ids[row:row + 1],
                                    batch.attention_mask[row:row + 1], *boxes)
            torch.testing.assert_close(out.logits[-1][row:row + 1], ref["pred_logits"], atol=1e-4, rtol=0)
            torch.testing.assert_close(out.boxes[-1][row:row + 1], ref["pred_boxes"], atol=1e-4, rtol=0)


def test_exemplar_prompts_box_one_of_their_objects_and_visual_finds_the_boxed_kind(tokenizer) -> None:
    from scenes.generator import SceneOptions, generate_scene
    from training.data import scene_seed

    options = dataclasses.replace(TINY, images_per_step=6, prompts_per_image=4, exemplar_share=1.0)
    batch = make_batch(options, 5, tokenizer)
    assert batch.exemplar_boxes is not None and batch.exemplar_labels is not None
    assert "visual" in batch.prompts
    for row, prompt in enumerate(batch.prompts):
        boxes = batch.targets.boxes[row]
        if int(batch.exemplar_labels[row, 0]) != 1:
            continue
        cx, cy, w, h = batch.exemplar_boxes[row, 0].tolist()
        exemplar = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        # the exemplar is one of the prompt's own ground-truth objects
        assert (boxes - exemplar).abs().amax(-1).min() < 1e-5, prompt
        if prompt == "visual":  # boxes alone: every object of the boxed object's colour and shape
            image = int(batch.image_index[row])
            scene = generate_scene(scene_seed(options.seed, 5, image, options.images_per_step), SceneOptions())
            height, width = scene.size
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            (boxed,) = [o for o in scene.objects if (torch.tensor(o.box) / scale - exemplar).abs().max() < 1e-5]
            assert boxes.shape[0] == sum(o.category == boxed.category for o in scene.objects)


def test_batches_are_deterministic_and_hold_present_and_absent_prompts(tokenizer) -> None:
    options = dataclasses.replace(TINY, images_per_step=6, prompts_per_image=4)
    a, b = make_batch(options, 7, tokenizer), make_batch(options, 7, tokenizer)
    assert a.prompts == b.prompts and torch.equal(a.pixel_values, b.pixel_values)
    assert a.prompts != make_batch(options, 8, tokenizer).prompts
    present = [len(boxes) > 0 for boxes in a.targets.boxes]
    assert any(present) and not all(present)
    for prompt, boxes, masks in zip(a.prompts, a.targets.boxes, a.targets.masks):
        assert boxes.shape[0] == masks.shape[0]
        if prompt in DISTRACTORS:
            assert boxes.shape[0] == 0
        assert "star" not in prompt
        if boxes.shape[0]:
            assert float(boxes.min()) >= 0 and float(boxes.max()) <= 1
            assert float(masks.max()) > 0.5


def test_matching_pairs_exact_predictions_and_their_loss_is_small() -> None:
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]])
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.8], [0.2, 0.2, 0.3, 0.3], [0.1, 0.1, 0.3, 0.4]]])
    logits = torch.zeros(1, 4)
    (rows, cols), = hungarian_match(logits, boxes[0:1], Targets(boxes=[gt], masks=[]), LossWeights())
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}


def test_one_to_many_matching_gives_each_object_its_copies_and_the_nearest_queries() -> None:
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]])
    near_first = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.11, 0.1, 0.3, 0.4], [0.1, 0.12, 0.3, 0.4]])
    near_second = torch.tensor([[0.5, 0.5, 0.9, 0.8], [0.51, 0.5, 0.9, 0.8], [0.5, 0.52, 0.9, 0.8]])
    boxes = torch.cat([near_first, near_second, torch.tensor([[0.0, 0.0, 1.0, 1.0]])])[None]
    (rows, cols), = hungarian_match(torch.zeros(1, 7), boxes, Targets(boxes=[gt], masks=[]), LossWeights(), copies=3)
    pairs = dict(zip(rows.tolist(), cols.tolist()))
    assert pairs == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    # Fewer queries than copies x objects: every object still gets the same number of queries.
    (rows, cols), = hungarian_match(torch.zeros(1, 5), boxes[:, :5], Targets(boxes=[gt], masks=[]), LossWeights(), copies=3)
    assert sorted(cols.tolist()) == [0, 0, 1, 1]


def test_the_objective_learns_one_batch(tokenizer) -> None:
    torch.manual_seed(0)
    model = _fresh(seed=1).train()
    batch = make_batch(TINY, 0, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask)
        loss = detection_loss(out, batch.targets)
        optimizer.zero_grad()
        loss["total"].backward()
        optimizer.step()
        losses.append(float(loss["total"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_resumes_exactly(tmp_path, monkeypatch) -> None:
    import training.trainer as trainer

    config = TrainConfig(steps=4, lr=1e-3, warmup=1, checkpoint_every=2, log_every=1, threads=1)
    straight = _fresh(seed=2)
    train(straight, straight.parameters(), config, TINY, tmp_path / "straight", resume=False)

    save = trainer.save_state

    def save_then_die(path, model, optimizer, scheduler, step, *args):
        save(path, model, optimizer, scheduler, step, *args)
        if step == 2:
            raise KeyboardInterrupt  # the run is killed right after its first checkpoint

    interrupted = _fresh(seed=2)
    monkeypatch.setattr(trainer, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, interrupted.parameters(), config, TINY, tmp_path / "resumed", resume=False)
    monkeypatch.setattr(trainer, "save_state", save)
    with pytest.raises(SystemExit, match="other settings"):  # another schedule is not a resume
        other = _fresh(seed=2)
        train(other, other.parameters(), dataclasses.replace(config, lr=2e-3), TINY, tmp_path / "resumed",
              resume=True)
    resumed = _fresh(seed=5)  # different init: everything must come from the saved state
    train(resumed, resumed.parameters(), config, TINY, tmp_path / "resumed", resume=True)

    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_peft_directory_and_sam3_lora_pt_merge_to_the_same_weights(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    from export.part_weights import weights_sha256
    from export.lora import LoraOptions, merge_adapters
    from training.lora import META_FILE, META_YAML, PEFT_DIR, lora_targets, write_adapter

    model = _fresh(seed=4)
    targets = lora_targets(model)
    assert any(".self_attn.q_proj" in t for t in targets) and any("mlp.fc1" in t for t in targets)
    assert not any(t.startswith(("vision_encoder", "text_encoder", "geometry_encoder")) for t in targets)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # PEFT starts B at zero: give the adapter a real update
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    write_adapter(tmp_path, peft_model, model, rank=4, alpha=8)

    merged = {}
    for fmt, path, options in (
        ("peft", tmp_path / PEFT_DIR, LoraOptions()),
        ("meta", tmp_path / META_FILE, LoraOptions(config=str(tmp_path / META_YAML))),
    ):
        merged_model, info = merge_adapters(_fresh(seed=4), [str(path)], options, checkpoint_format="hf")
        merged[fmt] = merged_model
    base = _fresh(seed=4)
    for part, module in (("decoder", "detr_decoder"), ("encoder", "detr_encoder"), ("mask", "mask_decoder")):
        a = weights_sha256(getattr(merged["peft"], module))
        assert a == weights_sha256(getattr(merged["meta"], module)), f"{part}: formats disagree"
        assert a != weights_sha256(getattr(base, module)), f"{part}: the adapter changed nothing"
    assert weights_sha256(merged["meta"].vision_encoder) == weights_sha256(base.vision_encoder)


def test_exemplar_fine_tune_rewrites_the_model_in_place_and_says_so_in_its_card(tiny_hf_checkpoint, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file

    from training.__main__ import main
    from training.base import MODEL_CARD

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_hf_checkpoint, model_dir)
    (model_dir / MODEL_CARD).write_text(json.dumps({"name": "tiny", "vocabulary": ["red circle"]}))
    before = load_file(model_dir / "model.safetensors")
    assert main(["exemplars", "--base", str(model_dir), "--steps", "2", "--exemplar-share", "1.0"]) == 0
    after = load_file(model_dir / "model.safetensors")
    card = json.loads((model_dir / MODEL_CARD).read_text())
    assert card["name"] == "tiny" and card["exemplar_boxes"] is True
    (stage,) = card["exemplar_fine_tunes"]
    assert stage["data"]["exemplar_share"] == 1.0 and stage["loss"]["aux_copies"] == 3
    assert (model_dir / "train_log_exemplars.jsonl").is_file()
    geometry = [k for k in before if "geometry_encoder" in k and "layers" in k]
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in geometry)  # boxes were learnt
    text = [k for k in before if k.startswith("text_encoder.")]
    assert all(torch.equal(before[k].half(), after[k]) for k in text)  # the text side stays frozen
    # a second stage on the same model is added to the card; the first stage's log stays
    assert main(["exemplars", "--base", str(model_dir), "--steps", "2", "--lr", "3e-4", "--aux-copies", "1",
                 "--hard-negatives", "0.7", "--presence-gated-cls", "--presence-weight", "8"]) == 0
    card = json.loads((model_dir / MODEL_CARD).read_text())
    first, second = card["exemplar_fine_tunes"]
    assert first == stage and second["train_config"]["lr"] == 3e-4 and second["loss"]["aux_copies"] == 1
    assert second["loss"]["presence_gated_cls"] is True and second["loss"]["presence"] == 8.0
    assert second["data"]["hard_negative_share"] == 0.7 and second["device"]["name"] == "cpu"
    for flag in ("--lr 0.0003", "--aux-copies 1", "--hard-negatives 0.7", "--presence-gated-cls", "--presence-weight 8"):
        assert flag in second["command"], (flag, second["command"])
    assert (model_dir / "train_log_exemplars.jsonl").is_file() and (model_dir / "train_log_exemplars_2.jsonl").is_file()


def test_exemplar_cli_defaults_are_the_stage_recipe_defaults() -> None:
    """The CLI states its defaults as literals (so --help needs no torch); they must be the recipe's."""
    from training.__main__ import build_parser, exemplar_stage
    from training.base import ExemplarStage

    assert exemplar_stage(build_parser().parse_args(["exemplars"])) == ExemplarStage()


def test_shipped_stage_commands_rebuild_from_their_recipe() -> None:
    """Each stage command in the demo model's card, parsed by the CLI, renders back to itself:
    the card says exactly how to reproduce the stage (the first two used an older form)."""
    from training.__main__ import build_parser, exemplar_stage
    from training.base import MODEL_CARD

    stages = json.loads((SHAPES_MODEL / MODEL_CARD).read_text())["exemplar_fine_tunes"]
    assert len(stages) >= 8
    for stage in stages[2:]:
        args = build_parser().parse_args(stage["command"].split()[3:])
        base = Path(args.base)
        assert exemplar_stage(args).command(base, Path(args.out or base)) == stage["command"]


def test_stage_command_names_its_output_and_device_only_when_they_differ() -> None:
    from training.base import ExemplarStage
    from training.trainer import Device

    stage = ExemplarStage(steps=10, shape_prompt_share=0.7, presence_weight=8.0)
    in_place = stage.command(Path("models/shapes"), Path("models/shapes"))
    assert "--out" not in in_place and "--device" not in in_place
    assert in_place.endswith("--presence-weight 8 --shape-prompts 0.7")
    elsewhere = stage.command(Path("models/shapes"), Path("runs/k1"), Device(name="cuda"))
    assert "--out runs/k1" in elsewhere and elsewhere.endswith("--device cuda")


def _per_prompt_reference_loss(out, targets: Targets, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The objective written the plain way, prompt by prompt and layer by layer (what the
    batched ``detection_loss`` replaced): the two must agree term by term."""
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    from training.losses import dice_loss

    layers = out.logits.shape[0]
    num_objects = max(sum(int(b.shape[0]) for b in targets.boxes), 1)
    present = torch.tensor([float(b.shape[0] > 0) for b in targets.boxes])
    terms = {k: torch.zeros(()) for k in ("cls", "l1", "giou", "presence", "mask_bce", "dice")}
    for layer in range(layers):
        logits, boxes = out.logits[layer], out.boxes[layer]
        copies = 1 if layer == layers - 1 else weights.aux_copies
        cls_target = torch.zeros_like(logits)
        pairs = []
        for n, gt in enumerate(targets.boxes):
            if gt.shape[0] == 0:
                continue
            cost = (-weights.cls * logits[n].sigmoid()[:, None] + weights.l1 * torch.cdist(boxes[n], gt, p=1)
                    - weights.giou * generalized_box_iou(boxes[n], gt))
            repeat = max(1, min(copies, logits.shape[1] // gt.shape[0]))
            rows, cols = linear_sum_assignment(cost.detach().repeat(1, repeat).numpy())
            cls_target[n, rows] = 1.0
            pairs += [(n, int(r), int(c) % gt.shape[0]) for r, c in zip(rows, cols)]
        terms["cls"] += F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum") / num_objects
        pred = torch.stack([boxes[n, r] for n, r, _ in pairs])
        gt = torch.stack([targets.boxes[n][c] for n, _, c in pairs])
        terms["l1"] += F.l1_loss(pred, gt, reduction="sum") / num_objects
        terms["giou"] += (1 - torch.diag(generalized_box_iou(pred, gt))).sum() / num_objects
        terms["presence"] += F.binary_cross_entropy_with_logits(out.presence[layer].reshape(-1), present)
    pred = torch.stack([out.masks[n, r] for n, r, _ in pairs])
    gt = torch.stack([targets.masks[n][c] for n, _, c in pairs])
    terms["mask_bce"] = F.binary_cross_entropy_with_logits(pred, gt, reduction="none").flatten(1).mean(1).sum() / num_objects
    terms["dice"] = dice_loss(pred, gt).sum() / num_objects
    for key in ("cls", "l1", "giou", "presence"):
        terms[key] = terms[key] / layers
    return terms


@pytest.mark.parametrize("aux_copies", [1, 3])
def test_batched_objective_equals_the_per_prompt_reference(tokenizer, aux_copies) -> None:
    model = _fresh(seed=6)
    batch = make_batch(dataclasses.replace(TINY, images_per_step=3, prompts_per_image=4), 2, tokenizer)
    assert any(len(b) > 1 for b in batch.targets.boxes) and any(len(b) == 0 for b in batch.targets.boxes)
    with torch.no_grad():
        out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask)
    weights = LossWeights(aux_copies=aux_copies)
    batched = detection_loss(out, batch.targets, weights)
    for key, value in _per_prompt_reference_loss(out, batch.targets, weights).items():
        torch.testing.assert_close(batched[key], value, atol=1e-5, rtol=1e-5, msg=key)
    # padded targets (what the trainer moves to a device) give the same numbers
    torch.testing.assert_close(detection_loss(out, batch.targets.padded(), weights)["total"], batched["total"])


def test_hard_negatives_are_absent_prompts_one_word_from_an_object() -> None:
    import numpy as np

    from scenes.generator import BASE_SHAPES, generate_scene
    from training.data import hard_negatives, sample_prompts, scene_seed

    for index in range(20):
        scene = generate_scene(scene_seed(0, 0, index, 20))
        present = {o.category for o in scene.objects} | {o.shape for o in scene.objects}
        hard = hard_negatives(scene, BASE_SHAPES)
        assert hard and not set(hard) & present
        for prompt in hard:
            words = prompt.split()
            assert len(words) == 1 or any(o.colour == words[0] or o.shape == words[1] for o in scene.objects)
        # drawn as absent prompts, never twice, never a present one
        mix = dataclasses.replace(TINY, prompts_per_image=8, present_share=0.3, hard_negative_share=1.0)
        chosen = sample_prompts(scene, np.random.default_rng(index), mix)
        assert len(set(chosen)) == len(chosen)
        assert set(chosen) - present <= set(hard)


def test_colour_distractors_pair_a_known_colour_with_an_unknown_word() -> None:
    """Opt-in: with a share of 0 the prompts are drawn exactly as before (earlier stages reproduce);
    with 1 every unknown-word prompt is "<known colour> <unknown word>", never a vocabulary prompt."""
    import numpy as np

    from scenes.generator import BASE_SHAPES, COLOURS, generate_scene, vocabulary
    from training.data import DISTRACTORS, UNKNOWN_NOUNS, sample_prompts, scene_seed

    vocab = set(vocabulary(BASE_SHAPES))
    paired = []
    for index in range(30):
        scene = generate_scene(scene_seed(0, 0, index, 30))
        mix = dataclasses.replace(TINY, prompts_per_image=8, present_share=0.3, hard_negative_share=0.5)
        plain = sample_prompts(scene, np.random.default_rng(index), mix)
        assert plain == sample_prompts(scene, np.random.default_rng(index),
                                       dataclasses.replace(mix, colour_distractor_share=0.0))
        coloured = sample_prompts(scene, np.random.default_rng(index),
                                  dataclasses.replace(mix, colour_distractor_share=1.0))
        assert not set(coloured) & set(DISTRACTORS)
        paired += [p for p in coloured if p not in vocab]
    assert len(paired) >= 5
    for prompt in paired:
        colour, noun = prompt.split(" ", 1)
        assert colour in COLOURS and noun in UNKNOWN_NOUNS and noun not in BASE_SHAPES


def test_shape_prompts_favour_the_shape_with_the_most_objects() -> None:
    """Opt-in: with a share of 0 the prompts are drawn exactly as before; with 1 every present
    prompt names a shape alone while one is left, the most populous shape first."""
    from collections import Counter

    import numpy as np

    from scenes.generator import generate_scene
    from training.data import sample_prompts, scene_seed

    shape_only = {"plain": 0, "favoured": 0}
    for index in range(30):
        scene = generate_scene(scene_seed(0, 0, index, 30))
        per_shape = Counter(obj.shape for obj in scene.objects)
        present = per_shape.keys() | {obj.category for obj in scene.objects}

        def draw(**share: float) -> list[str]:
            mix = dataclasses.replace(TINY, prompts_per_image=8, present_share=0.4, hard_negative_share=0.5, **share)
            return sample_prompts(scene, np.random.default_rng(index), mix)

        plain = draw()
        assert plain == draw(shape_prompt_share=0.0)
        favoured = draw(shape_prompt_share=1.0)
        assert len(set(favoured)) == len(favoured)
        picked = [p for p in favoured if p in present]
        counts = [per_shape[p] for p in picked[:len(per_shape)]]
        assert all(counts) and counts == sorted(counts, reverse=True) and counts[0] == max(per_shape.values())
        shape_only["plain"] += sum(p in per_shape for p in plain)
        shape_only["favoured"] += sum(p in per_shape for p in favoured)
    assert shape_only["favoured"] > shape_only["plain"]


def test_several_workers_deliver_the_steps_in_order(tmp_path) -> None:
    from training.data import BatchStream

    tokenizer_dir = tmp_path / "tok"
    training_tokenizer(tokenizer_dir)
    loader = torch.utils.data.DataLoader(BatchStream(TINY, 3, 8, str(tokenizer_dir)), batch_size=None, num_workers=2)
    got = [batch.prompts for batch in loader]
    tokenizer = training_tokenizer(tmp_path / "tok2")
    assert got == [make_batch(TINY, step, tokenizer).prompts for step in range(3, 8)]


def test_cuda_device_without_cuda_is_a_one_line_error() -> None:
    from training.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["base", "--out", "unused", "--steps", "1", "--device", "cuda"])


def test_presence_gated_classification_leaves_absent_prompts_to_the_presence_token(tokenizer) -> None:
    model = _fresh(seed=6)
    batch = make_batch(dataclasses.replace(TINY, images_per_step=3, prompts_per_image=4), 2, tokenizer)
    with torch.no_grad():
        out = forward_train(model, batch.pixel_values, batch.image_index, batch.input_ids, batch.attention_mask)
    out.logits.requires_grad_(True)
    out.presence.requires_grad_(True)
    gated = detection_loss(out, batch.targets, LossWeights(presence_gated_cls=True))
    plain = detection_loss(out, batch.targets, LossWeights())
    assert float(gated["cls"]) < float(plain["cls"])
    for key in ("l1", "giou", "presence", "mask_bce", "dice"):
        torch.testing.assert_close(gated[key], plain[key], msg=key)
    logits_grad, presence_grad = torch.autograd.grad(gated["total"], (out.logits, out.presence))
    absent = torch.tensor([len(b) == 0 for b in batch.targets.boxes])
    assert absent.any() and (~absent).any()
    assert float(logits_grad[:, absent].abs().max()) == 0.0  # absent prompts: no query is told anything
    assert float(logits_grad[:, ~absent].abs().max()) > 0.0
    assert float(presence_grad[:, absent].abs().max()) > 0.0  # ... but the presence token is


def test_speed_command_reports_steps_per_second(capsys) -> None:
    from training.__main__ import main

    assert main(["speed", "--steps", "1", "--warmup", "0", "--images", "1", "--prompts", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps_per_s"] > 0 and result["device"] == "cpu" and result["prompts_per_image"] == 2
    assert result["forward_ms"] > 0 and result["backward_step_ms"] > 0

"""Merge LoRA adapters into a ``Sam3Model`` before export: W' = W + scale * (B @ A).

Why merge: the Jetson engines must stay the size and speed of the base model, so the low-rank
updates are folded into the weights and the exported graphs are plain SAM3 graphs.

Accepted adapters (detected from the file, never from its name):

``peft``
    A PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) for
    transformers' ``Sam3Model``. PEFT itself loads and merges it (``PeftModel.from_pretrained``
    + ``merge_and_unload``), so ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``,
    ``use_rslora``, ``fan_in_fan_out`` mean exactly what they meant in training. Because PEFT
    loads with ``strict=False``, every key of the file is checked afterwards to have landed.
``meta-lora``
    SAM3-LoRA / Meta-pipeline ``.pt``: ``<module>.lora.lora_A`` [in, r] and ``lora_B`` [r, out]
    (dW = (A @ B)^T * alpha / r) on Meta's module names. Modules that were
    ``nn.MultiheadAttention`` appear split as ``q_proj``/``k_proj``/``v_proj``/``out_proj``:
    their updates land on row blocks [0:E], [E:2E], [2E:3E] of the fused ``in_proj_weight``
    (the ViT's fused ``qkv.weight`` likewise). Merged in Meta key space: base ->
    ``hf_to_meta_state_dict`` -> add -> ``meta_to_hf_state_dict`` -> strict load.
``peft-state-dict``
    ``{"lora_state_dict": {...}}`` (optionally with ``lora_config``/``rank``/``alpha``) in PEFT
    orientation: A [r, in], B [out, r], dW = B @ A * alpha / r; on transformers' or Meta's names.

A full fine-tuned state dict with LoRA-wrapped layers (``<module>.original_layer.*`` +
``<module>.lora.lora_A/B``) is a checkpoint, not an adapter: :func:`unwrap_lora_state_dict`
turns it into a plain one for the checkpoint loader.

Rank and alpha: the rank is read from A's shape and checked against a declared rank; alpha is
not stored in SAM3-LoRA files and comes from the file (``lora_config``), ``--lora-alpha``, or a
training YAML (``--lora-config``: ``lora.rank/alpha`` or ``lora.r/lora_alpha``), in that order.
Unknown alpha is an error, never a default. Every adapter key must land on exactly one base
weight; any other outcome is a :class:`LoraError` naming the key.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engines.bundle import sha256_file
from export.keymap import hf_to_meta_state_dict, meta_to_hf_state_dict
from export.part_weights import PARTS, part_modules, part_weights_sha256

if TYPE_CHECKING:
    from transformers import Sam3Model

_log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FORMAT_PEFT = "peft"
FORMAT_META = "meta-lora"
FORMAT_PEFT_SD = "peft-state-dict"

# prefixes a training wrapper may add in front of the model's own names
_STRIP_PREFIXES = ("module.", "base_model.model.", "detector.")
# <module>[.lora].lora_A|B[.<adapter name>][.weight]
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<wrap>lora\.)?lora_(?P<ab>[AB])"
    r"(?:\.(?P<adapter>(?!weight$)[^.]+))?(?P<w>\.weight)?$"
)
_WRAPPED = re.compile(r"^(?P<module>.+)\.original_layer\.(?P<param>[^.]+)$")
_WRAPPED_LORA = re.compile(r"^(?P<module>.+)\.lora\.lora_(?P<ab>[AB])$")
_SPLIT_LEAVES = ("q_proj", "k_proj", "v_proj")
_FUSED_NAMES = ("in_proj_weight", "qkv.weight")  # nn.MultiheadAttention, Meta's ViT attention


class LoraError(Exception):
    """A user-facing, one-line reason why an adapter cannot be merged (names the key/shape)."""


@dataclass
class LoraOptions:
    """What the CLI knows about adapters that do not store their hyper-parameters."""

    rank: int | None = None
    alpha: float | None = None
    config: str | None = None  # training YAML/JSON holding lora.rank / lora.alpha


@dataclass(frozen=True)
class Hyper:
    """Rank/alpha/rslora with where each came from (recorded in the manifest)."""

    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    def over(self, other: Hyper) -> Hyper:
        """Values set here win; missing ones come from ``other``."""
        sources = {**other.sources, **self.sources}
        return Hyper(
            rank=self.rank if self.rank is not None else other.rank,
            alpha=self.alpha if self.alpha is not None else other.alpha,
            rslora=self.rslora or other.rslora,
            sources=sources,
        )


@dataclass
class LowRankPair:
    """One module's update, normalised to PEFT orientation: A [r, in], B [out, r]."""

    module: str
    key_a: str
    key_b: str
    a: Tensor
    b: Tensor
    file_shapes: tuple[tuple[int, ...], tuple[int, ...]]  # (A, B) as stored, for messages

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, scale: float) -> Tensor:
        """dW [out, in] in float64 (cast to the weight's dtype when added)."""
        return (self.b.double() @ self.a.double()) * scale


@dataclass(frozen=True)
class Target:
    """Where a pair lands: a weight key, optionally a row block of a fused q/k/v weight."""

    key: str
    rows: tuple[int, int] | None = None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def merge_adapters(
    model: Sam3Model, adapters: list[str], options: LoraOptions, checkpoint_format: str
) -> tuple[Sam3Model, list[dict[str, Any]]]:
    """Merge ``adapters`` (in order) into ``model``; returns it and one manifest dict per adapter.

    The model is modified in place (PEFT merges in place too; a copy of a full-size SAM3 would
    double the peak RAM). ``checkpoint_format`` of the base decides which key namespace an
    ambiguous error message is phrased in (Meta names for Meta checkpoints).
    """
    if not adapters:
        return model, []
    base_hashes = {part: part_weights_sha256(model, part) for part in PARTS}
    config_hyper = read_lora_config(options.config) if options.config else Hyper()
    infos = []
    for adapter in adapters:
        path = Path(adapter)
        model, info = _merge_one(model, path, options, config_hyper, checkpoint_format)
        info["base_weights_sha256"] = dict(base_hashes)
        infos.append(info)
        _log.info(
            "merged %s (%s): %d weights in %s",
            path.name,
            info["format"],
            info["merged_weights"],
            ", ".join(info["parts"]),
        )
    model.eval()
    return model, infos


def detect_format(path: str | Path) -> str:
    """``peft`` | ``meta-lora`` | ``peft-state-dict`` (from the content); LoraError otherwise."""
    path = Path(path)
    if _is_peft_directory(path):
        return FORMAT_PEFT
    return _classify(_read_adapter_file(path), path.name)[0]


def has_lora_wrappers(state_dict: Mapping[str, Any]) -> bool:
    """True for a full state dict saved with SAM3-LoRA's ``LoRALinear`` wrappers still in place."""
    return any(_WRAPPED.match(k) for k in state_dict) and any(_WRAPPED_LORA.match(k) for k in state_dict)


def unwrap_lora_state_dict(
    state_dict: Mapping[str, Tensor], options: LoraOptions | None = None
) -> dict[str, Tensor]:
    """Fold ``<m>.lora.lora_A/B`` into ``<m>.original_layer.weight`` and drop the wrappers.

    For full fine-tuned checkpoints saved with the LoRA layers still wrapped (SAM3-LoRA's
    ``LoRALinear``: A [in, r], B [r, out], dW = (A @ B)^T * alpha / r). The result is a
    plain state dict (``<m>.weight``, ``<m>.bias``) that the checkpoint loader maps as usual.
    Alpha is not in the file: it comes from ``options`` (``--lora-alpha`` or ``--lora-config``).
    """
    options = options or LoraOptions()
    wrapped: dict[str, dict[str, Tensor]] = {}
    loras: dict[str, dict[str, tuple[str, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if m := _WRAPPED.match(key):
            wrapped.setdefault(m["module"], {})[m["param"]] = value
        elif m := _WRAPPED_LORA.match(key):
            loras.setdefault(m["module"], {})[m["ab"]] = (key, value)
        elif "lora_" in key or ".original_layer" in key:
            raise LoraError(
                f"checkpoint key {key} looks like LoRA but is neither original_layer.* nor lora.lora_A/B"
            )
        else:
            out[key] = value
    hyper = _cli_hyper(options).over(read_lora_config(options.config) if options.config else Hyper())
    for module, params in wrapped.items():
        if module not in loras:
            raise LoraError(f"checkpoint key {module}.original_layer.* has no {module}.lora.lora_A/B")
        for param, value in params.items():
            if f"{module}.{param}" in out:
                raise LoraError(f"checkpoint has both {module}.{param} and {module}.original_layer.{param}")
            out[f"{module}.{param}"] = value
    for module, ab in loras.items():
        if module not in wrapped:
            raise LoraError(f"checkpoint key {ab[next(iter(ab))][0]} has no {module}.original_layer.weight")
        pair = _make_pair(module, ab, meta_orientation=True)
        scale = _scale(pair, hyper, "the full checkpoint")
        key = f"{module}.weight"
        out[key] = _add_delta(out[key], None, pair, scale, pair.key_a)
    return out


def read_lora_config(path: str | Path) -> Hyper:
    """Rank/alpha from a training YAML (SAM3-LoRA: ``lora: {rank, alpha}``) or PEFT JSON.

    Accepts ``lora.rank``/``lora.alpha``, ``lora.r``/``lora.lora_alpha``, the same at top level
    (an ``adapter_config.json``), or a ``lora``/``lora_config`` section nested deeper (Hydra).
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LoraError(f"cannot read LoRA config {path.name}: {str(exc).splitlines()[0]}") from exc
    section = _find_lora_section(data)
    if section is None:
        raise LoraError(
            f"LoRA config {path.name} has no lora section with rank/alpha (lora: {{rank: 8, alpha: 16}})"
        )
    return _hyper_from_mapping(section, f"--lora-config {path.name}")


# ----------------------------------------------------------------------------------------------
# One adapter
# ----------------------------------------------------------------------------------------------
def _merge_one(
    model, path: Path, options: LoraOptions, config_hyper: Hyper, checkpoint_format: str
) -> tuple[Sam3Model, dict[str, Any]]:
    if _is_peft_directory(path):
        return _merge_peft(model, path)
    fmt, state_dict, embedded = _classify(_read_adapter_file(path), path.name)
    # the file's own hyper-parameters, then the CLI flags, then the training YAML
    hyper = embedded.over(_cli_hyper(options)).over(config_hyper)
    pairs = _pairs(state_dict, meta_orientation=(fmt == FORMAT_META), name=path.name)
    prefer_meta = fmt == FORMAT_META or checkpoint_format.startswith("meta")
    space, hf_keys = _merge_pairs(model, pairs, hyper, prefer_meta, path.name)
    info = _info(
        path,
        fmt,
        sha256_file(path),
        hyper,
        ranks=sorted({p.rank for p in pairs}),
        parts=_parts_of_hf_keys(model, hf_keys),
        modules=[p.module for p in pairs],
        namespace=space,
    )
    return model, info


def _is_peft_directory(path: Path) -> bool:
    """True for a directory with adapter_config.json; a missing path or bare directory is an error."""
    if not path.exists():
        raise LoraError(f"LoRA adapter not found: {path}")
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file():
            raise LoraError(f"{path.name} is a directory without {PEFT_CONFIG}: not a PEFT adapter")
        return True
    return False


def _merge_peft(model, path: Path) -> tuple[Sam3Model, dict[str, Any]]:
    """PEFT does the work; this checks that every key of the file really landed."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise LoraError(f"{path.name}: PEFT adapter without {' or '.join(PEFT_WEIGHTS)}")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:
        raise LoraError(f"{path.name}/{PEFT_CONFIG} is not a valid PEFT config: {_first_line(exc)}") from exc
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise LoraError(f"{path.name}: PEFT adapter type {getattr(config, 'peft_type', None)} is not LORA")
    try:
        file_sd = load_peft_weights(str(path), device="cpu")
    except Exception as exc:
        raise LoraError(f"cannot read {path.name}/{weights.name}: {_first_line(exc)}") from exc
    _check_peft_modules(model, file_sd, path.name)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as exc:
        reason = _first_line(exc)
        raise LoraError(f"{path.name}: PEFT could not apply the adapter to Sam3Model: {reason}") from exc
    _check_peft_landed(file_sd, get_peft_model_state_dict(peft_model), path.name)
    modules = sorted({_LORA_KEY.match(_strip(k))["module"] for k in file_sd if _LORA_KEY.match(_strip(k))})
    merged_model = _merge_peft_exactly(peft_model)
    hyper = Hyper(
        rank=int(config.r),
        alpha=float(config.lora_alpha),
        rslora=bool(config.use_rslora),
        sources={"rank": PEFT_CONFIG, "alpha": PEFT_CONFIG},
    )
    info = _info(
        path,
        FORMAT_PEFT,
        sha256_file(weights),
        hyper,
        ranks=[int(config.r)],
        parts=_parts_of_hf_keys(merged_model, modules),
        modules=modules,
        namespace="hf",
    )
    targets = config.target_modules
    info.update(
        target_modules=sorted(targets) if isinstance(targets, (set, list)) else targets,
        fan_in_fan_out=bool(config.fan_in_fan_out),
    )
    return merged_model, info


def _merge_peft_exactly(peft_model) -> Sam3Model:
    """``merge_and_unload`` with PEFT's own scaling, the sum rounded once from float64.

    PEFT merges in the weight's dtype (dW rounded, then W + dW rounded again); the SAM3-LoRA
    path adds a float64 dW and rounds once. Rounding both the same way makes one adapter saved
    in either format give bit-identical weights, hence the same weight hashes (shared engines
    and caches). Layers other than Linear LoRA are merged by PEFT itself.
    """
    import torch.nn as nn
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in list(module.active_adapters):
                exact = (isinstance(module, LoraLinear) and adapter in module.lora_A
                         and not module.use_dora.get(adapter, False)
                         and isinstance(module.get_base_layer(), nn.Linear))
                if not exact:
                    module.merge(adapter_names=[adapter])
                    continue
                a = module.lora_A[adapter].weight.double()
                b = module.lora_B[adapter].weight.double()
                delta = (b @ a) * float(module.scaling[adapter])
                if module.fan_in_fan_out:
                    delta = delta.T
                weight = module.get_base_layer().weight
                weight.copy_((weight.double() + delta).to(weight.dtype))
    return peft_model.unload()


def _check_peft_modules(model, file_sd: Mapping[str, Tensor], name: str) -> None:
    """Fail early, naming the key, when an adapter key's module is not in Sam3Model."""
    modules = dict(model.named_modules())
    for key in file_sd:
        m = _LORA_KEY.match(_strip(key))
        if m is None:
            continue  # modules_to_save & co: checked by _check_peft_landed
        if m["module"] not in modules:
            raise LoraError(
                f"{name}: adapter key {key} matches no Sam3Model module ({m['module']!r}): "
                "an adapter for another architecture?"
            )


def _check_peft_landed(file_sd: Mapping[str, Tensor], loaded: Mapping[str, Tensor], name: str) -> None:
    """PEFT loads with strict=False: compare the file's keys and values with what it holds."""
    unmatched = sorted(set(file_sd) - set(loaded))
    if unmatched:
        raise LoraError(
            f"{name}: {len(unmatched)} adapter key(s) matched nothing (not in target_modules?): "
            f"{_short(unmatched)}"
        )
    missing = sorted(set(loaded) - set(file_sd))
    if missing:
        raise LoraError(f"{name}: adapter_config targets modules the weights file lacks: {_short(missing)}")
    for key, value in file_sd.items():
        if not torch.equal(value.to(loaded[key].dtype).cpu(), loaded[key].detach().cpu()):
            raise LoraError(f"{name}: adapter key {key} did not load its value")


# ----------------------------------------------------------------------------------------------
# State-dict adapters (meta-lora, peft-state-dict)
# ----------------------------------------------------------------------------------------------
def _read_adapter_file(path: Path) -> Any:
    """A ``.safetensors`` or torch pickle (weights_only): nothing executes from the file."""
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise LoraError(f"{path.name} is empty or truncated ({len(head)} bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise LoraError(f"cannot read {path.name} as safetensors: {_first_line(exc)}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoraError(f"cannot read {path.name} as a PyTorch file: {_first_line(exc)}") from exc


def _classify(obj: Any, name: str) -> tuple[str, dict[str, Tensor], Hyper]:
    """(format, LoRA state dict, hyper-parameters stored in the file)."""
    if not isinstance(obj, dict):
        raise LoraError(f"{name} holds a {type(obj).__name__}, not a LoRA state dict")
    if "lora_state_dict" in obj:
        sd = obj["lora_state_dict"]
        _check_tensors(sd, name)
        return FORMAT_PEFT_SD, sd, _embedded_hyper(obj, name)
    sd = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            sd = obj[wrapper]
    _check_tensors(sd, name)
    if has_lora_wrappers(sd):
        raise LoraError(
            f"{name} is a full fine-tuned checkpoint with LoRA-wrapped layers "
            "(original_layer + lora): pass it as --checkpoint, not --lora"
        )
    matches = [_LORA_KEY.match(_strip(k)) for k in sd]
    if not sd or not any(matches):
        raise LoraError(
            f"{name}: unknown adapter format (no lora_A/lora_B keys; first keys: {_short(list(sd), 3)})"
        )
    peft_named = [m for m in matches if m and m["w"] and not m["wrap"]]
    fmt = FORMAT_PEFT_SD if peft_named and len(peft_named) == sum(1 for m in matches if m) else FORMAT_META
    return fmt, sd, Hyper()


def _check_tensors(sd: Any, name: str) -> None:
    if not isinstance(sd, dict) or not sd:
        raise LoraError(f"{name}: the LoRA state dict is empty or not a dict")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise LoraError(f"{name}: non-tensor entries in the LoRA state dict: {_short(bad)}")


def _embedded_hyper(obj: dict, name: str) -> Hyper:
    for section in ("lora_config", "config"):
        if isinstance(obj.get(section), dict):
            return _hyper_from_mapping(obj[section], name)
    return _hyper_from_mapping(obj, name)


def _pairs(sd: Mapping[str, Tensor], meta_orientation: bool, name: str) -> list[LowRankPair]:
    """Group keys into (A, B) per module; any key that is not an A or B is an error."""
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    adapters: set[str] = set()
    for key, value in sd.items():
        m = _LORA_KEY.match(_strip(key))
        if m is None:
            raise LoraError(f"{name}: key {key} is not a LoRA lora_A/lora_B weight")
        if m["adapter"]:
            adapters.add(m["adapter"])
        slot = groups.setdefault(m["module"], {})
        if m["ab"] in slot:
            raise LoraError(f"{name}: keys {slot[m['ab']][0]} and {key} are the same lora_{m['ab']}")
        slot[m["ab"]] = (key, value)
    if len(adapters) > 1:
        names = ", ".join(sorted(adapters))
        raise LoraError(f"{name} holds several PEFT adapters ({names}): save one per file")
    return [_make_pair(module, ab, meta_orientation) for module, ab in groups.items()]


def _make_pair(module: str, ab: Mapping[str, tuple[str, Tensor]], meta_orientation: bool) -> LowRankPair:
    """Check shapes are a consistent A/B pair and normalise to A [r, in], B [out, r]."""
    if set(ab) != {"A", "B"}:
        key = ab[next(iter(ab))][0]
        raise LoraError(f"adapter key {key} has no matching lora_{'B' if 'A' in ab else 'A'}")
    (key_a, a), (key_b, b) = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2:
        raise LoraError(f"adapter keys {key_a} {tuple(a.shape)} / {key_b} {tuple(b.shape)} are not matrices")
    if meta_orientation:  # A [in, r], B [r, out]
        ok, a, b = a.shape[1] == b.shape[0], a.t(), b.t()
    else:  # A [r, in], B [out, r]
        ok = a.shape[0] == b.shape[1]
    if not ok:
        shape_a, shape_b = tuple(ab["A"][1].shape), tuple(ab["B"][1].shape)
        raise LoraError(f"adapter keys {key_a} {shape_a} and {key_b} {shape_b} disagree on the rank")
    shapes = (tuple(ab["A"][1].shape), tuple(ab["B"][1].shape))
    return LowRankPair(module, key_a, key_b, a.float(), b.float(), shapes)


def _scale(pair: LowRankPair, hyper: Hyper, name: str) -> float:
    if hyper.rank is not None and pair.rank != hyper.rank:
        declared = f"{hyper.rank} ({hyper.sources.get('rank', '?')})"
        raise LoraError(
            f"{name}: adapter key {pair.key_a} has shape {pair.file_shapes[0]} "
            f"(rank {pair.rank}) but the rank is {declared}"
        )
    if hyper.alpha is None:
        raise LoraError(
            f"{name}: LoRA alpha unknown (not stored in this file): pass --lora-alpha, or "
            "--lora-config with the training YAML (lora: {rank, alpha})"
        )
    return hyper.alpha / (math.sqrt(pair.rank) if hyper.rslora else pair.rank)


def _merge_pairs(
    model, pairs: list[LowRankPair], hyper: Hyper, prefer_meta: bool, name: str
) -> tuple[str, list[str]]:
    """Resolve every pair in one key space (transformers' or Meta's), add, strict-load."""
    hf_sd = model.state_dict()
    spaces = {"hf": hf_sd}
    hf_targets = [_resolve(p.module, hf_sd) for p in pairs]
    if all(hf_targets):
        space, targets = "hf", hf_targets
    else:
        spaces["meta"] = hf_to_meta_state_dict(hf_sd, model.config)
        meta_targets = [_resolve(p.module, spaces["meta"]) for p in pairs]
        if all(meta_targets):
            space, targets = "meta", meta_targets
        else:
            # name the miss in the space the adapter fits best (ties: the base checkpoint's)
            n_meta, n_hf = sum(map(bool, meta_targets)), sum(map(bool, hf_targets))
            use = meta_targets if n_meta > n_hf or (n_meta == n_hf and prefer_meta) else hf_targets
            miss = next(p for p, t in zip(pairs, use) if t is None)
            raise LoraError(
                f"{name}: adapter key {miss.key_a} matches no weight of the base model "
                f"(module {miss.module!r})"
            )
    seen: dict[tuple[str, tuple[int, int] | None], str] = {}
    sd = dict(spaces[space])
    for pair, target in zip(pairs, targets):
        slot = (target.key, target.rows)
        if slot in seen:
            raise LoraError(
                f"{name}: adapter keys {seen[slot]} and {pair.key_a} land on the same weight {target.key}"
            )
        seen[slot] = pair.key_a
        sd[target.key] = _add_delta(sd[target.key], target.rows, pair, _scale(pair, hyper, name), pair.key_a)
    if space == "meta":
        sd = meta_to_hf_state_dict(sd, model.config)
    model.load_state_dict(sd, strict=True)
    return space, [_hf_key(t, spaces, space) for t in targets]


def _resolve(module: str, sd: Mapping[str, Tensor]) -> Target | None:
    """``<module>.weight``, or a row block of the parent's fused q/k/v weight."""
    if f"{module}.weight" in sd:
        return Target(f"{module}.weight")
    parent, _, leaf = module.rpartition(".")
    if leaf in _SPLIT_LEAVES:
        for fused in _FUSED_NAMES:
            key = f"{parent}.{fused}"
            if key in sd and sd[key].shape[0] % 3 == 0:
                size = sd[key].shape[0] // 3
                i = _SPLIT_LEAVES.index(leaf)
                return Target(key, (i * size, (i + 1) * size))
    return None


def _add_delta(
    weight: Tensor, rows: tuple[int, int] | None, pair: LowRankPair, scale: float, key: str
) -> Tensor:
    """A new tensor (the state dict may share storage with the live model)."""
    block = weight if rows is None else weight[rows[0] : rows[1]]
    delta = pair.delta(scale)
    if tuple(delta.shape) != tuple(block.shape):
        where = "" if rows is None else f" rows {rows[0]}:{rows[1]}"
        raise LoraError(
            f"adapter key {key} {pair.file_shapes[0]}: update shape {tuple(delta.shape)} "
            f"does not fit the base weight{where} {tuple(block.shape)}"
        )
    out = weight.detach().clone()
    target = out if rows is None else out[rows[0] : rows[1]]
    # one rounding from float64, as the PEFT path does: the same adapter in either format
    # gives bit-identical weights
    target.copy_((target.double() + delta).to(out.dtype))
    return out


def _hf_key(target: Target, spaces: dict[str, dict[str, Tensor]], space: str) -> str:
    """The transformers key a target corresponds to (for the per-part report)."""
    if space == "hf":
        return target.key
    keys = list(meta_to_hf_state_dict({target.key: spaces["meta"][target.key]}))
    if target.rows is not None and len(keys) == 3:
        size = spaces["meta"][target.key].shape[0] // 3
        return sorted(keys, key=lambda k: "qkv".index(k.rsplit(".", 2)[-2][0]))[target.rows[0] // size]
    return keys[0]


# ----------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------
def _cli_hyper(options: LoraOptions) -> Hyper:
    sources = {}
    if options.rank is not None:
        sources["rank"] = "--lora-rank"
    if options.alpha is not None:
        sources["alpha"] = "--lora-alpha"
    return Hyper(rank=options.rank, alpha=options.alpha, sources=sources)


def _find_lora_section(data: Any, depth: int = 0) -> Mapping[str, Any] | None:
    if not isinstance(data, Mapping) or depth > 6:
        return None
    for key in ("lora", "lora_config"):
        if isinstance(data.get(key), Mapping) and _has_hyper(data[key]):
            return data[key]
    if _has_hyper(data):
        return data
    for value in data.values():
        found = _find_lora_section(value, depth + 1)
        if found is not None:
            return found
    return None


def _has_hyper(section: Mapping[str, Any]) -> bool:
    return any(k in section for k in ("rank", "r", "alpha", "lora_alpha"))


def _hyper_from_mapping(section: Mapping[str, Any], source: str) -> Hyper:
    rank = section.get("rank", section.get("r", section.get("lora_rank")))
    alpha = section.get("alpha", section.get("lora_alpha"))
    try:
        rank = int(rank) if rank is not None else None
        alpha = float(alpha) if alpha is not None else None
    except (TypeError, ValueError) as exc:
        raise LoraError(f"{source}: rank/alpha are not numbers (rank={rank!r}, alpha={alpha!r})") from exc
    if rank is not None and rank <= 0:
        raise LoraError(f"{source}: rank must be positive, got {rank}")
    sources = {k: source for k, v in (("rank", rank), ("alpha", alpha)) if v is not None}
    return Hyper(rank=rank, alpha=alpha, rslora=bool(section.get("use_rslora", False)), sources=sources)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _part_prefixes(model) -> dict[str, tuple[str, ...]]:
    return {part: tuple(f"{name}." for name in part_modules(model, part)) for part in PARTS}


def _parts_of_hf_keys(model, keys: list[str]) -> list[str]:
    """Parts whose weights (as build.py hashes them) contain any of ``keys``."""
    prefixes = _part_prefixes(model)
    return [part for part in PARTS if any(k.startswith(prefixes[part]) for k in keys)]


def _info(
    path: Path,
    fmt: str,
    sha256: str,
    hyper: Hyper,
    *,
    ranks: list[int],
    parts: list[str],
    modules: list[str],
    namespace: str,
) -> dict[str, Any]:
    """The manifest's ``source.loras`` entry (``base_weights_sha256`` is added by the caller)."""
    rank: int | list[int] | None = hyper.rank
    if rank is None:
        rank = ranks[0] if len(ranks) == 1 else ranks
    return {
        "name": path.stem if path.is_file() else path.name,
        "path": path.name,
        "sha256": sha256,
        "format": fmt,
        "rank": rank,
        "alpha": hyper.alpha,
        "use_rslora": hyper.rslora,
        "hyperparameter_sources": dict(hyper.sources),
        "parts": parts,
        "merged_weights": len(modules),
        "namespace": namespace,
        "modules": modules,
    }


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _short(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


__all__ = [
    "LoraError",
    "LoraOptions",
    "detect_format",
    "has_lora_wrappers",
    "merge_adapters",
    "read_lora_config",
    "unwrap_lora_state_dict",
]

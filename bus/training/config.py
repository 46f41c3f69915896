"""The resolved configuration of one ``python -m bus.train`` run: :class:`TrainConfig`, the
argument parser and the defaults < YAML < flags resolution."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["ConfigError", "TrainConfig", "TRAJECTORY_KEYS", "available_presets", "build_parser", "parse_config",
           "preset_config"]


class ConfigError(ValueError):
    """A setting that cannot work (found while parsing or while setting the run up)."""


# --size values that are not BUSConfig classmethods: "base" is the plain BUSConfig().
_BUILTIN_PRESETS = ("base",)


def available_presets() -> List[str]:
    """Names ``--preset`` accepts: ``base`` (``BUSConfig()``) and every public ``BUSConfig``
    classmethod callable without arguments (``tiny``, and ``paper`` / ``paper_tiny`` where the
    model defines them), sorted."""
    from ..model import BUSConfig

    names = set(_BUILTIN_PRESETS)
    for name, attr in vars(BUSConfig).items():
        if name.startswith("_") or not isinstance(attr, classmethod):
            continue
        params = inspect.signature(getattr(BUSConfig, name)).parameters.values()
        # A preset takes only optional overrides; a classmethod needing an argument (a
        # from_dict-style constructor) is not one.
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            names.add(name)
    return sorted(names)


def preset_config(name: str):
    """``BUSConfig.<name>()`` (``base``: ``BUSConfig()``); :class:`ConfigError` listing the
    available presets for any other name."""
    from ..model import BUSConfig

    options = available_presets()
    if name not in options:
        raise ConfigError(f"--preset {name!r}: no such BUSConfig preset; available: {', '.join(options)}")
    if name in _BUILTIN_PRESETS and not hasattr(BUSConfig, name):
        return BUSConfig()
    cfg = getattr(BUSConfig, name)()
    if not isinstance(cfg, BUSConfig):
        raise ConfigError(f"--preset {name!r}: BUSConfig.{name}() returned {type(cfg).__name__}, not a BUSConfig")
    return cfg


@dataclass
class TrainConfig:
    """Everything one training run is a function of (the resolved CLI / YAML configuration)."""

    # model
    model: str = "bus"  # bus | baseline
    size: str = "tiny"  # tiny -> BUSConfig.tiny(), base -> BUSConfig(); --preset takes precedence
    preset: Optional[str] = None  # NAME -> BUSConfig.NAME() (base -> BUSConfig())
    img_size: Optional[int] = None
    keep: Optional[float] = None
    mass: Optional[float] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "synthetic"  # synthetic | folder
    train_samples: int = 2048
    val_samples: int = 256
    data_seed: int = 0
    max_objects: int = 4
    root: Optional[str] = None
    captions: Optional[str] = None
    val_captions: Optional[str] = None
    val_fraction: float = 0.05
    tokenizer_vocab: int = 1000
    num_workers: int = 0
    # optimisation
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: Optional[int] = None  # None: 5% of steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    guidance: Optional[str] = None
    itc_text_free: Optional[float] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    # evaluation / logging / checkpoints
    eval_every: int = 500
    eval_batch_size: int = 128
    itm_rerank: int = 0
    viz_samples: int = 4
    ckpt_every: int = 500
    log_every: int = 1
    out: str = "runs/bus"
    resume: Optional[str] = None  # PATH | auto
    stop_after: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    @property
    def preset_name(self) -> str:
        """The BUSConfig preset this run starts from: ``--preset``, else ``--size``."""
        return self.preset if self.preset is not None else self.size

    def validate(self) -> None:
        """Raise :class:`ConfigError` with a readable message for any inconsistent setting."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(options)}, got {getattr(self, name)!r}")

        choice("model", ("bus", "baseline"))
        choice("size", ("tiny", "base"))
        choice("data", ("synthetic", "folder"))
        choice("precision", ("fp32", "bf16", "fp16"))
        choice("device", ("auto", "cpu", "cuda"))
        positive = ("batch_size", "steps", "train_samples", "val_samples", "eval_batch_size", "log_every",
                    "tokenizer_vocab")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "ckpt_every", "itm_rerank", "viz_samples", "num_workers", "seed", "data_seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be >= 2 (ITC/ITM need in-batch negatives)")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.itc_text_free is not None and self.itc_text_free < 0:
            raise ConfigError(f"--itc-text-free must be >= 0, got {self.itc_text_free}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("--weight-decay and --grad-clip must be >= 0 and --min-lr-ratio in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ConfigError(f"--keep must be in (0, 1], got {self.keep}")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ConfigError(f"--mass must be in (0, 1], got {self.mass}")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"--img-size must be positive, got {self.img_size}")
        if self.data == "folder" and (not self.root or not self.captions):
            raise ConfigError("--data folder needs --root DIR and --captions FILE")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigError(f"--stop-after must be positive, got {self.stop_after}")
        if not isinstance(self.model_args, dict):
            raise ConfigError("model_args must be a mapping of BUSConfig fields")
        self.model_config(1)  # unknown --preset or --model-arg keys fail here, before any work

    def model_config(self, vocab_size: int):
        """The :class:`bus.model.BUSConfig` this run trains: the preset (``--preset``, else
        ``--size``), then ``--model-arg`` overrides, then the dedicated flags."""
        from ..model import BUSConfig

        base = preset_config(self.preset_name)
        fields = {f.name for f in dataclasses.fields(BUSConfig)}
        over: Dict[str, Any] = {}
        for k, v in self.model_args.items():
            if k not in fields:
                raise ConfigError(f"--model-arg {k}: not a BUSConfig field (one of {sorted(fields)})")
            # Dict fields (vit_kwargs) merge into the preset so one key can be changed alone.
            over[k] = {**getattr(base, k), **v} if isinstance(getattr(base, k), dict) and isinstance(v, dict) else v
        flags = {"img_size": self.img_size, "keep": self.keep, "mass": self.mass, "guidance": self.guidance,
                 "itc_text_free": self.itc_text_free}
        over.update({k: v for k, v in flags.items() if v is not None})
        over["vocab_size"] = vocab_size
        return dataclasses.replace(base, **over)


# Keys whose change between a checkpoint and its resume would make the continued run differ
# from the uninterrupted one; a mismatch is reported (not refused: it may be intended).
TRAJECTORY_KEYS = ("model", "size", "preset", "img_size", "keep", "mass", "model_args", "data", "train_samples",
                   "data_seed", "root", "captions", "batch_size", "steps", "lr", "weight_decay",
                   "warmup_steps", "min_lr_ratio", "grad_clip", "precision", "seed")

_DESCRIPTION = "Training CLI for bus.model.BUSModel and its baseline: python -m bus.train."


def build_parser(description: str = _DESCRIPTION) -> argparse.ArgumentParser:
    """The ``python -m bus.train`` argument parser. Every default is ``SUPPRESS`` so that only
    flags actually given override the YAML config and the :class:`TrainConfig` defaults."""
    p = argparse.ArgumentParser(prog="python -m bus.train", description=description,
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["bus", "baseline"], help="BUS (TSPS + PAD) or the unpruned baseline")
    g.add_argument("--size", choices=["tiny", "base"], help="BUSConfig.tiny() or BUSConfig() (default tiny)")
    g.add_argument("--preset", metavar="NAME",
                   help="start from BUSConfig.NAME() (base = BUSConfig(); e.g. tiny, paper, paper_tiny "
                        "where defined); replaces --size")
    g.add_argument("--img-size", type=int, help="image side in pixels (model and data)")
    g.add_argument("--keep", type=float, help="TSPS keep ratio per pruning layer")
    g.add_argument("--mass", type=float, help="TSPS relevance mass (per-sample counts, varlen)")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", dest="model_arg",
                   help="override a BUSConfig field (VALUE parsed as YAML), repeatable")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["synthetic", "folder"], help="built-in captioned shapes or an image folder")
    g.add_argument("--train-samples", type=int, help="synthetic training set size")
    g.add_argument("--val-samples", type=int, help="synthetic held-out set size")
    g.add_argument("--data-seed", type=int, help="seed of the synthetic data set's content")
    g.add_argument("--max-objects", type=int, help="most objects per synthetic image (default 4)")
    g.add_argument("--root", help="image folder (--data folder)")
    g.add_argument("--captions", help="COCO-style captions JSON (--data folder)")
    g.add_argument("--val-captions", help="held-out captions JSON; default: --val-fraction of the images")
    g.add_argument("--val-fraction", type=float, help="share of folder images held out (default 0.05)")
    g.add_argument("--tokenizer-vocab", type=int, help="WordPiece vocabulary bound for folder data")
    g.add_argument("--num-workers", type=int, help="data loader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch size (split over DDP ranks)")
    g.add_argument("--steps", type=int, help="total optimizer steps")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay (default 5%%)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip (0 = off)")
    g.add_argument("--guidance", choices=["image", "text"],
                   help="what guides TSPS in training (BUSConfig.guidance, default image: one ViT "
                        "pass, the image [CLS]; text: each caption guides its own image)")
    g.add_argument("--itc-text-free", type=float, metavar="W",
                   help="guidance=text: weight of the ITC loss on the text-free (CLS-guided) image "
                        "embedding that retrieval evaluation uses (BUSConfig.itc_text_free, default 1)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="torch.autocast dtype")
    g.add_argument("--seed", type=int, help="seed of init, data order, dropout and ITM negatives")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--itm-rerank", type=int, metavar="K", help="re-rank the top-K images per caption with ITM")
    g.add_argument("--viz-samples", type=int, help="images in the relevance picture (0 = none)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0 = only last.pt at the end)")
    g.add_argument("--log-every", type=int, help="write train metrics every N steps")
    g.add_argument("--out", help="output directory")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' (or no value) = OUT/last.pt if present")
    g.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop (with a checkpoint) after this global step; the schedule still targets --steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-progress", action="store_false", dest="progress", help="no tqdm bar")
    return p


def _parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)  # safe_load: a value never constructs Python objects
        except yaml.YAMLError as e:
            raise ConfigError(f"--model-arg {item!r}: VALUE is not plain YAML ({e})") from e
    return out


def _load_yaml_config(path: str, known: set) -> Dict[str, Any]:
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        try:
            # safe_load: a user's config file never runs code (no !!python/object tags).
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not plain YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError("the config file must hold a mapping of option: value")
    values = {}
    for k, v in loaded.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise ConfigError(f"config file: unknown option {k!r}")
        values[key] = v
    return values


def parse_config(argv: Optional[Sequence[str]] = None, *, description: str = _DESCRIPTION) -> TrainConfig:
    """Resolve defaults < YAML (``--config``) < flags into a validated :class:`TrainConfig`.
    Invalid input exits with status 2 and a ``python -m bus.train: error: ...`` message."""
    parser = build_parser(description)
    ns = vars(parser.parse_args(argv))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        values = _load_yaml_config(ns.pop("config"), known) if "config" in ns else {}
        for level in (values, ns):
            if level.get("preset") is not None and "size" in level:
                raise ConfigError("--preset and --size both name the model's size: give one of them")
        if "size" in ns:  # a --size flag overrides a YAML preset, as any flag overrides the file
            values.pop("preset", None)
        model_arg = ns.pop("model_arg", None)
        values.update(ns)
        if model_arg:
            values["model_args"] = {**values.get("model_args", {}), **_parse_model_args(model_arg)}
        cfg = TrainConfig(**values)
        cfg.validate()
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    return cfg

"""The validated configuration tree of a run, saved as YAML with every run and checkpoint."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from twinvae.data.cho_k1 import REFERENCE_PREFIX, resolve_reference
from twinvae.data.modality import MODALITY_PATTERN
from twinvae.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Sizes and variants of the Twin-VAE."""

    base_channels: int = Field(32, ge=1, description="channels of the first outer conv layer")
    latent_dim: int = Field(256, ge=1, description="size of mu / logvar / z")
    regressor_hidden: tuple[int, ...] = Field((256, 128), description="hidden regressor widths")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    leaky_slope: float = Field(0.2, ge=0.0)
    regressor_input: Literal["latent", "shared_decoder"] = Field(
        "latent", description="feed the regressor mu, or the shared decoder output (paper variant)"
    )
    init: Literal["default", "orthogonal"] = "default"
    standardize_input: bool = Field(
        False,
        description="give the encoders each image at zero mean and unit variance (the decoders "
        "still reconstruct the raw image); bright-field images, bright with faint cells, do not "
        "train without it",
    )


class PseudoLabelConfig(_Strict):
    """Temporal pseudo-labels: an unlabelled training frame between two labelled frames of its
    chamber gets the count interpolated linearly in time between them."""

    max_gap: int = Field(
        25, ge=2, description="largest distance in frames between the two labelled frames"
    )
    weight: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="loss weight of a pseudo-label beside a labelled frame; it falls linearly "
        "with the distance to the nearer labelled frame, to weight / 2 midway (real labels: 1)",
    )


class DataConfig(_Strict):
    """Where the natural and synthetic images come from and how validation is cut."""

    natural: str | None = Field(
        None,
        description="natural images: a CHO-K1 modality folder (with train.csv), a CSV file, "
        "a generic folder (images + counts.csv), or None for natural-looking generated images; "
        f"'{REFERENCE_PREFIX}pc' is the pc folder of the CHO-K1 data set (--data-root or "
        "$TWINVAE_CHO_K1), replaced by its path when the config is loaded",
    )
    modality: str = Field(
        "pc",
        pattern=MODALITY_PATTERN,
        description="bf, pc, other, or a name of your own (e.g. dic, fluorescence); for a "
        "modality other than bf and pc the synthetic twin uses the generator settings of "
        "synthetic_generator.modality, else of the one (bf or pc) whose rendering is closest to "
        "the natural images in mean grey level and contrast (twinvae.data.modality)",
    )
    natural_split: Literal["train", "test"] = "train"
    generated_natural_count: int = Field(
        600, ge=10, description="images generated in the natural style when `natural` is None"
    )
    generated_natural_labelled: int = Field(
        120, ge=1, description="how many of the generated natural images keep their label"
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="labelled share for validation")
    split_by: Literal["chamber", "file"] = Field(
        "chamber",
        description="cut validation by chamber (xy position) or, for other names, by file",
    )
    split_seed: int = 0
    skip_bad: bool = False
    resize: bool = False
    cache_dir: str | None = None
    natural_only: bool = Field(False, description="train without the synthetic twin")
    synthetic: str | None = Field(
        None, description="folder of synthetic images + counts.csv; None = generate on the fly"
    )
    synthetic_generator: dict[str, Any] = Field(
        default_factory=dict, description="overrides for the synthetic generator (SynthConfig)"
    )
    synthetic_background: str = Field(
        "natural-mean",
        description="background of generated synthetic images: 'natural-mean' (per-pixel mean "
        "of natural training images with < 5 cells; flat when there are none), 'flat', or a path",
    )
    synthetic_ratio: float = Field(
        1.0, ge=0.25, le=10.0, description="synthetic images per natural image in each step"
    )
    labelled_fraction: float | None = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="share of labelled images in every natural batch (None = as sampled)",
    )
    label_budget: int | None = Field(
        None,
        ge=1,
        description="keep only this many labelled natural images, drawn with split_seed (the "
        "others stay as unlabelled images), before validation is cut; None = all labels",
    )
    label_chambers: int | list[str] | None = Field(
        None,
        description="with label_budget: take the labelled images from this many chambers "
        "(drawn with split_seed among those with enough labels) or from the chambers listed "
        "(e.g. [nd063_crop/xy01, nd063_crop/xy09]), shared out evenly among them",
    )
    max_count: int = Field(30, ge=1)
    pseudo_labels: PseudoLabelConfig | None = Field(
        None,
        description="temporal pseudo-labels for unlabelled training frames (training chambers "
        "only, never validation or test); None = off",
    )
    chamber_background: Literal["off", "subtract", "divide"] = Field(
        "off",
        description="per-chamber normalisation: subtract (or divide by) the chamber's background, "
        "the per-pixel median over all its frames, keeping the background's mean grey level; "
        "a bundle trained so expects images normalised the same way",
    )
    balance_counts: bool = Field(
        False,
        description="draw labelled images with probability 1 / (images with that rounded count): "
        "every count equally often",
    )

    @field_validator("modality", mode="before")
    @classmethod
    def _lower_case_modality(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _budget_for_chambers(self) -> DataConfig:
        if self.label_chambers is not None and self.label_budget is None:
            raise ValueError("label_chambers needs label_budget (how many labelled images)")
        if isinstance(self.label_chambers, int) and self.label_chambers < 1:
            raise ValueError("label_chambers must be at least 1 (or a list of chambers)")
        return self

    @field_validator("natural")
    @classmethod
    def _resolve_cho_k1(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A ``cho-k1:...`` reference becomes the real path (the run's config records it)."""
        if value is None:
            return None
        context = info.context if isinstance(info.context, dict) else {}
        return resolve_reference(value, context.get("data_root"), what="data.natural")


class LossConfig(_Strict):
    """Twin loss (paper Eq. 1) per domain: C_rec * Rec + C_reg * Reg + C_KL * KL."""

    rec_weight: float = Field(100.0, ge=0.0, description="C_rec")
    reg_weight: float = Field(3.0, ge=0.0, description="C_reg")
    kl_weight: float = Field(2.0, ge=0.0, description="C_KL")
    reconstruction: Literal["mse", "bce"] = "mse"
    regressor_start_epoch: int = Field(0, ge=0, description="epochs before Reg is switched on")
    rec_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="C_rec is multiplied by this after every epoch"
    )
    decoder_off: bool = Field(False, description="C_rec = 0 and decoders are not run")
    regression: Literal["mse", "poisson"] = Field(
        "mse",
        description="Reg: squared error, or the Poisson deviance (errors weighted by 1 / count)",
    )


class OptimConfig(_Strict):
    optimizer: Literal["adam", "radam", "adamw"] = "adam"
    lr: float = Field(1.3e-4, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0.0)


class AugmentConfig(_Strict):
    """Whole-batch augmentation on the training device (never on validation or test data)."""

    enabled: bool = True
    flips: bool = True
    rot90: bool = True
    max_rotation_deg: float = Field(5.0, ge=0.0, le=45.0)
    crop_scale: float = Field(
        0.9,
        gt=0.5,
        le=1.0,
        description="smallest crop side, resized back; a crop keeps the label although it may "
        "cut cells away (counts of whole images come out slightly high), 1.0 = no crops",
    )
    zoom_out: float = Field(
        1.0,
        ge=1.0,
        le=2.0,
        description="largest zoom-out factor: the side of the window each image is resampled "
        "from is drawn from [crop_scale, zoom_out]; above 1 the whole image shrinks onto a flat "
        "border of its median grey, so the count stays and cells look smaller; 1.0 = off (with "
        "it on, rotations also fill their corners with that grey instead of reflecting cells)",
    )
    noise_std: float = Field(
        0.02, ge=0.0, le=0.5, description="largest std of the additive noise (uniform per image)"
    )


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=2, description="natural images per step")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="None = one pass over the natural training images"
    )
    early_stopping_patience: int | None = Field(20, ge=1)
    early_stopping_min_delta: float = Field(
        1e-3, ge=0.0, description="a validation MAE must drop by more than this to count"
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: fp16 autocast on CUDA; on the CPU bf16 where it has AVX512-BF16 or "
        "AMX, else fp32",
    )
    channels_last: bool = True
    num_threads: int | None = Field(None, ge=1, description="CPU threads (None = torch default)")
    parallel_domains: bool = Field(
        True,
        description="CPU, one process, both domains: each domain's forward and backward pass "
        "runs on its own thread with half the CPU threads (same numbers as one after the other)",
    )
    val_every: int = Field(1, ge=1)
    tta: bool = Field(False, description="validate with the 8 flips/rotations averaged")

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        """Configs written before ``parallel_domains`` (which also covers the forward passes)
        named it ``parallel_backward``."""
        if isinstance(data, dict) and "parallel_backward" in data:
            data = dict(data)
            old = data.pop("parallel_backward")
            data.setdefault("parallel_domains", old)
        return data


class TransferConfig(_Strict):
    """Transfer learning from a trained checkpoint (paper section 3)."""

    from_checkpoint: str | None = None
    strategy: Literal["simultaneous", "frozen-outer", "frozen-core", "thaw"] = "simultaneous"
    thaw_stages: list[list[str]] = Field(
        default_factory=lambda: [["regressor", "outer_natural"], ["core"], ["outer_synthetic"]],
        description="thaw: groups unfrozen at the start of each equal share of the epochs",
    )
    reset_regressor: bool = False
    second_stage: DoubleTransferStage | None = Field(
        None, description="double transfer: a second transfer (e.g. back to A) after this one"
    )


class DoubleTransferStage(_Strict):
    """The second leg of a double transfer (A -> B -> A)."""

    data: DataConfig
    epochs: int = Field(50, ge=1)
    strategy: Literal["simultaneous", "frozen-outer", "frozen-core", "thaw"] = "simultaneous"


class ExperimentConfig(_Strict):
    """One run: data, model, loss, optimiser, augmentation, training and transfer settings."""

    name: str = "twinvae"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    transfer: TransferConfig | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\:"):
            raise ValueError("name must be non-empty and contain no path separators")
        return value

    @model_validator(mode="after")
    def _check_synthetic(self) -> ExperimentConfig:
        if self.data.natural_only and self.data.synthetic is not None:
            raise ValueError("data.natural_only is set, so data.synthetic must be None")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml(), encoding="utf-8")


TransferConfig.model_rebuild()


def builtin_configs() -> list[str]:
    """Names of the configs shipped with twinvae (paper-pc, quick-cpu, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested config dict."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(
    source: str | Path,
    overrides: list[str] | None = None,
    data_root: Path | str | None = None,
) -> ExperimentConfig:
    """Load a YAML config file, or a builtin config by name, and apply ``--set`` overrides.

    ``data_root`` is the CHO-K1 folder that ``cho-k1:...`` references point into (default:
    ``$TWINVAE_CHO_K1``).
    """
    path = Path(source)
    if not path.is_file():
        builtin = CONFIG_DIR / f"{source}.yaml"
        if not builtin.is_file():
            raise ConfigError(
                f"config {str(source)!r} is neither a file nor a builtin config "
                f"(builtin: {', '.join(builtin_configs())})"
            )
        path = builtin
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...)")
    overrides = overrides or []
    return config_from_dict(
        apply_overrides(data, overrides), origin=str(path), overrides=overrides, data_root=data_root
    )


def config_from_dict(
    data: dict[str, Any],
    origin: str = "config",
    *,
    overrides: Sequence[str] = (),
    override_label: str = "--set",
    data_root: Path | str | None = None,
) -> ExperimentConfig:
    """Validate a config dict; errors name every offending key.

    ``overrides`` (already applied to ``data``) are only used to blame the override, not
    ``origin``, for the errors of the keys they set.
    """
    try:
        return ExperimentConfig.model_validate(data, context={"data_root": data_root})
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, origin, overrides, override_label)) from error


def _describe_errors(
    error: ValidationError, origin: str, overrides: Sequence[str], override_label: str
) -> str:
    override_keys = [(_parse_override(item)[0], item) for item in overrides]
    by_override: dict[str, list[str]] = {}
    of_origin: list[str] = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"]]
        dotted = ".".join(location)
        if problem["type"] == "extra_forbidden":
            text = f"{dotted}: unknown key{_key_hint(location)}"
        else:
            message = str(problem["msg"]).removeprefix("Value error, ")
            text = f"{dotted}: {message}" if dotted else message
        blamed = _blamed_override(location, problem["type"] == "extra_forbidden", override_keys)
        if blamed is None:
            of_origin.append(text)
        else:
            by_override.setdefault(blamed, []).append(text)
    parts = [f"{override_label} {item}: {'; '.join(texts)}" for item, texts in by_override.items()]
    if of_origin:
        parts.append(f"{origin}: invalid config: {'; '.join(of_origin)}")
    return "; ".join(parts)


def _blamed_override(
    location: list[str], unknown_key: bool, override_keys: list[tuple[list[str], str]]
) -> str | None:
    """The last override that set this location (or a section holding it), or that brought in
    an unknown section (``--set trian.epochs=2``)."""
    for keys, item in reversed(override_keys):
        if location[: len(keys)] == keys:
            return item
        if unknown_key and location and keys[: len(location)] == location:
            return item
    return None


def _key_hint(location: list[str]) -> str:
    """', did you mean train.epochs?' (difflib), or the keys the section does have."""
    known = _section_keys(location[:-1])
    if not known:
        return ""
    prefix = ".".join(location[:-1])
    close = difflib.get_close_matches(location[-1], known, n=1, cutoff=0.6)
    if close:
        return f", did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"; {prefix or 'the config'} has {', '.join(known)}"


def _section_keys(section: list[str]) -> list[str]:
    """Field names of the config section at this location ([] when it is not a model)."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in section:
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a field annotation such as ``TransferConfig | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            found = _model_in(member)
            if found is not None:
                return found
    return None

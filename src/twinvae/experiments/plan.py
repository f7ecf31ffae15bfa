"""Experiment plans: the rows of a results table as one validated YAML file.

A plan names its rows; each row trains a Twin-VAE from a config, transfers one from another
row's best checkpoint (``from``), or tunes the classical watershed counter, and lists the test
sets to evaluate. The runner (`twinvae.experiments.runner`) executes rows in dependency order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from twinvae.config import CONFIG_DIR, ExperimentConfig, apply_overrides, config_from_dict
from twinvae.data.cho_k1 import cho_k1_root
from twinvae.data.modality import generator_modality
from twinvae.data.setnames import parse_set_name
from twinvae.errors import ConfigError
from twinvae.experiments.reference import PAPER_TABLE2

PLAN_DIR = CONFIG_DIR / "plans"
RowKind = Literal["train", "transfer", "watershed"]
Modality = Literal["bf", "pc"]
_ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class PlanRow(BaseModel):
    """One row: what to train (or tune) and which test sets to evaluate it on."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="row name; also its folder under the output directory")
    kind: RowKind = Field(description="train, transfer (needs `from`) or watershed")
    config: str | None = Field(
        None, description="builtin config name or YAML file (relative to the plan's folder)"
    )
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides")
    from_row: str | None = Field(
        None, alias="from", description="transfer: the row whose best checkpoint is the start"
    )
    modality: Modality | None = Field(
        None, description="modality of the natural data (default: the config's)"
    )
    test_sets: list[str] | None = Field(
        None, description="set names such as Nat-PC-L-Te (default: Nat-*-L-Te and Syn-*-L-Te)"
    )
    paper: str | None = Field(
        None, description=f"Table 2 row to compare with: {list(PAPER_TABLE2)}"
    )
    tta: bool = Field(
        True, description="also evaluate the checkpoint with 8-fold test-time augmentation"
    )
    description: str = ""
    grid: dict[str, list[Any]] | None = Field(
        None, description="watershed: parameter grid searched on the validation split"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ROW_NAME.match(value):
            raise ValueError(
                "must start with a letter or digit and hold only letters, digits and . _ + -"
            )
        return value

    @field_validator("test_sets")
    @classmethod
    def _check_sets(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one test set, or leave test_sets out for the default")
        names = []
        for name in value:
            try:
                names.append(str(parse_set_name(name)))
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return list(dict.fromkeys(names))

    @field_validator("paper")
    @classmethod
    def _check_paper(cls, value: str | None) -> str | None:
        if value is not None and value not in PAPER_TABLE2:
            raise ValueError(f"unknown Table 2 row {value!r}; expected one of {list(PAPER_TABLE2)}")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> PlanRow:
        if self.kind == "watershed":
            extra = [k for k in ("config", "from_row") if getattr(self, k) is not None]
            if extra or self.overrides:
                names = [("from" if k == "from_row" else k) for k in extra]
                raise ValueError(
                    f"a watershed row takes no {', '.join(names or ['overrides'])} (it is tuned, "
                    "not trained); give modality and optionally grid"
                )
            if self.modality is None:
                raise ValueError("a watershed row needs modality (bf or pc)")
            return self
        if self.config is None:
            raise ValueError(f"a {self.kind} row needs config (a builtin name or a YAML file)")
        if self.grid is not None:
            raise ValueError("grid is only for watershed rows")
        if self.kind == "transfer" and self.from_row is None:
            raise ValueError("a transfer row needs from: (the name of the row it starts from)")
        if self.kind == "train" and self.from_row is not None:
            raise ValueError("a train row starts from scratch; use kind: transfer with from:")
        return self


class Plan(BaseModel):
    """A list of rows plus the data folder and overrides shared by all of them."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiments"
    description: str = ""
    data_root: str | None = Field(
        None,
        description="CHO-K1 folder holding bf/ and pc/ (relative to where twinvae is run); "
        "default: --data-root, else $TWINVAE_CHO_K1",
    )
    overrides: list[str] = Field(
        default_factory=list, description="overrides applied to every train/transfer row first"
    )
    rows: list[PlanRow] = Field(min_length=1)
    _source: str = PrivateAttr("")

    @model_validator(mode="after")
    def _check_rows(self) -> Plan:
        seen: set[str] = set()
        for row in self.rows:
            if row.name in seen:
                raise ValueError(f"row name {row.name!r} is used twice")
            seen.add(row.name)
        kinds = {row.name: row.kind for row in self.rows}
        for row in self.rows:
            if row.from_row is None:
                continue
            if row.from_row == row.name:
                raise ValueError(f"row {row.name!r} names itself in from:")
            if row.from_row not in kinds:
                raise ValueError(
                    f"row {row.name!r}: from: {row.from_row!r} is not a row of this plan "
                    f"(rows: {', '.join(kinds)})"
                )
            if kinds[row.from_row] == "watershed":
                raise ValueError(
                    f"row {row.name!r}: from: {row.from_row!r} is a watershed row, which has no "
                    "checkpoint to transfer"
                )
        try:
            execution_order(self)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    def row(self, name: str) -> PlanRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"plan {self.name!r} has no row {name!r}; rows: {self.row_names()}")

    def row_names(self) -> str:
        return ", ".join(row.name for row in self.rows)

    @property
    def source(self) -> str:
        """The plan file ("" when built in memory)."""
        return self._source

    @property
    def folder(self) -> Path:
        """Relative config paths of rows are looked up here first."""
        return Path(self._source).parent if self._source else Path.cwd()


def execution_order(plan: Plan, only: list[str] | None = None) -> list[PlanRow]:
    """Rows in an order where every row comes after the row it transfers from.

    Ties keep the plan's order. With ``only``, just those rows and the rows they depend on.
    A dependency cycle raises ConfigError naming it.
    """
    by_name = {row.name: row for row in plan.rows}
    wanted = set(by_name)
    if only:
        unknown = [name for name in only if name not in by_name]
        if unknown:
            raise ConfigError(
                f"--only {', '.join(unknown)}: no such row; rows: {', '.join(by_name)}"
            )
        wanted = set()
        for name in only:
            current: str | None = name
            while current is not None and current not in wanted:
                wanted.add(current)
                current = by_name[current].from_row
    order: list[PlanRow] = []
    placed: set[str] = set()
    pending = [row for row in plan.rows if row.name in wanted]
    while pending:
        ready = [r for r in pending if r.from_row is None or r.from_row in placed]
        if not ready:
            raise ConfigError(
                f"plan {plan.name!r}: rows depend on each other in a cycle: "
                f"{' -> '.join(_cycle(pending))}"
            )
        row = ready[0]
        order.append(row)
        placed.add(row.name)
        pending.remove(row)
    return order


def _cycle(rows: list[PlanRow]) -> list[str]:
    by_name = {row.name: row for row in rows}
    path: list[str] = []
    current: str | None = rows[0].name
    while current is not None and current not in path:
        path.append(current)
        current = by_name[current].from_row if current in by_name else None
    if current is not None:
        path = [*path[path.index(current) :], current]
    return path


def builtin_plans() -> list[str]:
    """Names of the plans shipped with twinvae."""
    return sorted(p.stem for p in PLAN_DIR.glob("*.yaml"))


def _plan_location(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    builtin = PLAN_DIR / f"{source}.yaml"
    if builtin.is_file():
        return builtin
    raise ConfigError(
        f"plan {str(source)!r} is neither a file nor a builtin plan "
        f"(builtin: {', '.join(builtin_plans()) or 'none'})"
    )


def load_plan(source: str | Path) -> Plan:
    """Read and validate a plan YAML file (or a builtin plan by name)."""
    path = _plan_location(source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the plan ({error.strerror or error})") from error
    return plan_from_dict(data, origin=str(path))


def plan_from_dict(data: Any, origin: str = "plan") -> Plan:
    """Validate a plan; every error names the row (by name) and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with name, data_root and rows")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_describe(e, data) for e in error.errors())
        raise ConfigError(f"{origin}: invalid plan: {problems}") from None
    plan._source = origin if Path(origin).is_file() else ""
    return plan


def _describe(error: Any, data: dict[str, Any]) -> str:
    parts: list[str] = []
    location = list(error["loc"])
    rows = data.get("rows")
    for index, key in enumerate(location):
        previous = location[index - 1] if index else None
        if previous == "rows" and isinstance(key, int):
            row = rows[key] if isinstance(rows, list) and key < len(rows) else None
            name = row.get("name") if isinstance(row, dict) else None
            parts[-1] = f"rows[{key}]" + (f" ({name})" if name else "")
        else:
            parts.append(str(key))
    where = ".".join(parts) or "plan"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


# --- the config a row trains with ------------------------------------------------------------


def _config_location(plan: Plan, config: str) -> str | Path:
    relative = plan.folder / config
    if relative.is_file():
        return relative
    if Path(config).is_file():
        return Path(config)
    builtin = CONFIG_DIR / f"{config}.yaml"
    if builtin.is_file():
        return builtin
    raise ConfigError(
        f"plan {plan.name!r}: config {config!r} is neither a file (looked in {plan.folder} and "
        "the current folder) nor a builtin config"
    )


def _raw_config(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...)")
    return data


def _data_sections(raw: dict[str, Any]) -> list[dict[str, Any]]:
    sections: list[dict[str, Any]] = [raw.setdefault("data", {})]
    second = (raw.get("transfer") or {}).get("second_stage")
    if isinstance(second, dict):
        sections.append(second.setdefault("data", {}))
    return sections


def plan_data_root(plan: Plan, data_root: str | None = None) -> str:
    """The CHO-K1 folder a plan runs on: ``data_root`` (--data-root), else the plan's
    ``data_root``, else ``$TWINVAE_CHO_K1`` (an error says what to set when there is none)."""
    if data_root is not None:
        return data_root
    if plan.data_root is not None:
        return plan.data_root
    return str(cho_k1_root(needed_for=f"plan {plan.name!r}"))


def row_config(
    plan: Plan, row: PlanRow, data_root: str | None = None, extra: list[str] | None = None
) -> ExperimentConfig:
    """The config a train/transfer row runs with (before a transfer source is attached).

    The row's config file, then: name = row name, modality = the row's, every natural data
    path pointed at <data root>/<modality> (`plan_data_root`), then plan overrides, ``extra``,
    row overrides.
    """
    if row.config is None:
        raise ConfigError(f"row {row.name!r} ({row.kind}) has no config")
    location = _config_location(plan, row.config)
    raw = _raw_config(location)
    raw["name"] = row.name
    sections = _data_sections(raw)
    if row.modality is not None:
        if len(sections) > 1:
            final = sections[-1].get("modality", "pc")
            if final != row.modality:
                raise ConfigError(
                    f"row {row.name!r}: modality {row.modality} differs from the final "
                    f"(second-stage) modality {final} of config {row.config!r}"
                )
        else:
            sections[0]["modality"] = row.modality
    if any(section.get("natural") is not None for section in sections):
        root = plan_data_root(plan, data_root)
        for section in sections:
            if section.get("natural") is not None:
                section["natural"] = str(Path(root) / section.get("modality", "pc"))
    overrides = [*plan.overrides, *(extra or []), *row.overrides]
    apply_overrides(raw, overrides)
    return config_from_dict(
        raw,
        origin=f"plan row {row.name!r} (config {location})",
        overrides=overrides,
        override_label="override",
        data_root=data_root if data_root is not None else plan.data_root,
    )


def final_modality(config: ExperimentConfig) -> Modality:
    """The modality a run ends on (the second stage's for a double transfer)."""
    second = config.transfer.second_stage if config.transfer is not None else None
    modality = second.data.modality if second is not None else config.data.modality
    chosen = generator_modality(modality)
    if chosen is None:  # data.modality also takes names of other microscopes
        raise ConfigError(f"experiment plans run on CHO-K1 bf or pc data, not {modality!r}")
    return chosen


def row_modality(plan: Plan, row: PlanRow, data_root: str | None = None) -> Modality:
    if row.kind == "watershed":
        assert row.modality is not None
        return row.modality
    return final_modality(row_config(plan, row, data_root))


def default_test_sets(modality: Modality) -> list[str]:
    return [f"Nat-{modality.upper()}-L-Te", f"Syn-{modality.upper()}-L-Te"]

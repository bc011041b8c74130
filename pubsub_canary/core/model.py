"""The rollout specification: what a rollout file says, validated.

Frozen pydantic models, loadable from YAML (:func:`load_rollout_spec`), with a JSON schema for
editors (:func:`rollout_json_schema`). Validation errors become one
:class:`~pubsub_canary.errors.ConfigError` that names each bad field, its value and what is
allowed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pubsub_canary.core.judge.policy import AnalysisPolicy
from pubsub_canary.errors import ConfigError

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Transport(StrEnum):
    KAFKA = "kafka"
    PUBSUB = "pubsub"


class Strategy(StrEnum):
    CANARY = "canary"


class Target(BaseModel):
    """The group the rollout moves: a Kafka topic + group.id, or a Pub/Sub subscription."""

    model_config = _FROZEN

    transport: Transport = Field(
        default=Transport.KAFKA,
        description="`kafka` (units are partitions) or `pubsub` (units are buckets)",
    )
    topic: str = Field(min_length=1, description="Kafka topic or Pub/Sub topic")
    group: str = Field(min_length=1, description="Kafka group.id or Pub/Sub subscription")
    dead_letter_topic: str | None = Field(
        default=None, description="where poison messages go; default '<topic>.dlq'"
    )

    @property
    def key(self) -> str:
        """The coordinator's name for the group: ``<transport>:<topic>/<group>``."""
        return f"{self.transport.value}:{self.topic}/{self.group}"

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"


class Step(BaseModel):
    """One step of a rollout: give the canary ``share`` percent of the work, then hold.

    The step ends when the hold is over (both ``hold_seconds`` elapsed and each cohort processed
    ``min_messages``) and the analysis passes; with ``approval`` a person must then approve.
    """

    model_config = _FROZEN

    share: float = Field(gt=0, le=100, description="canary share of the work, percent, in (0, 100]")
    hold_seconds: float = Field(default=0.0, ge=0, description="minimum time at this step")
    min_messages: int = Field(
        default=0, ge=0, description="minimum messages each cohort processes at this step"
    )
    approval: bool = Field(default=False, description="wait for a person's approval to go on")


class SloGuards(BaseModel):
    """Absolute limits on the canary cohort; crossing one fails the step at once."""

    model_config = _FROZEN

    max_error_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="canary error rate (errors / processed) above which the step fails",
    )
    max_dead_letter_rate: float | None = Field(
        default=None, ge=0, le=1, description="canary dead-letter rate above which the step fails"
    )
    max_p99_latency_seconds: float | None = Field(
        default=None, gt=0, description="canary p99 processing latency above which the step fails"
    )
    max_lag_growth: int | None = Field(
        default=None, ge=0, description="messages of lag the canary may add during a step"
    )
    min_messages: int = Field(
        default=20, ge=1, description="canary messages needed before a rate guard may fire"
    )


class StateMigration(BaseModel):
    """A function that turns state written in ``from_format`` into ``to_format``.

    Members load ``function`` (``module:attribute``) when they restore a value of a format they
    cannot read; the module must be importable where the members run.
    """

    model_config = _FROZEN

    from_format: int = Field(ge=0, description="the state format the function reads")
    to_format: int = Field(ge=0, description="the state format it returns")
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module:attr")


class RolloutSpec(BaseModel):
    """A rollout file."""

    model_config = _FROZEN

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="unique name of the rollout; the CLI and the API address it by this name",
    )
    target: Target
    strategy: Strategy = Field(
        default=Strategy.CANARY,
        description="how the work moves; only a canary (share by steps) today",
    )
    stable_version: str = Field(
        default="stable", min_length=1, description="the version the stable members run"
    )
    canary_version: str = Field(
        min_length=1, description="the version the canary members run (what they register with)"
    )
    steps: tuple[Step, ...] = Field(
        min_length=1,
        description="the steps, in order; the rollout ends promoted after the last one passes",
    )
    slo: SloGuards = SloGuards()
    analysis: AnalysisPolicy = Field(default_factory=AnalysisPolicy)
    state_migrations: tuple[StateMigration, ...] = Field(
        default=(), description="migrations between state formats of stateful consumers"
    )

    @field_validator("steps")
    @classmethod
    def _shares_do_not_shrink(cls, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        for i in range(1, len(steps)):
            if steps[i].share < steps[i - 1].share:
                raise ValueError(
                    f"step {i} share {steps[i].share} is below step {i - 1} share "
                    f"{steps[i - 1].share}; shares must not decrease"
                )
        return steps

    @model_validator(mode="after")
    def _versions_differ(self) -> RolloutSpec:
        if self.stable_version == self.canary_version:
            raise ValueError(
                f"canary_version {self.canary_version!r} equals stable_version; "
                "a rollout needs two different versions"
            )
        return self


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(file)"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return f"{loc}: {err['msg']} (got {shown})"


def parse_rollout_spec(data: Any, *, source: str = "rollout") -> RolloutSpec:
    """Validate a parsed rollout document; raises ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping with name, target, canary_version and steps, "
            f"got {type(data).__name__}"
        )
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False))  # type: ignore[arg-type]
        raise ConfigError(f"{source}: invalid rollout: {problems}") from None


def load_rollout_spec(text: str, *, source: str = "rollout") -> RolloutSpec:
    """Parse YAML (or JSON) text into a RolloutSpec."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_rollout_spec(data, source=source)


def rollout_json_schema() -> dict[str, Any]:
    """JSON schema of the rollout file, for editors and the docs."""
    return RolloutSpec.model_json_schema()

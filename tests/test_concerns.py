"""Settings by concern: each module outside `_config` takes the small frozen slice of the
configuration it uses, derived from the one declaration (`SupervisorConfig`), and only the
faces (the package, the CLI, the harness), the supervisor facade and the run's plan
(`_prepare`) take the whole configuration."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from trio_dpsup import ConfigError, Preset, SupervisorConfig

# The concerns are the configuration family's own vocabulary: held here on purpose.
from trio_dpsup._config import concerns
from trio_dpsup._config.concerns import RankSettings, derive

PACKAGE = Path(__file__).parent.parent / "trio_dpsup"
#: The modules that may take the whole configuration.
WHOLE = frozenset({
    "trio_dpsup", "trio_dpsup._cli", "trio_dpsup._supervisor", "trio_dpsup._prepare",
    "trio_dpsup.testing._harness", "trio_dpsup.testing._settings",
})  # fmt: skip
CONCERNS = [getattr(concerns, name) for name in concerns.__all__ if name != "derive"]


def declared_type(name: str) -> object:
    """The type of `SupervisorConfig`'s field or resolved property `name`."""
    hints = typing.get_type_hints(SupervisorConfig)
    if name in hints:
        return hints[name]
    attribute = getattr(SupervisorConfig, name)
    assert isinstance(attribute, property), f"{name} is neither a field nor a property"
    assert attribute.fget is not None
    return typing.get_type_hints(attribute.fget)["return"]


@pytest.mark.parametrize("concern", CONCERNS, ids=lambda c: c.__name__)
def test_each_field_of_a_concern_is_declared_once_with_its_type(concern: type) -> None:
    assert dataclasses.is_dataclass(concern)
    assert concern.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name, kind in typing.get_type_hints(concern).items():
        if dataclasses.is_dataclass(kind):
            continue  # a concern within a concern: held on its own
        assert kind == declared_type(name), f"{concern.__name__}.{name}"


def test_a_concern_reads_the_resolved_settings() -> None:
    config = SupervisorConfig(
        command=("vllm", "serve", "m", "--data-parallel-size", "2"),
        preset=Preset.VLLM,
        probe_timeout=3.0,
        host="0.0.0.0",
    )
    settings = derive(RankSettings, config)
    assert settings.probes.probe_timeout == 3.0
    assert settings.probes.fail_on_status == ("503",)  # the preset's, resolved
    assert settings.drain.inflight_metrics == config.inflight_metrics != ()
    assert settings.restarts.scope is config.scope
    assert settings.probes.address.url(8000) == "http://127.0.0.1:8000/health"
    admin = derive(concerns.AdminSettings, config)
    assert admin.forms_group
    assert "--data-parallel-size 2" in admin.group_reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.probes.probe_timeout = 1.0  # type: ignore[misc]


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_faces_facade_and_plan_take_the_whole_configuration() -> None:
    takers = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module.startswith("trio_dpsup._config"):
            continue
        if "SupervisorConfig" in imports_of(path):
            takers.add(module)
    assert takers <= WHOLE, f"taking the whole configuration: {sorted(takers - WHOLE)}"
    assert "trio_dpsup._supervisor" in takers  # the check sees imports


def test_a_bad_value_is_still_refused_where_it_is_declared() -> None:
    with pytest.raises(ConfigError, match="--probe-timeout"):
        SupervisorConfig(command=("x",), probe_timeout=0)

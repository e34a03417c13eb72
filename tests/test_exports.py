"""The public surface: __all__ matches what fleet exports, and DESIGN §2 names import."""

from __future__ import annotations

import types

import fleet


def test_all_matches_exported_members() -> None:
    """Every public attribute is in __all__ and every __all__ name exists."""
    # fleet._LAZY names are imported on first use (import fleet loads no Redis client).
    names = set(vars(fleet)) | set(fleet._LAZY)
    public = {
        name
        for name in names
        if not name.startswith("_") and not isinstance(getattr(fleet, name), types.ModuleType)
    }
    assert set(fleet.__all__) == public
    assert len(fleet.__all__) == len(set(fleet.__all__))


def test_core_contract_names_import_from_the_root() -> None:
    """The names of the core issue import from `fleet`."""
    for name in [
        "AgentStepSpec",
        "StepOutcome",
        "TokenUsage",
        "AgentResult",
        "AgentContext",
        "AgentExecutor",
        "LocalExecutor",
        "execute_steps_parallel",
        "execute_pipeline",
        "PipelineStage",
        "execute_loop",
        "LoopDecision",
        "WorkflowEvent",
        "FleetError",
        "load_agents",
    ]:
        assert hasattr(fleet, name), name


def test_durable_wait_names_import_from_the_root() -> None:
    """Workflow.ask's errors import from `fleet` and are FleetErrors (issue 29)."""
    assert issubclass(fleet.AskTimeout, fleet.FleetError)
    assert issubclass(fleet.AskTimeout, TimeoutError)
    assert issubclass(fleet.AskError, fleet.FleetError)
    assert issubclass(fleet.AskError, ValueError)
    assert issubclass(fleet.AnswerRefused, fleet.FleetError)
    assert callable(fleet.Workflow.ask)

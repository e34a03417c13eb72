"""The public surface: __all__ matches what fleet exports, and DESIGN §2 names import."""

from __future__ import annotations

import types

import fleet


def test_all_matches_exported_members() -> None:
    """Every public attribute is in __all__ and every __all__ name exists."""
    public = {
        name
        for name, value in vars(fleet).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
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

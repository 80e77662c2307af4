"""Where the served base model and skills are: the operator's directories, or the demo."""

from __future__ import annotations

from pathlib import Path

from server.settings import Settings

def resolve_model_paths(settings: Settings) -> tuple[Path, Path | None, str]:
    """(base model dir, skills dir, served name). With no base model, the demo is built."""
    if settings.base_model is None:
        # The demo builder is lab's (it ships the assets); imported only when the demo is served.
        from lab.demo import ensure_demo

        demo = ensure_demo(settings.resolved_demo_dir(), world=settings.demo,
                           models_root=settings.resolved_models_dir())
        skills_dir = settings.skills_dir or demo.skills_dir
        return demo.base_dir, skills_dir, settings.served_model_name or demo.served_name
    base_dir = Path(settings.base_model)
    return base_dir, settings.skills_dir, settings.served_model_name or base_dir.name

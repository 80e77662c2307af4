"""The `loramix` command line (typer). `serve` hands its arguments to pydantic-settings, which
parses them into server.settings.Settings: every setting is a flag (--base-model), an env var
(LORAMIX_BASE_MODEL) and a field, declared once."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from server.settings import Settings

app = typer.Typer(help="loramix: an OpenAI-compatible server that composes skill LoRA adapters per request.")


@app.command("serve", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Start the HTTP server (with no --base-model: the demo); `loramix serve --help` lists its flags."""
    import uvicorn

    from server.app import create_app

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        settings = Settings(_cli_parse_args=ctx.args)
    except ValidationError as exc:  # argparse itself exits on unknown flags and bad types
        for error in exc.errors():
            flag = "--" + "-".join(map(str, error["loc"])).replace("_", "-")
            typer.echo(f"error: {flag + ': ' if error['loc'] else ''}{error['msg']}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


# --- merge: offline merging from the command line. The logic is the merging library's
# (merging.cli.merge_command, owned by the lead); this command only parses flags.
@app.command("merge")
def merge(
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter directories to merge."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the merged PEFT adapter to."),
    method: str = typer.Option("cat", help="Merge method: cat, lego, svd, linear, ties, dare_linear, dare_ties, magnitude_prune, knots, core."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per adapter (default: equal, summing to 1)."),
    rank: Optional[int] = typer.Option(None, help="Target rank (methods that take one)."),
    option: list[str] = typer.Option([], "--option", help="Method option key=value (repeatable)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Merge skill adapters offline into one PEFT adapter directory."""
    import merging
    from merging.cli import merge_command, parse_option_pairs, summary_line

    try:
        parsed_weights = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        typer.echo("error: --weights takes comma-separated numbers", err=True)
        raise typer.Exit(2) from None
    try:
        result = merge_command(
            adapters, output, method=method, weights=parsed_weights, rank=rank,
            options=parse_option_pairs(option), show_progress=not quiet,
        )
    except merging.MergeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_line(result))


# --- tune-cat: learned CAT weights (lab.tune_cat, imported when the command runs), saved as a named composition.
@app.command("tune-cat")
def tune_cat(
    skills: list[str] = typer.Argument(..., help="Two or more skill names (sub-directories of the skills directory)."),
    data: Path = typer.Option(..., help='JSONL training data: one {"prompt": ..., "completion": ...} per line.'),
    name: str = typer.Option(..., help="Name of the composition to save; clients use it as `model`."),
    steps: int = typer.Option(300, help="Optimizer steps."),
    lr: float = typer.Option(0.05, help="Adam learning rate of the weight logits."),
    batch_size: int = typer.Option(32, help="Examples per step."),
    seed: int = typer.Option(0, help="Seed (batches and held-out split)."),
    chat: bool = typer.Option(False, help="Render each prompt as a user message by the chat template, as the server "
                              "renders a chat request (for compositions used through /v1/chat/completions)."),
    base_model: Optional[Path] = typer.Option(None, help="Base model directory (default: the demo model)."),
    skills_dir: Optional[Path] = typer.Option(None, "--skills-dir", "--skills", help="Skills directory (default: the demo skills)."),
    cache_dir: Optional[Path] = typer.Option(None, help="The server's cache directory, where named compositions live."),
    demo: Optional[str] = typer.Option(None, help="Demo world when no base model is given: smollm2 (default), lab or tiny."),
    demo_dir: Optional[Path] = typer.Option(None, help="Where the demo is built when no base model is given."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Learn one weight per skill per module (LoRA Soups' CAT) on a little data and save the
    result as a named composition the server serves (no restart needed)."""
    import merging
    from lab.tune_cat import tune_and_save

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    flags = {"base_model": base_model, "skills_dir": skills_dir, "cache_dir": cache_dir, "demo": demo, "demo_dir": demo_dir}
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})

    def progress(step: int, loss: float) -> None:
        if not quiet and (step == 1 or step % 50 == 0 or step == steps):
            typer.echo(f"step {step}/{steps} loss {loss:.4f}", err=True)

    try:
        result, spec = tune_and_save(
            settings, skills, data, name, device=device, progress=progress,
            steps=steps, lr=lr, batch_size=batch_size, seed=seed, chat=chat,
        )
    except (merging.MergeError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    info = result.info
    weights = ", ".join(f"{n} {w:.3f}" for n, w in zip(skills, info["mean_weights"]))
    typer.echo(
        f"saved '{name}': cat of {'+'.join(skills)} with learned weights for {len(result.module_weights)} modules "
        f"(mean {weights}); held-out loss {info['heldout_loss_before']:.4f} (equal weights) -> "
        f"{info['heldout_loss_after']:.4f}; {info['train_examples']} examples, {info['seconds']:.1f} s"
    )


if __name__ == "__main__":
    app()

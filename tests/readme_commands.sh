#!/usr/bin/env bash
# The README's commands as a new user types them after `make run`, from a shell that never entered the venv:
# every command in README.md's bash blocks, and every `dvc ...`/`distilops ...`/`make ...` it quotes in its text.
#
#   tests/readme_commands.sh README.md VENV REPO    (tests/test_pipeline_e2e.py runs it on its finished pipeline)
#
# REPO is a finished DVC pipeline (the tiny one of the e2e test, `dvc repro` done); VENV the project's venv, which
# REPO/.venv points to, so the README's `. .venv/bin/activate` works there as typed. What runs how:
#   - `. .venv/bin/activate`: sourced, as typed; every command after it needs it (the venv is taken off the PATH
#     first: without that line, `dvc` and `distilops` are not found);
#   - commands that read (dvc metrics/plots/exp show, dvc metrics/params diff, dvc status, distilops versions,
#     history, params, settings, assets): run as typed, in REPO;
#   - commands that train, publish or serve (dvc repro, dvc exp run, distilops promote, image, deploy, serve,
#     package, tune), carry a placeholder (REGISTRY/PATH, [SECTION]) or name a command group (`dvc exp`): run
#     with --help appended, which parses the command and its options and does nothing (the e2e test runs the
#     pipeline, a no-op rule change, promotion and serving for real);
#   - make targets: `make -n TARGET` in the repository (the target exists, its recipe expands);
#   - curl: skipped (it needs `make serve` running; the e2e test serves and classifies for real).
# Prints one line per command; the first failure stops it, naming the command.
set -euo pipefail
readme=$(realpath "$1") venv=$(realpath "$2") repo=$(realpath "$3")
root=$(cd "$(dirname "$0")/.." && pwd)

PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$venv/bin" | paste -sd: -)
export PATH
unset VIRTUAL_ENV
[ -e "$repo/.venv" ] || ln -s "$venv" "$repo/.venv"

commands=$(python3 - "$readme" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
found = []
for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line:
            found.append(line)
prose = re.sub(r"```.*?```", "", text, flags=re.S)
for span in re.findall(r"`([^`]+)`", prose):
    span = " ".join(span.split())
    if re.match(r"(dvc|distilops|make) [a-z]", span) and span not in found:
        found.append(span)
print("\n".join(found))
PY
)

activated=0
while IFS= read -r cmd; do
  case "$cmd" in
    ". .venv/bin/activate")
      cd "$repo" && . .venv/bin/activate && activated=1; echo "ok (sourced): $cmd"; continue ;;
    curl\ *) echo "skipped (needs make serve running): $cmd"; continue ;;
    make\ *) how=dry; run="make -s -n -C $root ${cmd#make }" ;;
    dvc\ repro*|dvc\ exp\ run*|distilops\ promote*|distilops\ image*|distilops\ deploy*|distilops\ serve*|\
distilops\ package*|distilops\ tune*|*REGISTRY/PATH*|*"[SECTION]"*|"dvc exp")
      how=help; run="$cmd --help" ;;
    dvc\ *|distilops\ *) how=ran; run="$cmd" ;;
    *) echo "README command not understood by this script: $cmd" >&2; exit 1 ;;
  esac
  if [ "$activated" = 0 ] && [ "${cmd%% *}" != make ]; then
    echo "README command before entering the venv: $cmd (the README must say \`. .venv/bin/activate\` first)" >&2
    exit 1
  fi
  if ! out=$(cd "$repo" && eval "$run" 2>&1 >/dev/null </dev/null); then
    echo "README command failed: $cmd (ran: $run)" >&2
    printf '%s\n' "$out" | tail -20 >&2
    exit 1
  fi
  echo "ok ($how): $cmd"
done <<< "$commands"

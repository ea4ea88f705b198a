#!/usr/bin/env bash
# Submit an r2ec training run to a Ray cluster as a Ray job.
#
# Usage:
#   deploy/submit.sh [OPTIONS] CONFIG [--set KEY=VALUE [KEY=VALUE ...] ...]
#
# Runs, from the repository root:
#   ray job submit --address ADDRESS --working-dir . --runtime-env RUNTIME_ENV \
#       -- python -m driver train --config CONFIG [--set KEY=VALUE ...]
#
# Options:
#   --address URL        job server of the cluster (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --no-wait            return once the job is submitted instead of streaming its logs
#   --runtime-env FILE   base runtime env, YAML or JSON (default: deploy/runtime_env.yaml)
#   --env KEY=VALUE      add an environment variable to the job (repeatable)
#   --submission-id ID   job id to use instead of a generated one
#   -h, --help           show this help
#
# CONFIG must lie inside the repository (the repository is what gets uploaded). These variables are forwarded to
# the job when they are set in your shell: R2EC_CACHE HF_HOME HF_ENDPOINT HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
# NCCL_DEBUG NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME. They must make sense on the cluster's nodes; override them
# with --env. Secrets such as HF_TOKEN are not forwarded (a job's runtime env is visible in the dashboard): set
# them on the nodes (image environment, Kubernetes Secret) instead.
#
# Examples:
#   deploy/submit.sh configs/gpu/qwen2.5-3b-games.yaml
#   deploy/submit.sh --address http://head:8265 --no-wait configs/gpu/gemma2-2b-cds.yaml --set learner.max_steps=50
set -euo pipefail

FORWARDED_VARS=(R2EC_CACHE HF_HOME HF_ENDPOINT HF_HUB_OFFLINE TRANSFORMERS_OFFLINE NCCL_DEBUG NCCL_SOCKET_IFNAME
                GLOO_SOCKET_IFNAME)

die() {
    echo "submit.sh: error: $*" >&2
    exit 2
}

usage() {
    # The comment block at the top of this file, without the leading "# ".
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# The Python interpreter that runs the `ray` CLI has PyYAML (a Ray dependency); fall back to python3.
ray_python() {
    local ray_bin shebang interpreter
    ray_bin="$(command -v ray)"
    shebang="$(head -n 1 "$ray_bin" 2>/dev/null || true)"
    interpreter="${shebang#\#!}"
    if [[ "$shebang" == '#!'* && "$interpreter" != *" "* && -x "$interpreter" ]]; then
        echo "$interpreter"
    elif command -v python3 >/dev/null 2>&1; then
        command -v python3
    else
        die "cannot find the Python interpreter of 'ray' (no python3 on PATH either)"
    fi
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_for_job=1
runtime_env="$repo_root/deploy/runtime_env.yaml"
submission_id=""
extra_env=()

while (($# > 0)); do
    case "$1" in
        --address)
            (($# >= 2)) || die "--address needs a value, e.g. --address http://HEAD:8265"
            address="$2"
            shift 2
            ;;
        --address=*)
            address="${1#*=}"
            shift
            ;;
        --no-wait)
            wait_for_job=0
            shift
            ;;
        --runtime-env)
            (($# >= 2)) || die "--runtime-env needs a file"
            runtime_env="$2"
            shift 2
            ;;
        --runtime-env=*)
            runtime_env="${1#*=}"
            shift
            ;;
        --env)
            (($# >= 2)) || die "--env needs KEY=VALUE"
            [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$2'"
            extra_env+=("$2")
            shift 2
            ;;
        --submission-id)
            (($# >= 2)) || die "--submission-id needs a value"
            submission_id="$2"
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            break
            ;;
        -*)
            die "unknown option '$1' (see --help)"
            ;;
        *)
            break
            ;;
    esac
done

(($# > 0)) || die "no CONFIG given (usage: deploy/submit.sh [OPTIONS] CONFIG [--set KEY=VALUE ...])"
config="$1"
shift

train_args=()
while (($# > 0)); do
    case "$1" in
        --set)
            (($# >= 2)) || die "--set needs KEY=VALUE"
            shift
            # one or more pairs: --set a.b=1 c.d=2 (as r2ec's own --set takes them)
            while (($# > 0)) && [[ "$1" != -* ]]; do
                [[ "$1" == *=* ]] || die "--set expects KEY=VALUE with a dotted KEY, got '$1'"
                train_args+=(--set "$1")
                shift
            done
            ;;
        --set=*)
            [[ "${1#--set=}" == *=* ]] || die "--set expects KEY=VALUE with a dotted KEY, got '${1#--set=}'"
            train_args+=(--set "${1#--set=}")
            shift
            ;;
        *)
            die "unexpected argument '$1' after CONFIG (only --set KEY=VALUE may follow it)"
            ;;
    esac
done

command -v ray >/dev/null 2>&1 ||
    die "'ray' is not on PATH: install the project (pip install \"torch==2.13.0\" -e .) or ray[default]==2.60.0"
[[ -f "$config" ]] || die "config file '$config' does not exist"
[[ -f "$runtime_env" ]] || die "runtime env file '$runtime_env' does not exist"

# The job runs in the uploaded repository, so the config is passed relative to the repository root.
config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
case "$config_abs" in
    "$repo_root"/*) config_rel="${config_abs#"$repo_root"/}" ;;
    *) die "config '$config' is outside the repository ($repo_root); copy it into the repository (e.g. configs/)" ;;
esac
case "$config_rel" in
    outputs/* | data/* | .venv/* | .git/*)
        die "config '$config_rel' is in a folder that is not uploaded (see excludes in $runtime_env)" ;;
    *) ;;
esac

# Runtime env for this job: the base file plus the forwarded and --env variables, written to a temporary file.
runtime_env_abs="$(cd "$(dirname "$runtime_env")" && pwd)/$(basename "$runtime_env")"
job_env=()
for var in "${FORWARDED_VARS[@]}"; do
    if [[ -n "${!var:-}" ]]; then
        job_env+=("$var=${!var}")
    fi
done
job_env+=(${extra_env[@]+"${extra_env[@]}"})

python_bin="$(ray_python)"
tmp_env="$(mktemp "${TMPDIR:-/tmp}/r2ec-runtime-env.XXXXXX")"
trap 'rm -f "$tmp_env"' EXIT

"$python_bin" - "$runtime_env_abs" "$tmp_env" ${job_env[@]+"${job_env[@]}"} <<'PY' || die "cannot build the runtime env from '$runtime_env'"
import json
import sys

import yaml

src, dst, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(src, encoding="utf-8") as f:
    env = yaml.safe_load(f) or {}
if not isinstance(env, dict):
    sys.exit(f"{src}: expected a mapping at the top level")
if "working_dir" in env:
    print(f"submit.sh: note: working_dir in {src} is replaced by the repository root", file=sys.stderr)
env_vars = dict(env.get("env_vars") or {})
for pair in pairs:
    key, value = pair.split("=", 1)
    env_vars[key] = value
env["env_vars"] = {k: str(v) for k, v in env_vars.items()}
with open(dst, "w", encoding="utf-8") as f:
    json.dump(env, f, indent=2)  # JSON is YAML, which `ray job submit --runtime-env` reads
print("submit.sh: job env_vars: " + ", ".join(sorted(env["env_vars"])), file=sys.stderr)
PY

# Ray token authentication: `ray start` turns it on when a token exists, but the job CLI sends the token only in
# token mode. Do the same as `ray start`: a token in RAY_AUTH_TOKEN or the token file means token mode. (A cluster
# without authentication ignores the token.)
if [[ -z "${RAY_AUTH_MODE:-}" ]] &&
    [[ -n "${RAY_AUTH_TOKEN:-}" || -f "${RAY_AUTH_TOKEN_PATH:-${HOME:-}/.ray/auth_token}" ]]; then
    export RAY_AUTH_MODE=token
    echo "submit.sh: a Ray auth token is available: RAY_AUTH_MODE=token for the ray CLI" >&2
fi

cmd=(ray job submit --address "$address" --working-dir . --runtime-env "$tmp_env")
if ((wait_for_job == 0)); then
    cmd+=(--no-wait)
fi
if [[ -n "$submission_id" ]]; then
    cmd+=(--submission-id "$submission_id")
fi
cmd+=(-- python -m driver train --config "$config_rel" ${train_args[@]+"${train_args[@]}"})

cd "$repo_root"
printf '+ (cd %q &&' "$repo_root"
printf ' %q' "${cmd[@]}"
printf ')\n'
"${cmd[@]}"

#!/usr/bin/env bash
# Contract fuzzing: every operation of openapi/openapi.json against a running Tally.
#
#   bash .ci/schemathesis.sh BASE_URL API_KEY      e.g. bash .ci/schemathesis.sh http://127.0.0.1:8080 "$KEY"
#
# API_KEY must have the admin scope (checked before the run): with less, the admin operations
# would only ever answer 403 and prove nothing. Point it at a throwaway server: the run creates
# orders, kinds and keys, pauses and resumes the service, may delete kinds, archives, and
# enables fault injection where configuration allows it.
#
# Installs schemathesis (pinned) from PyPI into ${TMPDIR:-/tmp}/tally-schemathesis, reused when
# the pinned version is already there. Needs python3 (3.10+) with venv.
#
# What runs: all four phases (examples, coverage, fuzzing, stateful) over all operations, in
# positive and negative mode, at most ST_MAX_EXAMPLES generated cases per operation and phase,
# with a fixed seed (ST_SEED), one worker, checks not_a_server_error, status_code_conformance,
# content_type_conformance and response_schema_conformance. No operation is excluded. Two
# request rewrites happen in .ci/schemathesis_hooks.py (see there): generated callback/webhook
# URLs point at a dead loopback port, and revoke/rotate only ever target keys the run created
# itself (others get an id that exists nowhere: 404), so the run's own key survives.
# Exit status: 0 when every check passed, non-zero on any failure, error or fatal warning.
#
# Environment: ST_MAX_EXAMPLES (default 20), ST_SEED (default 1729), ST_REPORT_DIR (JUnit XML,
# default ${TMPDIR:-/tmp}/tally-schemathesis/report), ST_REQUEST_TIMEOUT (seconds, default 15).
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5

if [ $# -ne 2 ]; then
    echo "usage: bash .ci/schemathesis.sh BASE_URL API_KEY" >&2
    exit 2
fi
base_url=${1%/}
api_key=$2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
schema="$root/openapi/openapi.json"
venv="${TMPDIR:-/tmp}/tally-schemathesis"
max_examples=${ST_MAX_EXAMPLES:-20}
seed=${ST_SEED:-1729}
report_dir=${ST_REPORT_DIR:-$venv/report}
request_timeout=${ST_REQUEST_TIMEOUT:-15}

# --- install (or reuse) -------------------------------------------------------------------
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $SCHEMATHESIS_VERSION"; then
    echo "schemathesis: installing $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$venv/bin/schemathesis" --version

# --- pre-flight: the server is ready and the key is an admin key ------------------------------
"$venv/bin/python" - "$base_url" "$api_key" <<'PY'
import sys, time, urllib.error, urllib.request

base, key = sys.argv[1], sys.argv[2]

def status(path, headers=None):
    req = urllib.request.Request(base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return f"unreachable ({exc})"

deadline = time.monotonic() + 60
while (ready := status("/readyz")) != 200 and time.monotonic() < deadline:
    time.sleep(1)
if ready != 200:
    sys.exit(f"schemathesis: {base}/readyz answered {ready}, not 200: is the server up and ready?")
auth = status("/api/admin/audit?limit=1", {"X-Api-Key": key})
if auth != 200:
    sys.exit(f"schemathesis: GET /api/admin/audit with the given key answered {auth}: API_KEY must be a valid admin-scope key")
PY

# --- run -----------------------------------------------------------------------------------
mkdir -p "$report_dir"
cmd=(
    "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" --no-color
    run "$schema"
    --url "$base_url"
    --header "X-Api-Key: $api_key"
    --generation-with-security-parameters false
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
    --phases examples,coverage,fuzzing,stateful
    --mode all
    --max-examples "$max_examples"
    --seed "$seed"
    --generation-database none
    --workers 1
    --request-timeout "$request_timeout"
    --report junit --report-junit-path "$report_dir/junit.xml"
)
echo "schemathesis: ${cmd[*]/"$api_key"/***}"
status=0
SCHEMATHESIS_HOOKS="$here/schemathesis_hooks.py" "${cmd[@]}" || status=$?
echo "schemathesis: exit status $status (JUnit report: $report_dir/junit.xml)"
exit "$status"

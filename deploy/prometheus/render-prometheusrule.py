#!/usr/bin/env python3
"""Render prometheusrule.yaml (a Prometheus Operator PrometheusRule) from alerts.yml.

alerts.yml, a plain Prometheus rules file, is the source of truth; the PrometheusRule
carries the same rule groups under `spec`, so that Kubernetes installs and plain
Prometheus installs alert alike. The rendering is textual (alerts.yml indented under
`spec:`), so it needs nothing but python3 and keeps the comments that explain each
`for:`. When PyYAML is available the result is also parsed back and its `spec` compared
with alerts.yml, value for value.

    python3 deploy/prometheus/render-prometheusrule.py            # rewrite prometheusrule.yaml
    python3 deploy/prometheus/render-prometheusrule.py --stdout   # print it (CI diffs this)
    python3 deploy/prometheus/render-prometheusrule.py --check    # exit 1 if the file is stale
"""

import difflib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts.yml by render-prometheusrule.py: do not edit by hand.
# Edit deploy/prometheus/alerts.yml, then run
#   python3 deploy/prometheus/render-prometheusrule.py
# .ci/observability.sh fails when this file and alerts.yml drift apart.
# The annotations hold Go templates ({{ $value }}): this is a plain manifest; inside a
# Helm chart they would need escaping.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: tally
  labels:
    app.kubernetes.io/name: tally
spec:
"""


def fail(message):
    sys.exit(f"render-prometheusrule: {SOURCE.name}: {message}")


def render(source_text):
    """The PrometheusRule for the rules file `source_text`."""
    lines = source_text.splitlines()
    # The file's opening comment describes alerts.yml itself; the header replaces it.
    start = 0
    while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
        start += 1
    body = lines[start:]
    # Indenting a YAML document keeps its meaning only for plain block-style YAML with a
    # single top-level key; refuse anything else rather than render it wrong.
    for number, line in enumerate(body, start + 1):
        if "\t" in line:
            fail(f"line {number}: tab character")
        if line.startswith(("---", "...", "%")):
            fail(f"line {number}: document markers and directives are not supported")
        if line and not line[0].isspace() and not line.startswith("#") and line.rstrip() != "groups:":
            fail(f"line {number}: the only top-level key must be `groups:`, found {line!r}")
        if re.search(r":\s*[|>][-+]?[1-9][-+]?\s*(#.*)?$", line):
            fail(f"line {number}: block scalars with an explicit indentation indicator are not supported")
    if "groups:" not in body:
        fail("no top-level `groups:`")
    indented = [("  " + line) if line.strip() else "" for line in body]
    return HEADER + "\n".join(indented).rstrip("\n") + "\n"


def verify(source_text, rendered):
    """With PyYAML: the rendered spec equals alerts.yml, value for value."""
    try:
        import yaml
    except ImportError:
        return
    source = yaml.safe_load(source_text)
    document = yaml.safe_load(rendered)
    if document.get("spec") != source:
        fail("the rendered spec does not parse back to the rules of alerts.yml")


def main(argv):
    mode = argv[1] if len(argv) > 1 else "--write"
    if mode not in ("--write", "--stdout", "--check") or len(argv) > 2:
        sys.exit(__doc__)
    source_text = SOURCE.read_text(encoding="utf-8")
    rendered = render(source_text)
    verify(source_text, rendered)
    if mode == "--stdout":
        sys.stdout.write(rendered)
    elif mode == "--check":
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != rendered:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    rendered.splitlines(keepends=True),
                    str(TARGET),
                    "rendered from alerts.yml",
                )
            )
            sys.exit(f"{TARGET} is stale: run python3 {Path(argv[0]).as_posix()}")
        print(f"{TARGET.name} is up to date with {SOURCE.name}")
    else:
        TARGET.write_text(rendered, encoding="utf-8")
        print(f"wrote {TARGET}")


if __name__ == "__main__":
    main(sys.argv)

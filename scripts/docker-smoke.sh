#!/usr/bin/env bash
# The Docker image, proven air-gapped: build it from a Debian base made offline, then run the README's
# Docker commands with `--network none` and check what they left on the host.
#
#   scripts/docker-smoke.sh [--skip-without-docker] [CONTEXT_DIR]
#
# CONTEXT_DIR: the build context (default: the repository this script lives in). Steps:
#   1. a docker daemon: the one that answers, else `dockerd --iptables=false --bridge=none` started here
#      (and stopped on exit);
#   2. the base image $APPLIANCE_BASE_IMAGE (default appliance-base:bookworm), made when missing with
#      `debootstrap --variant=minbase bookworm` from the Debian mirror apt uses ($DEBIAN_MIRROR wins);
#   3. `docker build --network host` of $APPLIANCE_IMAGE (default appliance:smoke); pip trusts the host's
#      CA bundle ($PIP_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt; copied into the context as
#      .pip-ca.crt for the build and removed after); $PIP_INDEX_URL etc. are passed on when set;
#   4. with --network none: `models list` (the demo model found), `generate ... -n 4` and
#      `run recipes/synthetic-reviews.toml` into a database on a mounted folder; the database read from the
#      host with sqlite-utils; no network attempt (no offline-guard refusal, no network error, and an audit
#      hook in every Python process of the container saw no non-loopback socket, lookup or connect);
#      non-root user, no compiler in the image, `--help` under 2 s; image size and build time printed.
# Any failure: one line `docker-smoke: FAIL: ...` on stderr and exit 1. --skip-without-docker (CI): where
# docker is not installed or no daemon can be started, print one `docker-smoke: SKIP: ...` line and exit 0.
set -euo pipefail

skip_ok=0
ctx=""
for arg in "$@"; do
  case "$arg" in
    --skip-without-docker) skip_ok=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "docker-smoke: FAIL: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) ctx="$arg" ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ctx="$(cd "${ctx:-$repo}" 2>/dev/null && pwd)" || { echo "docker-smoke: FAIL: no such context folder: ${ctx}" >&2; exit 1; }
[ -f "$ctx/Dockerfile" ] || { echo "docker-smoke: FAIL: $ctx has no Dockerfile" >&2; exit 1; }

image="${APPLIANCE_IMAGE:-appliance:smoke}"
base="${APPLIANCE_BASE_IMAGE:-appliance-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
ca_bundle="${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
logs="${TMPDIR:-/tmp}/appliance-docker-smoke"
mkdir -p "$logs"
work="$(mktemp -d "${TMPDIR:-/tmp}/appliance-docker-smoke.XXXXXX")"
dockerd_pid=""
ca_copied=""

say() { echo "docker-smoke: $*"; }
fail() { echo "docker-smoke: FAIL: $*" >&2; exit 1; }
skip_or_fail() {
  if [ "$skip_ok" = 1 ]; then say "SKIP: $* (the Docker image was not checked)"; exit 0; fi
  fail "$*"
}
cleanup() {
  local rc=$?
  [ -n "$ca_copied" ] && rm -f "$ca_copied"
  if [ -n "$dockerd_pid" ]; then
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid" 2>/dev/null
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "$work" 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. a daemon --------------------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || skip_or_fail "docker is not installed (apt-get install docker.io debootstrap)"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || skip_or_fail "no docker daemon answers and dockerd is not installed"
  [ "$(id -u)" = 0 ] || skip_or_fail "no docker daemon answers and starting one needs root"
  say "starting dockerd (log: $logs/dockerd.log)"
  dockerd --iptables=false --bridge=none >"$logs/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { dockerd_pid=""; break; }
    sleep 1
  done
  docker info >/dev/null 2>&1 \
    || skip_or_fail "dockerd did not start: $(grep -m1 -iE 'level=(fatal|error)' "$logs/dockerd.log" | cut -c1-200 || true)"
fi
# Without the buildx plugin, the classic builder (it does everything this Dockerfile needs).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0

# --- 2. the base image, made offline from the Debian mirror ---------------------------------------------
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local found=""
  # deb822 stanzas (*.sources): the URIs of a stanza whose Suites name the suite itself.
  found="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$suite" '
    function done() { if (ok && uri != "" && !out) { print uri; out = 1 } ok = 0; uri = "" }
    /^[[:space:]]*$/ { done(); next }
    tolower($1) == "uris:" { uri = $2 }
    tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
    END { done() }')"
  if [ -z "$found" ]; then  # one-line style: deb [options] URI SUITE COMPONENTS
    found="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v s="$suite" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == s) { print $i; exit } }')"
  fi
  echo "${found:-http://deb.debian.org/debian}"
}
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null 2>&1 || fail "base image $base is missing and debootstrap is not installed"
  [ "$(id -u)" = 0 ] || fail "base image $base is missing and debootstrap needs root"
  mirror="$(debian_mirror)"
  say "making base image $base: debootstrap --variant=minbase $suite from $mirror (log: $logs/debootstrap.log)"
  t0=$SECONDS
  root="$work/rootfs"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$logs/debootstrap.log" 2>&1 \
    || fail "debootstrap failed: $(tail -n 1 "$logs/debootstrap.log")"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$base" >/dev/null || fail "docker import of the base failed"
  rm -rf "$root"
  say "base image made in $((SECONDS - t0)) s"
fi

# --- 3. the build ---------------------------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$base")
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST CMAKE_ARGS; do
  [ -n "${!var:-}" ] && build_args+=(--build-arg "$var=${!var}")
done
if [ -r "$ca_bundle" ] && [ ! -e "$ctx/.pip-ca.crt" ]; then
  cp "$ca_bundle" "$ctx/.pip-ca.crt" && ca_copied="$ctx/.pip-ca.crt"
fi
say "building $image from $ctx (log: $logs/build.log)"
t0=$SECONDS
if ! docker build --network host -t "$image" "${build_args[@]}" "$ctx" >"$logs/build.log" 2>&1; then
  tail -n 15 "$logs/build.log" >&2
  fail "docker build failed (the last lines above; the whole log: $logs/build.log)"
fi
build_s=$((SECONDS - t0))
[ -n "$ca_copied" ] && rm -f "$ca_copied" && ca_copied=""
size_bytes="$(docker image inspect -f '{{.Size}}' "$image")"
say "built in ${build_s} s; image size $((size_bytes / 1000000)) MB"

# --- 4. the image, air-gapped ---------------------------------------------------------------------------
models="$work/models"; data="$work/data"; netlog="$work/netlog"; audit="$work/audit"
mkdir -p "$models" "$data" "$netlog" "$audit"
chmod 0777 "$data" "$netlog"   # the image's user (uid 10001) writes here
chmod 0755 "$work" "$models" "$audit"
# An observer, not part of the image: every Python process in the container (PYTHONPATH is inherited)
# logs each internet socket it creates and each name lookup, connect or sendto that leaves loopback. A
# refusal by the appliance's own guard shows in the commands' output instead (checked below).
cat >"$audit/sitecustomize.py" <<'EOF'
import ipaddress, os, socket, sys
_dir = os.environ.get("SMOKE_NETLOG")
if _dir:
    _path = os.path.join(_dir, "%d.log" % os.getpid())
    def _local(host):
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False
    def _log(line):
        with open(_path, "a") as fh:
            fh.write(line + "\n")
    def _hook(event, args):
        if not event.startswith("socket."):
            return
        try:
            if event == "socket.__new__" and args[1] in (socket.AF_INET, socket.AF_INET6):
                _log("NET socket.__new__ family=%r" % (args[1],))
            elif event in ("socket.connect", "socket.sendto") and isinstance(args[1], tuple) and not _local(args[1][0]):
                _log("NET %s %r" % (event, args[1]))
            elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                           "socket.gethostbyaddr") and not _local(args[0]):
                _log("NET %s %r" % (event, args[0]))
        except Exception as exc:
            _log("NET hook error %r on %s" % (exc, event))
    _log("start " + " ".join(sys.argv[:2]))
    sys.addaudithook(_hook)
EOF
run_offline() {  # run_offline NAME [docker options --] appliance-arguments...; output in $logs/NAME.log
  local name="$1"; shift
  local opts=()
  if [ "${1:-}" = "--opts" ]; then shift; while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift; fi
  if ! docker run --rm --network none -v "$models:/work/models:ro" -v "$data:/data" \
      -v "$audit:/smoke-audit:ro" -v "$netlog:/smoke-netlog" -e PYTHONPATH=/smoke-audit -e SMOKE_NETLOG=/smoke-netlog \
      "${opts[@]}" "$image" "$@" >"$logs/$name.log" 2>&1; then
    tail -n 5 "$logs/$name.log" >&2
    fail "\`appliance $*\` failed in the container (log: $logs/$name.log)"
  fi
}

user="$(docker run --rm --network none --entrypoint id "$image" -u)"
[ "$user" != 0 ] || fail "the image runs as root"
compilers="$(docker run --rm --network none --entrypoint sh "$image" -c \
  'for c in gcc cc g++ c++ clang cpp cmake make ld as nvcc; do command -v $c || true; done' | tr '\n' ' ')"
[ -z "${compilers// /}" ] || fail "the final image holds compilers or build tools: $compilers"

best=""
for _ in 1 2 3; do
  t0=$(date +%s%N)
  docker run --rm --network none "$image" --help >"$logs/help.log" 2>&1 || fail "\`appliance --help\` failed in the container"
  t=$(( ($(date +%s%N) - t0) / 1000000 ))
  if [ -z "$best" ] || [ "$t" -lt "$best" ]; then best=$t; fi
done
help_s="$(awk -v ms="$best" 'BEGIN { printf "%.2f", ms / 1000 }')"
[ "$best" -lt 2000 ] || fail "\`docker run ... --help\` took ${help_s} s (the best of 3), 2 s at most"

run_offline models-list models list
grep -q 'gemma-3-270m-q4_k_m' "$logs/models-list.log" || fail "models list did not find the demo model (log: $logs/models-list.log)"
run_offline models-list-anyuid --opts --user 4242:4242 -- models list
run_offline generate generate prompts/product-review.md -m gemma-3-270m-q4_k_m -n 4
t0=$SECONDS
run_offline recipe run recipes/synthetic-reviews.toml
recipe_s=$((SECONDS - t0))

# The database, read from the host.
db="$data/appliance.db"
[ -f "$db" ] || fail "the container left no database at $db"
for f in "$db" "$db"-wal "$db"-shm; do
  [ ! -e "$f" ] || [ -r "$f" ] || fail "$f is not readable by $(id -un)"
done
sqlite_utils=""
for c in "$ctx/.venv/bin/sqlite-utils" "$repo/.venv/bin/sqlite-utils" "$(command -v sqlite-utils || true)"; do
  [ -n "$c" ] && [ -x "$c" ] && { sqlite_utils="$c"; break; }
done
[ -n "$sqlite_utils" ] || fail "sqlite-utils is not installed here (scripts/install.sh puts it in .venv)"
"$sqlite_utils" query "$db" --table \
  "select r.id as run, r.kind, r.status, r.requested, count(g.id) as generations,
          (select count(*) from examples e where e.run_id = r.id and e.kept) as kept
   from runs r left join generations g on g.run_id = r.id group by r.id order by r.id" >"$logs/db.txt" \
  || fail "sqlite-utils could not read $db: $(tail -n 1 "$logs/db.txt")"
counts="$("$sqlite_utils" query "$db" --csv --no-headers \
  "select (select count(*) from generations g join runs r on r.id = g.run_id where r.kind = 'generate' and r.status = 'completed'),
          (select count(*) from runs where kind = 'synthetic' and status = 'completed'),
          (select count(*) from examples e join runs r on r.id = e.run_id where r.kind = 'synthetic')")" \
  || fail "sqlite-utils could not query $db"
IFS=, read -r gen_rows recipe_runs examples <<<"$counts"
[ "$gen_rows" -ge 4 ] || fail "the generate run left $gen_rows rows in the mounted database, 4 expected"
[ "$recipe_runs" -ge 1 ] || fail "the recipe run did not complete (see $logs/db.txt)"
[ "$examples" -ge 1 ] || fail "the recipe run left no examples in the mounted database"
owner="$(stat -c %U:%G "$db" 2>/dev/null || stat -c %u:%g "$db")"

# No network attempt.
blocked="$(cat "$logs"/models-list.log "$logs"/models-list-anyuid.log "$logs"/generate.log "$logs"/recipe.log \
  | grep -m1 -iE 'network access blocked|network is unreachable|name or service not known|temporary failure in name resolution|no address associated|connection refused|urlopen error' || true)"
[ -z "$blocked" ] || fail "the container tried the network: $blocked"
watched="$(ls "$netlog" | wc -l)"
[ "$watched" -ge 4 ] || fail "the network audit hook ran in $watched Python processes; the commands ran 4"
attempts="$(cat "$netlog"/*.log | grep -c '^NET' || true)"
[ "$attempts" = 0 ] || fail "the container made $attempts network attempts: $(grep -h -m1 '^NET' "$netlog"/*.log)"

cat "$logs/db.txt"
say "demo model listed; the database on the host ($owner, readable by $(id -un)) holds $gen_rows generate rows and a completed recipe run ($examples examples, ${recipe_s} s)"
say "no network attempt: no guard refusal or network error in the output; $watched Python processes audited, 0 internet sockets"
say "image $image: $((size_bytes / 1000000)) MB ($(awk -v b="$size_bytes" 'BEGIN { printf "%.2f", b / 1073741824 }') GiB), built in ${build_s} s, user uid $user, no compiler; \`--help\` in ${help_s} s (docker run, best of 3)"
say "PASS"

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
#      host with sqlite-utils; no network attempt (the container's kernel counted no packet without a route,
#      no Python process in it opened an internet socket, no offline-guard refusal or network error);
#      non-root user, no compiler in the image, `--help` under 2 s; image size and build time printed.
#      sqlite-utils: $SQLITE_UTILS, else CONTEXT_DIR's or this repository's .venv, else the PATH's.
# Any failure: one line `docker-smoke: FAIL: ...` on stderr and exit 1. --skip-without-docker (CI): where
# docker is not installed, no daemon can be started or the base image cannot be made (no debootstrap, not
# root, no mirror), print one `docker-smoke: SKIP: ...` line and exit 0.
set -euo pipefail

skip_ok=0
ctx=""
for arg in "$@"; do
  case "$arg" in
    --skip-without-docker) skip_ok=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "docker-smoke: FAIL: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) ctx="$arg" ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ctx_given="${ctx:-$repo}"
ctx="$(cd "$ctx_given" 2>/dev/null && pwd)" || { echo "docker-smoke: FAIL: no such context folder: $ctx_given" >&2; exit 1; }
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
  command -v debootstrap >/dev/null 2>&1 || skip_or_fail "base image $base is missing and debootstrap is not installed"
  [ "$(id -u)" = 0 ] || skip_or_fail "base image $base is missing and debootstrap needs root"
  mirror="$(debian_mirror)"
  say "making base image $base: debootstrap --variant=minbase $suite from $mirror (log: $logs/debootstrap.log)"
  t0=$SECONDS
  root="$work/rootfs"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$logs/debootstrap.log" 2>&1 \
    || skip_or_fail "debootstrap could not make the base image: $(tail -n 1 "$logs/debootstrap.log")"
  # Slim as debian:bookworm-slim is: no manuals, documentation (copyright notices kept) or translations,
  # now or from later apt installs.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log "$root"/usr/share/man/* "$root"/usr/share/info/*
  find "$root"/usr/share/doc -type f ! -name copyright -delete
  find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' 'path-exclude /usr/share/man/*' \
    'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
    >"$root"/etc/dpkg/dpkg.cfg.d/slim
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
build() { docker build --network host -t "$image" "${build_args[@]}" "$ctx" >"$logs/build.log" 2>&1; }
if ! build; then
  # Once more, in case a download failed on the way (the layers built are cached): a defect fails twice.
  say "the build failed; once more (the first log: $logs/build-1.log)"
  mv "$logs/build.log" "$logs/build-1.log"
  if ! build; then
    tail -n 15 "$logs/build.log" >&2
    fail "docker build failed (the last lines above; the whole log: $logs/build.log)"
  fi
fi
build_s=$((SECONDS - t0))
[ -n "$ca_copied" ] && rm -f "$ca_copied" && ca_copied=""
size_bytes="$(docker image inspect -f '{{.Size}}' "$image")"
say "built in ${build_s} s; image size $((size_bytes / 1000000)) MB"

# --- 4. the image, air-gapped ---------------------------------------------------------------------------
models="$work/models"; data="$work/data"; data2="$work/data-anyuid"; netlog="$work/netlog"; audit="$work/audit"
mkdir -p "$models" "$data" "$data2" "$netlog" "$audit"
chmod 0755 "$work" "$models" "$audit"
chmod 0777 "$netlog" "$data2"
# The database is private to its owner (0600). Run as root here, the commands run as the image's own
# (non-root) user and root reads the result; run as anyone else, they run as that user (`--user`, as
# the README says), who then owns the database.
if [ "$(id -u)" = 0 ]; then as=(); chmod 0777 "$data"; else as=(--user "$(id -u):$(id -g)"); fi
# Two observers, not part of the image. (a) The kernel: each command runs through `sh -c` that saves the
# container's own /proc/net/snmp when the appliance exits; with --network none, every IPv4 connect or
# send that is not loopback (a DNS lookup included) fails for want of a route and counts in Ip
# OutNoRoutes, whatever code made it. (b) Python: every Python process (PYTHONPATH is inherited) logs each
# internet socket it creates and each lookup, connect or send off loopback that gets past the appliance's
# guard. (c) The guard's own refusals, and network errors, show on stderr (checked below).
cat >"$audit/sitecustomize.py" <<'EOF'
import os, socket, sys
_dir = os.environ.get("SMOKE_NETLOG")
if _dir:
    import ipaddress
    _path = os.path.join(_dir, "%d-%s.log" % (os.getpid(), os.urandom(6).hex()))
    def _local_host(host):
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        if not isinstance(host, str) or host in ("", "localhost"):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False  # a name: resolving it is network traffic
    def _local_address(address):  # a (host, port, ...) tuple; a path (AF_UNIX) is local
        return not (isinstance(address, tuple) and address) or _local_host(address[0])
    def _log(line):
        with open(_path, "a") as fh:
            fh.write(line + "\n")
    def _watch(name, wrapped, index, local):
        def watched(*args, **kwargs):
            if len(args) > max(index, 0) and not local(args[index]):
                _log("NET %s %r" % (name, args[index]))
            return wrapped(*args, **kwargs)
        return watched
    _init = socket.socket.__init__
    def _socket_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if len(args) < 4 and kwargs.get("fileno") is None and self.family in (socket.AF_INET, socket.AF_INET6):
            _log("NET socket %r" % (self.family,))
    socket.socket.__init__ = _socket_init
    socket.socket.connect = _watch("connect", socket.socket.connect, 1, _local_address)
    socket.socket.connect_ex = _watch("connect_ex", socket.socket.connect_ex, 1, _local_address)
    socket.socket.sendto = _watch("sendto", socket.socket.sendto, -1, _local_address)
    socket.getaddrinfo = _watch("getaddrinfo", socket.getaddrinfo, 0, _local_host)
    socket.gethostbyname = _watch("gethostbyname", socket.gethostbyname, 0, _local_host)
    _log("start " + " ".join(sys.argv[:2]))
EOF
run_offline() {  # run_offline NAME DATA_DIR [docker options --] appliance-arguments...; output: $logs/NAME.{out,err}
  local name="$1" dir="$2"; shift 2
  local opts=()
  if [ "${1:-}" = "--opts" ]; then shift; while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift; fi
  if ! docker run --rm --network none -v "$models:/work/models:ro" -v "$dir:/data" \
      -v "$audit:/smoke-audit:ro" -v "$netlog:/smoke-netlog" -e PYTHONPATH=/smoke-audit -e SMOKE_NETLOG=/smoke-netlog \
      ${opts[@]+"${opts[@]}"} --entrypoint sh "$image" \
      -c 'appliance "$@"; rc=$?; cat /proc/net/snmp >"/smoke-netlog/$0.snmp"; exit $rc' "$name" "$@" \
      >"$logs/$name.out" 2>"$logs/$name.err"; then
    tail -n 5 "$logs/$name.err" >&2
    fail "\`appliance $*\` failed in the container (output: $logs/$name.out, $logs/$name.err)"
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

run_offline models-list "$data" --opts ${as[@]+"${as[@]}"} -- models list
grep -q 'gemma-3-270m-q4_k_m' "$logs/models-list.out" || fail "models list did not find the demo model (output: $logs/models-list.out)"
run_offline models-list-anyuid "$data2" --opts --user 4242:4242 -- models list   # any uid finds the demo model
grep -q 'gemma-3-270m-q4_k_m' "$logs/models-list-anyuid.out" || fail "models list as uid 4242 did not find the demo model"
t0=$SECONDS
run_offline generate "$data" --opts ${as[@]+"${as[@]}"} -- generate prompts/product-review.md -m gemma-3-270m-q4_k_m -n 4
generate_s=$((SECONDS - t0)); t0=$SECONDS
run_offline recipe "$data" --opts ${as[@]+"${as[@]}"} -- run recipes/synthetic-reviews.toml
recipe_s=$((SECONDS - t0))

# The database, read from the host.
db="$data/appliance.db"
[ -f "$db" ] || fail "the container left no database at $db"
for f in "$db" "$db"-wal "$db"-shm; do
  [ ! -e "$f" ] || [ -r "$f" ] || fail "$f is not readable by $(id -un)"
done
sqlite_utils=""
for c in "${SQLITE_UTILS:-}" "$ctx/.venv/bin/sqlite-utils" "$repo/.venv/bin/sqlite-utils" "$(command -v sqlite-utils || true)"; do
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
          (select count(*) from examples e join runs r on r.id = e.run_id where r.kind = 'synthetic' and e.kept)")" \
  || fail "sqlite-utils could not query $db"
IFS=, read -r gen_rows recipe_runs examples <<<"${counts//$'\r'/}"
[ "$gen_rows" -ge 4 ] || fail "the generate run left $gen_rows rows in the mounted database, 4 expected"
[ "$recipe_runs" -ge 1 ] || fail "the recipe run did not complete (see $logs/db.txt)"
[ "$examples" -ge 1 ] || fail "the recipe run kept no examples in the mounted database"
owner="uid $(stat -c %u "$db")"; [ "$(stat -c %u "$db")" = "$(id -u)" ] && owner="$owner, yours"

# No network attempt.
blocked="$(cat "$logs"/models-list.err "$logs"/models-list-anyuid.err "$logs"/generate.err "$logs"/recipe.err \
  | grep -m1 -iE 'network access blocked|network is unreachable|name or service not known|temporary failure in name resolution|no address associated|connection refused|urlopen error' || true)"
[ -z "$blocked" ] || fail "the container tried the network: $blocked"
noroute=0
for name in models-list models-list-anyuid generate recipe; do
  [ -s "$netlog/$name.snmp" ] || fail "no network counters from \`$name\` (the container's /proc/net/snmp)"
  n="$(awk '$1 == "Ip:" { if (!h) { for (i = 2; i <= NF; i++) col[$i] = i; h = 1 } else print $col["OutNoRoutes"] }' "$netlog/$name.snmp")"
  [ -n "$n" ] || fail "no Ip OutNoRoutes counter in the container's /proc/net/snmp"
  noroute=$((noroute + n))
done
[ "$noroute" = 0 ] || fail "the container tried the network: $noroute packets found no route (Ip OutNoRoutes)"
watched="$(ls "$netlog" | grep -c '\.log$' || true)"
[ "$watched" -ge 4 ] || fail "the network observer ran in $watched Python processes; the commands ran 4"
attempts="$(cat "$netlog"/*.log | grep -c '^NET' || true)"
[ "$attempts" = 0 ] || fail "the container made $attempts network attempts: $(grep -h -m1 '^NET' "$netlog"/*.log)"

cat "$logs/db.txt"
say "demo model listed (also as uid 4242); the database on the host ($owner, readable by $(id -un)) holds the generate run's $gen_rows rows (${generate_s} s) and the completed recipe run ($examples examples kept, ${recipe_s} s)"
say "no network attempt: 0 packets without a route (the containers' Ip OutNoRoutes), no internet socket in $watched Python processes, no guard refusal or network error on stderr"
say "image $image: $((size_bytes / 1000000)) MB ($(awk -v b="$size_bytes" 'BEGIN { printf "%.2f", b / 1073741824 }') GiB), built in ${build_s} s, user uid $user, no compiler; \`--help\` in ${help_s} s (docker run, best of 3)"
say "PASS"

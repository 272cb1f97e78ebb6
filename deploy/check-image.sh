#!/usr/bin/env bash
# Build the Dockerfile for real and run a study inside the image (issue 13). Too slow for
# every CI run (~8-15 minutes on 2 cores); it must pass before a release. DEPLOY.md records
# its runs.
#
#   bash deploy/check-image.sh [--keep] [--work DIR] [--storage-driver overlay|vfs]
#                              [--torch-wheel FILE] [--ca-bundle FILE|none] [--ref REV]
#
# As root (debootstrap, chroot and mounts need it), on Debian/Ubuntu (it apt-installs podman
# and debootstrap when missing). Docker is not needed: podman builds with --isolation=chroot.
#  1. debootstrap a minimal Debian bookworm with python3.11 (python3, python3-venv,
#     python3-pip) and import it as the podman image localhost/bookworm-python:3.11;
#  2. podman build the Dockerfile with BASE=that image and TORCH=the CPU torch wheel found on
#     this machine (pip's find-links, /opt/wheels, /opt/pypi*, else `pip download`), copied
#     into the build context's .whl/ (git-ignored); behind a TLS-inspecting proxy, pip in
#     the build trusts this machine's CA bundle (--ca-bundle, default the system's), which is
#     bind-mounted for the RUN steps only and never written into a layer;
#  3. check the image: its configured user is non-root and exists, no compiler (gcc, cc, g++,
#     c++, clang, make) in its PATH, no tests of ours, no wheel or source tree left, the
#     entry point and the health check;
#  4. check docker-compose.yml with the image's own Python (tests/unit/test_compose.py);
#  5. mount a container of the image and, chrooted into it as the image's user in fresh
#     mount, PID and network (loopback only) namespaces, run the compose commands
#     `lstm-hpo serve ...` and `lstm-hpo worker ...` on a scratch SQLite database, submit
#     search_spaces/synthetic.yaml over HTTP and wait for it to succeed with
#     n_finished == n_trials; run the image's HEALTHCHECK command too.
# The build context is the working tree, or with --ref REV (e.g. HEAD: what DEPLOY.md
# records) that commit exactly, from `git archive`.
# Everything podman stores lives under a work directory of its own (storage.conf and
# containers.conf there; the global configuration is not touched), removed at the end
# unless --keep. --work DIR reuses a kept directory (its base image skips debootstrap).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=localhost/bookworm-python:3.11
IMAGE=localhost/lstm-hpo:check
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY_TAG=cp311 # bookworm's python3 is 3.11: the torch wheel must match it
PORT=8000    # the image's: its HEALTHCHECK asks this port (a network namespace of our own)
STUDY_TIMEOUT_S=${CHECK_IMAGE_STUDY_TIMEOUT_S:-900}
NICE=(nice -n 10) # the machine is shared: builds yield to interactive work
COMPILERS=(gcc cc g++ c++ clang make)

KEEP=0
WORK=""
DRIVER=""
WHEEL=""
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
REF=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --work) WORK=$2; shift ;;
    --storage-driver) DRIVER=$2; shift ;;
    --torch-wheel) WHEEL=$2; shift ;;
    --ca-bundle) CA_BUNDLE=$2; shift ;;
    --ref) REF=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[check-image %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[check-image] FAIL: %s\n' "$*" >&2; exit 1; }
declare -A SECONDS_OF
declare -a CHECKED
timed() { # timed NAME COMMAND...: run it and keep its wall time
  local name=$1 start=$SECONDS
  shift
  "$@"
  SECONDS_OF[$name]=$((SECONDS - start))
}
passed() { CHECKED+=("$*"); log "ok: $*"; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mounts need it): sudo bash $0"
[ "$(uname -s)" = Linux ] || die "Linux only"
ARCH=$(uname -m)

# --- tools ------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v crun >/dev/null || command -v runc >/dev/null || missing+=(crun) # podman create
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

ADDED_WHEEL=""
CONTAINER=""
NS_PID=""
RUNNER_PID=""
cleanup() {
  local status=$?
  set +e
  if [ -n "$NS_PID" ] && kill -0 "$NS_PID" 2>/dev/null; then kill -KILL "$NS_PID"; fi
  if [ -n "$RUNNER_PID" ]; then wait "$RUNNER_PID" 2>/dev/null; fi
  [ -n "$ADDED_WHEEL" ] && rm -f "$ADDED_WHEEL"
  if [ "$KEEP" = 1 ] && [ -n "$WORK" ]; then
    log "kept (--keep): $WORK; inspect with"
    log "  CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf podman images"
    [ -n "$CONTAINER" ] && log "  container $CONTAINER is mounted at $(podman mount "$CONTAINER" 2>/dev/null)"
  elif [ -n "$WORK" ]; then
    if [ "${CONTAINERS_STORAGE_CONF:-}" = "$WORK/storage.conf" ]; then # never the global storage
      if [ -n "$CONTAINER" ]; then
        podman umount "$CONTAINER" >/dev/null 2>&1
        podman rm -f -v "$CONTAINER" >/dev/null 2>&1
      fi
      podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
      podman rmi -a -f >/dev/null 2>&1 # the build's intermediate images, in our storage only
    fi
    # Never delete through a mount: refuse while anything is still mounted under WORK.
    if findmnt -rn -o TARGET | grep -qF "$WORK"; then
      log "still mounted under $WORK, not removed:"
      findmnt -rn -o TARGET | grep -F "$WORK" | sed 's/^/    /'
    else
      rm -rf --one-file-system "$WORK"
      log "removed $WORK (images, containers, storage)"
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- work directory, podman's own configuration ------------------------------------------------
log "free disk:"
df -h "$REPO" /var /tmp | sed 's/^/    /'
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /var/tmp/lstm-hpo-check-image.XXXXXX)
else
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
fi
if [ -z "$DRIVER" ]; then
  DRIVER=$(cat "$WORK/driver" 2>/dev/null || true)
fi
if [ -z "$DRIVER" ]; then
  # Kernel overlayfs if it mounts here (fast, little disk), else vfs (a full copy per layer).
  probe=$WORK/overlay-probe
  mkdir -p "$probe"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
    "$probe/merged" 2>/dev/null; then
    umount "$probe/merged"
    DRIVER=overlay
  else
    DRIVER=vfs
  fi
  rm -rf "$probe"
fi
echo "$DRIVER" >"$WORK/driver"
# vfs copies the whole tree per layer: build without intermediate layers there.
need_gb=$([ "$DRIVER" = vfs ] && echo 25 || echo 12)
LAYERS=$([ "$DRIVER" = vfs ] && echo --layers=false || echo --layers)
free_gb=$(df -Pk "$WORK" | awk 'NR == 2 { print int($4 / 1048576) }')
[ "$free_gb" -ge "$need_gb" ] || die "$WORK has ${free_gb} GB free; the $DRIVER build needs ~${need_gb} GB"
log "work directory $WORK (storage driver $DRIVER, ${free_gb} GB free)"

cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "$DRIVER"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
cat >"$WORK/containers.conf" <<EOF
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/events.log"
tmp_dir = "$WORK/libpod-tmp"
EOF
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf


# --- the build context: the working tree, or a commit ----------------------------------------
if [ -n "$REF" ]; then
  COMMIT=$(git -C "$REPO" rev-parse --verify "$REF^{commit}") || die "not a commit: $REF"
  CONTEXT=$WORK/context
  rm -rf "$CONTEXT"
  mkdir -p "$CONTEXT"
  git -C "$REPO" archive "$COMMIT" | tar -x -C "$CONTEXT"
  SOURCE="commit $(git -C "$REPO" rev-parse --short "$COMMIT") (git archive)"
else
  CONTEXT=$REPO
  SOURCE="working tree at $(git -C "$REPO" rev-parse --short HEAD)"
  if ! git -C "$REPO" diff --quiet HEAD -- Dockerfile .dockerignore docker-compose.yml pyproject.toml \
    README.md service migrations search_spaces 2>/dev/null; then
    SOURCE+=", with uncommitted changes"
  fi
fi
log "build context: $SOURCE"

# --- the torch wheel -----------------------------------------------------------------------------
TORCH_VERSION=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$REPO/constraints.txt" | head -n1)
[ -n "$TORCH_VERSION" ] || die "constraints.txt pins no torch==VERSION"
if [ -z "$WHEEL" ]; then
  dirs=()
  for d in $(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") \
    ${PIP_FIND_LINKS:-} /opt/wheels /opt/pypi*/files "$WORK/wheels"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  for suffix in "+cpu" ""; do
    for d in "${dirs[@]}"; do
      for f in "$d/torch-$TORCH_VERSION$suffix-$PY_TAG-$PY_TAG-"*linux*"_$ARCH.whl"; do
        [ -f "$f" ] && WHEEL=$f && break 3
      done
    done
  done
fi
if [ -z "$WHEEL" ]; then
  log "no torch $TORCH_VERSION wheel for $PY_TAG on disk: pip download"
  python3 -m pip download "torch==$TORCH_VERSION" --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp --platform "manylinux_2_28_$ARCH" -d "$WORK/wheels" -q
  WHEEL=$(ls "$WORK"/wheels/torch-*.whl | head -n1)
fi
[ -f "$WHEEL" ] || die "torch wheel not found: $WHEEL"
case "$(basename "$WHEEL")" in *+cpu*) ;; *) log "warning: $(basename "$WHEEL") is not a +cpu wheel (CUDA packages follow)" ;; esac
mkdir -p "$CONTEXT/.whl"
WHEEL_IN_CONTEXT=.whl/$(basename "$WHEEL")
if [ ! -f "$CONTEXT/$WHEEL_IN_CONTEXT" ]; then
  ln -f "$WHEEL" "$CONTEXT/$WHEEL_IN_CONTEXT" 2>/dev/null || cp "$WHEEL" "$CONTEXT/$WHEEL_IN_CONTEXT"
  ADDED_WHEEL=$CONTEXT/$WHEEL_IN_CONTEXT
fi
log "torch: $WHEEL -> build context $WHEEL_IN_CONTEXT"

# --- 1. the base image: debootstrap of bookworm with python3.11 ------------------------------
make_base() {
  local rootfs=$WORK/rootfs
  rm -rf --one-file-system "$rootfs"
  "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
    "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log"; die "debootstrap failed (log above)"; }
  if findmnt -rn -o TARGET | grep -qF "$rootfs"; then die "debootstrap left mounts under $rootfs"; fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  chroot "$rootfs" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'
  tar -C "$rootfs" -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf --one-file-system "$rootfs"
}
if podman image exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE: kept from an earlier run"
  BASE_NOTE="kept from an earlier run (--work)"
else
  log "base image: debootstrap $SUITE (minbase + python3, python3-venv, python3-pip) from $MIRROR"
  timed base make_base
  BASE_NOTE="debootstrap + import in ${SECONDS_OF[base]} s"
fi
BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
passed "base image $BASE_IMAGE: Debian $SUITE, Python 3.11, $((BASE_SIZE / 1000000)) MB"

# --- 2. the build -------------------------------------------------------------------------------
CA_MOUNT=()
if [ "$CA_BUNDLE" != none ] && [ -f "$CA_BUNDLE" ]; then
  # Debian's pip trusts the system bundle: this machine's, for the build's downloads only.
  CA_MOUNT=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
build() {
  "${NICE[@]}" podman build --isolation=chroot --format docker --pull=never "$LAYERS" "${CA_MOUNT[@]}" \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "TORCH=$WHEEL_IN_CONTEXT" \
    -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT" >"$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log"; die "podman build failed (log above; whole: $WORK/build.log with --keep)"; }
}
log "podman build --isolation=chroot (log: $WORK/build.log)"
timed build build
IMAGE_SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
IMAGE_ID=$(podman image inspect --format '{{.Id}}' "$IMAGE")
passed "podman build of the Dockerfile: ${SECONDS_OF[build]} s, image ${IMAGE_ID:0:12} $((IMAGE_SIZE / 1000000)) MB"

# --- 3. the image's configuration and contents ---------------------------------------------------
inspect() { podman image inspect --format "$1" "$IMAGE"; }
USER_SPEC=$(inspect '{{.Config.User}}')
ENTRYPOINT_JSON=$(inspect '{{json .Config.Entrypoint}}')
CMD_JSON=$(inspect '{{json .Config.Cmd}}')
HEALTH_JSON=$(inspect '{{json .HealthCheck}}') # kept by --format docker (OCI has no HEALTHCHECK)
mapfile -d '' IMAGE_ENV < <(inspect '{{json .Config.Env}}' |
  python3 -c 'import json, sys; sys.stdout.write("".join(e + "\0" for e in json.load(sys.stdin)))')

[ "$ENTRYPOINT_JSON" = '["lstm-hpo"]' ] || die "the image's entry point is $ENTRYPOINT_JSON, not [\"lstm-hpo\"]"
passed "entry point $ENTRYPOINT_JSON, default command $CMD_JSON"
case "$HEALTH_JSON" in *"/v1/health"*) ;; *) die "the image's HEALTHCHECK does not ask /v1/health: $HEALTH_JSON" ;; esac
HEALTH_CMD=$(printf '%s' "$HEALTH_JSON" | python3 -c '
import json, sys
test = json.load(sys.stdin)["Test"]
print(test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:]))')
passed "HEALTHCHECK asks /v1/health"

CONTAINER=$(podman create --network none --name "lstm-hpo-check-$$" "$IMAGE")
MNT=$(podman mount "$CONTAINER")
[ -d "$MNT/etc" ] || die "podman mount gave $MNT, which holds no /etc"
log "container ${CONTAINER:0:12} mounted at $MNT"

[ -n "$USER_SPEC" ] || die "the image has no USER: it runs as root"
user_part=${USER_SPEC%%:*}
group_part=${USER_SPEC#*:}
[ "$group_part" = "$USER_SPEC" ] && group_part=""
if [[ "$user_part" =~ ^[0-9]+$ ]]; then
  passwd_line=$(awk -F: -v u="$user_part" '$3 == u' "$MNT/etc/passwd")
else
  passwd_line=$(awk -F: -v u="$user_part" '$1 == u' "$MNT/etc/passwd")
fi
[ -n "$passwd_line" ] || die "the image's user $USER_SPEC is not in its /etc/passwd"
RUN_UID=$(cut -d: -f3 <<<"$passwd_line")
RUN_GID=${group_part:-$(cut -d: -f4 <<<"$passwd_line")}
[[ "$RUN_GID" =~ ^[0-9]+$ ]] || RUN_GID=$(awk -F: -v g="$RUN_GID" '$1 == g { print $3 }' "$MNT/etc/group")
RUN_HOME=$(cut -d: -f6 <<<"$passwd_line")
[ "$RUN_UID" != 0 ] || die "the image's user $USER_SPEC is root (uid 0)"
[ "$RUN_GID" != 0 ] || die "the image's group is root (gid 0)"
passed "runs as a non-root user: Config.User=$USER_SPEC -> $(cut -d: -f1 <<<"$passwd_line") uid $RUN_UID gid $RUN_GID (/etc/passwd)"

image_path=""
for e in "${IMAGE_ENV[@]}"; do case "$e" in PATH=*) image_path=${e#PATH=} ;; esac; done
found=()
for d in ${image_path//:/ } /usr/bin /usr/local/bin /bin /usr/sbin /sbin; do
  for tool in "${COMPILERS[@]}"; do
    if [ -e "$MNT$d/$tool" ] || [ -L "$MNT$d/$tool" ]; then found+=("$d/$tool"); fi
  done
  for f in "$MNT$d"/*-linux-gnu-gcc* "$MNT$d"/gcc-[0-9]*; do [ -e "$f" ] && found+=("${f#"$MNT"}"); done
done
packages=$(grep -E '^Package: (gcc(-[0-9]+)?|g\+\+(-[0-9]+)?|cpp(-[0-9]+)?|make|build-essential|clang.*)$' \
  "$MNT/var/lib/dpkg/status" 2>/dev/null | cut -d' ' -f2 | tr '\n' ' ' || true)
[ ${#found[@]} -eq 0 ] || die "compilers in the image: ${found[*]}"
[ -z "$packages" ] || die "compiler packages installed in the image: $packages"
passed "no compiler: none of ${COMPILERS[*]} in PATH ($image_path and the system dirs), no gcc/g++/cpp/make/clang package"

SITE=$(ls -d "$MNT"/opt/venv/lib/python3*/site-packages 2>/dev/null | head -n1)
[ -d "$SITE/service" ] || die "the package is not installed in /opt/venv ($SITE/service)"
ours=$(find "$SITE/service" "$MNT/app" \( -name tests -o -name 'test_*' -o -name 'conftest*' \) 2>/dev/null | sed "s|^$MNT||")
[ -z "$ours" ] || die "test files of ours in the image: $ours"
for t in $(cd "$CONTEXT" && find tests -name '*.py' -printf '%p\n' | grep -v '__init__\.py$' | sed -n 's|\.py$||p'); do
  for f in "$SITE/$t.py" "$SITE/$(dirname "$t")/__pycache__/$(basename "$t")".*.pyc; do
    [ -e "$f" ] && die "our test module $t is in the image: ${f#"$MNT"}"
  done
done
record=$(ls "$SITE"/lstm_hpo-*.dist-info/RECORD)
if grep -qE '^(tests|bench)/' "$record"; then die "the wheel's RECORD lists tests or bench files"; fi
leftovers=$(find "$MNT" -xdev \( -path "$MNT/proc" -o -path "$MNT/sys" -o -path "$MNT/dev" \) -prune -o \
  \( -path "$MNT/usr/share/python-wheels" -prune \) -o \
  \( -name '*.whl' -o -path "$MNT/src" -o -path "$MNT/app/service" \) -print 2>/dev/null | sed "s|^$MNT||")
[ -z "$leftovers" ] || die "build leftovers in the runtime image: $leftovers"
ca_note=""
if [ ${#CA_MOUNT[@]} -gt 0 ]; then
  base_mnt=$(podman image mount "$BASE_IMAGE")
  same=0
  cmp -s "$base_mnt/etc/ssl/certs/ca-certificates.crt" "$MNT/etc/ssl/certs/ca-certificates.crt" && same=1
  podman image unmount "$BASE_IMAGE" >/dev/null
  [ "$same" = 1 ] || die "the image's CA bundle differs from its base's: the build's CA mount leaked into a layer"
  ca_note=", the CA bundle is the base's (this machine's was mounted for the build only)"
fi
third_party=$(find "$SITE" -mindepth 2 -maxdepth 3 -type d -name tests 2>/dev/null | wc -l)
passed "no test files of ours (site-packages/service, /app, the wheel's RECORD; none of tests/*.py or their .pyc), no wheel or source tree$ca_note; ($third_party tests/ dirs ship inside third-party packages)"

# --- 4. docker-compose.yml, with the image's own Python ------------------------------------------
CHECK=/tmp/lstm-hpo-check
mkdir -p "$MNT$CHECK"
chmod 1777 "$MNT$CHECK"
cp "$CONTEXT/docker-compose.yml" "$CONTEXT/Dockerfile" "$CONTEXT/tests/unit/test_compose.py" "$MNT$CHECK/"
in_image() { # in_image COMMAND...: as the image's user, with its environment (no /proc: short checks)
  chroot --userspec="$RUN_UID:$RUN_GID" --groups="$RUN_GID" "$MNT" \
    /usr/bin/env -i "${IMAGE_ENV[@]}" HOME="$RUN_HOME" "$@"
}
compose_out=$(cd / && in_image python3 "$CHECK/test_compose.py" "$CHECK/docker-compose.yml" "$CHECK/Dockerfile") ||
  { printf '%s\n' "$compose_out"; die "docker-compose.yml does not match the image (above)"; }
COMMANDS_JSON=$(sed -n 's/^commands //p' <<<"$compose_out")
passed "docker-compose.yml (with the image's Python): services run \`lstm-hpo serve|worker\` with options its CLI accepts, set only LSTM_HPO_* settings it reads, Settings accepts them, the server's healthcheck asks /v1/health on its port, the worker's is off"
mapfile -d '' SERVER_ARGS < <(python3 -c 'import json, sys; sys.stdout.write("".join(a + "\0" for a in json.loads(sys.argv[1])["server"]))' "$COMMANDS_JSON")
mapfile -d '' WORKER_ARGS < <(python3 -c 'import json, sys; sys.stdout.write("".join(a + "\0" for a in json.loads(sys.argv[1])["worker"]))' "$COMMANDS_JSON")

# --- 5. serve + worker in the image, the synthetic study over HTTP --------------------------------
TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
RUN_ENV=("${IMAGE_ENV[@]}" "HOME=$RUN_HOME" "LSTM_HPO_ADMIN_TOKEN=$TOKEN"
  "LSTM_HPO_DATABASE_URL=sqlite:////data/check-image.db" "LSTM_HPO_PORT=$PORT")
quote() { # for the sh -c line below: the compose commands hold plain words only
  local a
  for a in "$@"; do
    [[ "$a" =~ ^[A-Za-z0-9_.,:=/+-]+$ ]] || die "compose command word needs quoting: $a"
    printf ' %s' "$a"
  done
}
quote "${SERVER_ARGS[@]}" "${WORKER_ARGS[@]}" >/dev/null # dies here on a word that needs quoting
# The namespace's init: forwards SIGTERM to the server and the worker, then waits for both.
INNER="id >$CHECK/id.txt
lstm-hpo$(quote "${SERVER_ARGS[@]}") >$CHECK/serve.log 2>&1 & s=\$!
lstm-hpo$(quote "${WORKER_ARGS[@]}") >$CHECK/worker.log 2>&1 & w=\$!
trap 'kill -TERM \$s \$w 2>/dev/null' TERM INT
wait; wait"
SETUP='set -e
mnt=$1; uid=$2; gid=$3; shift 3
ip link set lo up
mount --rbind /dev "$mnt/dev"
mount -t tmpfs -o mode=1777,size=1g shm "$mnt/dev/shm"
mount -t proc proc "$mnt/proc"
mount -t sysfs -o ro sysfs "$mnt/sys"
exec chroot --userspec="$uid:$gid" --groups="$gid" "$mnt" /usr/bin/env -i "$@"'
log "serve: lstm-hpo ${SERVER_ARGS[*]}; worker: lstm-hpo ${WORKER_ARGS[*]} (chrooted, uid $RUN_UID, own namespaces)"
run_start=$SECONDS
unshare --mount --pid --net --fork --propagation private --kill-child \
  /bin/sh -c "$SETUP" sh "$MNT" "$RUN_UID" "$RUN_GID" "${RUN_ENV[@]}" /bin/sh -c "$INNER" &
RUNNER_PID=$!
for _ in $(seq 50); do
  NS_PID=$(pgrep -P "$RUNNER_PID" || true)
  [ -n "$NS_PID" ] && break
  sleep 0.1
done
[ -n "$NS_PID" ] || die "the namespace did not start"
in_ns() { nsenter --net="/proc/$NS_PID/ns/net" "$@"; }
show_logs() { for f in serve worker; do echo "--- $f.log"; tail -n 40 "$MNT$CHECK/$f.log" 2>/dev/null; done; }
api() { in_ns curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" "$@"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

health=""
for _ in $(seq 180); do
  kill -0 "$NS_PID" 2>/dev/null || { show_logs; die "the server stopped before it answered"; }
  health=$(in_ns curl -sf "http://127.0.0.1:$PORT/v1/health" 2>/dev/null) && break
  health=""
  sleep 1
done
[ -n "$health" ] || { show_logs; die "no answer from /v1/health in 180 s"; }
STARTUP_S=$((SECONDS - run_start))
passed "GET /v1/health after ${STARTUP_S} s: $health"

nsenter --target "$NS_PID" --mount --net chroot --userspec="$RUN_UID:$RUN_GID" --groups="$RUN_GID" \
  "$MNT" /usr/bin/env -i "${RUN_ENV[@]}" /bin/sh -c "$HEALTH_CMD" ||
  die "the image's HEALTHCHECK command failed against the running server: $HEALTH_CMD"
passed "the image's HEALTHCHECK command passes inside the container's namespaces"

wrong=""
seen=0
for p in /proc/[0-9]*; do
  [ "$(readlink "$p/root" 2>/dev/null)" = "$MNT" ] || continue
  seen=$((seen + 1))
  read -r _ ruid euid _ < <(grep '^Uid:' "$p/status")
  if [ "$ruid" != "$RUN_UID" ] || [ "$euid" != "$RUN_UID" ]; then wrong+=" ${p#/proc/}(uid $ruid/$euid)"; fi
done
[ -z "$wrong" ] || die "processes in the image not running as uid $RUN_UID:$wrong"
[ "$seen" -ge 2 ] || die "found $seen processes chrooted into $MNT (serve and worker expected)"
passed "all $seen processes in the image run as uid $RUN_UID ($(cat "$MNT$CHECK/id.txt"))"

study_start=$SECONDS
created=$(api -X POST "http://127.0.0.1:$PORT/v1/studies" -H 'Content-Type: application/yaml' \
  --data-binary "@$MNT/app/search_spaces/synthetic.yaml") || { echo "$created"; die "submit failed"; }
STUDY=$(json 'd["id"]' <<<"$created")
log "submitted search_spaces/synthetic.yaml (the image's copy): study $STUDY"
state=""
while [ $((SECONDS - study_start)) -lt "$STUDY_TIMEOUT_S" ]; do
  study=$(api "http://127.0.0.1:$PORT/v1/studies/$STUDY") || { echo "$study"; die "GET study failed"; }
  state=$(json 'd["state"]' <<<"$study")
  case "$state" in succeeded | failed | cancelled) break ;; esac
  kill -0 "$NS_PID" 2>/dev/null || { show_logs; die "the server or worker stopped mid-study"; }
  sleep 2
done
STUDY_S=$((SECONDS - study_start))
summary=$(json '"state=%s n_trials=%s n_finished=%s counts=%s best_value=%s" % (d["state"], d["n_trials"], d["n_finished"], json.dumps(d["counts"]), d["best_value"])' <<<"$study")
[ "$state" = succeeded ] || { show_logs; die "the study did not succeed in $STUDY_S s: $summary"; }
[ "$(json 'd["n_finished"] == d["n_trials"]' <<<"$study")" = True ] || die "n_finished != n_trials: $summary"
best=$(api "http://127.0.0.1:$PORT/v1/studies/$STUDY/best") || die "GET best failed: $best"
passed "the synthetic study finished in ${STUDY_S} s: $summary; /best answers trial $(json 'd["trial_number"]' <<<"$best")"
db_owner=$(stat -c %u "$MNT/data/check-image.db")
[ "$db_owner" = "$RUN_UID" ] || die "the database file belongs to uid $db_owner"
passed "the scratch SQLite database /data/check-image.db belongs to uid $RUN_UID"

kill -TERM "$NS_PID"
for _ in $(seq 60); do kill -0 "$RUNNER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$RUNNER_PID" 2>/dev/null; then show_logs; die "serve and worker did not stop within 60 s of SIGTERM"; fi
wait "$RUNNER_PID" || true
RUNNER_PID=""
NS_PID=""
grep -qiE 'traceback' "$MNT$CHECK/serve.log" "$MNT$CHECK/worker.log" && { show_logs; die "a traceback in the logs"; }
passed "serve and worker stopped on SIGTERM, no traceback in their logs"
SECONDS_OF[run]=$((SECONDS - run_start))

# --- summary ----------------------------------------------------------------------------------
cat <<EOF

== deploy/check-image.sh: PASSED
date        $(date -u +%Y-%m-%dT%H:%MZ)
source      $SOURCE
machine     $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); $(podman --version), storage $DRIVER
torch       $(basename "$WHEEL")
base image  $BASE_IMAGE: $((BASE_SIZE / 1000000)) MB, $BASE_NOTE
build       ${SECONDS_OF[build]} s (nice 10)
image       $IMAGE ${IMAGE_ID:0:12}: $((IMAGE_SIZE / 1000000)) MB, user $USER_SPEC
study       startup ${STARTUP_S} s, synthetic study ${STUDY_S} s, serve+worker run ${SECONDS_OF[run]} s
checked:
$(printf '  - %s\n' "${CHECKED[@]}")
EOF

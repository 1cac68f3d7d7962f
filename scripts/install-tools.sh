#!/usr/bin/env bash
# Install the command-line tools that tests/deploy need into .tools/ (repository-relative,
# ignored by git), without root. Idempotent: a tool already there at the wanted version is
# kept, so a second run only checks.
#
#   scripts/install-tools.sh           install what is missing
#   scripts/install-tools.sh --force   reinstall everything
#
# What lands in .tools/bin:
#   promtool    Debian's `prometheus` package (apt-get download + dpkg -x): checks and
#               unit-tests the alert rules, checks PromQL syntax.
#   ShellCheck  Debian's `shellcheck` package: lints this script.
#   redis-server  Debian's `redis-server` + `redis-tools` (and their libraries liblzf1,
#               libjemalloc2) unpacked into .tools/redis; .tools/bin/redis-server is a wrapper
#               that points LD_LIBRARY_PATH at the unpacked libraries. The quota tests start
#               their own server on a random loopback port (tests/support_redis.py).
#   checkov     checkov from PyPI, in its own virtual environment (.tools/checkov): its pins
#               (networkx < 2.7, packaging 23) clash with torch's and the project's.
# Not installed here: kubectl. tests/deploy render the overlays with the system's
# `kubectl kustomize`, which must be kustomize v5 (kubectl 1.27 or later; Debian's kubectl 1.20
# is too old); they skip without it, and .ci/run refuses to start without it.
#
# Environment: PYTHON (default python3) creates checkov's virtual environment.
set -euo pipefail

CHECKOV_VERSION="3.3.30"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ROOT}/.tools"
BIN="${TOOLS}/bin"
PYTHON="${PYTHON:-python3}"

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { printf 'install-tools: %s\n' "$*"; }

# apt-get download as root warns that its sandbox user cannot write here; run it as root then.
apt_opts=()
if [[ "$(id -u)" -eq 0 ]]; then
  apt_opts+=(-o APT::Sandbox::User=root)
fi

# Download the .deb of package $1 into directory $2.
private_lists=0
apt_download() {
  local package="$1" dest="$2"
  local state="${TOOLS}/apt"
  local private=(-o "Dir::State::Lists=${state}/lists" -o "Dir::Cache=${state}/cache"
                 -o Debug::NoLocking=1)
  if [[ "${private_lists}" -eq 0 ]]; then
    if (cd "${dest}" && apt-get "${apt_opts[@]}" download "${package}") >/dev/null 2>&1; then
      return 0
    fi
    # The system's package lists are missing or stale and only root may refresh them: fetch
    # lists into a private directory instead, once, and use them from now on.
    log "system package lists lack ${package}; fetching private lists into .tools/apt"
    mkdir -p "${state}/lists/partial" "${state}/cache/archives/partial"
    apt-get "${apt_opts[@]}" "${private[@]}" update -qq
    private_lists=1
  fi
  (cd "${dest}" && apt-get "${apt_opts[@]}" "${private[@]}" download "${package}")
}

# Install the file $2 of Debian package $1 as .tools/bin/$3, unless `$3 --version` works.
install_from_deb() {
  local package="$1" path="$2" name="$3"
  if [[ "${force}" -eq 0 ]] && "${BIN}/${name}" --version >/dev/null 2>&1; then
    log "${name}: present"
    return 0
  fi
  local work
  work="$(mktemp -d)"
  apt_download "${package}" "${work}"
  dpkg-deb -x "${work}/${package}"_*.deb "${work}/root"
  install -m 0755 "${work}/root/${path}" "${BIN}/${name}"
  rm -rf "${work}"
  log "${name}: installed from Debian package ${package}"
}

install_redis() {
  local root="${TOOLS}/redis"
  if [[ "${force}" -eq 0 ]] && "${BIN}/redis-server" --version >/dev/null 2>&1; then
    log "redis-server: present"
    return 0
  fi
  local work package
  work="$(mktemp -d)"
  rm -rf "${root}" && mkdir -p "${root}"
  for package in redis-server redis-tools liblzf1 libjemalloc2; do
    apt_download "${package}" "${work}"
    dpkg-deb -x "${work}/${package}"_*.deb "${root}"
  done
  rm -rf "${work}"
  cat >"${BIN}/redis-server" <<'WRAPPER'
#!/usr/bin/env bash
# Debian's redis-server unpacked without root: its libraries live beside it.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../redis" && pwd)"
export LD_LIBRARY_PATH="${here}/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
exec "${here}/usr/bin/redis-server" "$@"  # a link: redis picks its mode by name
WRAPPER
  chmod 0755 "${BIN}/redis-server"
  log "redis-server: installed from Debian packages redis-server, redis-tools"
}

install_checkov() {
  local venv="${TOOLS}/checkov"
  if [[ "${force}" -eq 0 ]] && [[ "$("${venv}/bin/checkov" --version 2>/dev/null)" == "${CHECKOV_VERSION}" ]]; then
    log "checkov: present"
  else
    rm -rf "${venv}"
    "${PYTHON}" -m venv "${venv}"
    local logfile="${TOOLS}/checkov-install.log"
    if ! "${venv}/bin/pip" install --disable-pip-version-check "checkov==${CHECKOV_VERSION}" \
        >"${logfile}" 2>&1; then
      tail -n 30 "${logfile}" >&2
      log "checkov: pip install failed (full log: ${logfile})"
      return 1
    fi
    log "checkov: installed ${CHECKOV_VERSION}"
  fi
  ln -sfn ../checkov/bin/checkov "${BIN}/checkov"
}

mkdir -p "${BIN}"
install_from_deb prometheus usr/bin/promtool promtool
install_from_deb shellcheck usr/bin/shellcheck shellcheck
install_redis
install_checkov

log "promtool   $("${BIN}/promtool" --version 2>&1 | head -n 1)"
log "shellcheck $("${BIN}/shellcheck" --version | sed -n 's/^version: //p')"
log "redis      $("${BIN}/redis-server" --version)"
log "checkov    $("${BIN}/checkov" --version)"

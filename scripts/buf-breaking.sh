#!/usr/bin/env bash
# Fail if protos/ changed incompatibly (`buf breaking`, the rules in buf.yaml). `make lint` runs it.
#
#   scripts/buf-breaking.sh BUF
#
# Compared with: $BUF_AGAINST if set (any buf input, e.g. '.git#branch=main,subdir=protos' for a
# pull request's base); otherwise HEAD when protos/ has uncommitted changes (what you are about
# to commit), else the previous commit (what HEAD changed). A shallow clone (CI checkouts often
# have depth 1) fetches the one commit it lacks; a repository whose HEAD is its first commit, or
# a source tree without git, has nothing to compare with and passes with a note.
set -euo pipefail

buf="${1:?usage: $0 BUF}"
cd "$(dirname "$0")/.."

log() { printf 'buf-breaking: %s\n' "$*" >&2; }

against="${BUF_AGAINST:-}"
if [[ -z "${against}" ]]; then
  if ! git rev-parse --git-dir >/dev/null 2>&1; then
    log "not a git checkout: nothing to compare protos/ with, skipped"
    exit 0
  fi
  if ! git diff --quiet HEAD -- protos; then
    base="HEAD"
  else
    base="HEAD~1"
    if ! git rev-parse -q --verify "${base}^{commit}" >/dev/null \
        && [[ "$(git rev-parse --is-shallow-repository)" == "true" ]]; then
      log "shallow clone: fetching the previous commit"
      if ! git fetch --quiet --deepen=1; then
        log "cannot fetch the previous commit: clone with --depth=2 or set BUF_AGAINST"
        exit 1
      fi
    fi
    if ! git rev-parse -q --verify "${base}^{commit}" >/dev/null; then
      log "HEAD is the first commit: nothing to compare protos/ with, skipped"
      exit 0
    fi
  fi
  against=".git#ref=$(git rev-parse "${base}"),subdir=protos"
fi

log "against ${against}"
"${buf}" breaking --against "${against}"

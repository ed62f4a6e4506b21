# Progress for the setup scripts (sourced): `step "what"` prints what starts, `done_step` how long
# it took; `quietly CMD...` runs a command with its output appended to $STEP_LOG, shown (its end)
# only when the command fails.
STEP_LOG=${STEP_LOG:-/dev/null}
step() {
  _step_started=$SECONDS
  printf '%s... ' "$1"
}
done_step() {
  echo "done ($((SECONDS - _step_started)) s)"
}
quietly() {
  if ! "$@" >>"$STEP_LOG" 2>&1; then
    echo "failed"
    echo "\`$*\` failed; the end of $STEP_LOG:" >&2
    tail -n 30 "$STEP_LOG" >&2
    exit 1
  fi
}

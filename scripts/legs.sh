# Run test legs one after the other whatever happens; print a summary of each; fail if any failed.
#   source scripts/legs.sh; run_legs "leg 1 name" "command 1" "leg 2 name" "command 2" ...
# Sourced by scripts/test.sh; tests/test_test_script.py drives it with stand-in legs.
run_legs() {
  local names=() codes=() name cmd rc failed=0
  while [ "$#" -ge 2 ]; do
    name=$1; cmd=$2; shift 2
    echo "== $name"
    set +e
    bash -c "$cmd"
    rc=$?
    set -e
    names+=("$name"); codes+=("$rc")
    [ "$rc" -eq 0 ] || failed=1
  done
  echo "== summary"
  local i
  for i in "${!names[@]}"; do
    if [ "${codes[$i]}" -eq 0 ]; then echo "PASS  ${names[$i]}"; else echo "FAIL  ${names[$i]} (exit ${codes[$i]})"; fi
  done
  return "$failed"
}

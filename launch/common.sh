# Shared by the launchers (sourced, not run): print a command as it could be pasted into a shell.

# Plain words bare, anything else single-quoted.
quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$s"; else s=${s//\'/\'\\\'\'}; printf "'%s'" "$s"; fi
}
show() {
  local line="+" a
  for a in "$@"; do line+=" $(quote "$a")"; done
  printf '%s\n' "$line"
}

# Helpers the launch scripts source (not a script to run): argument checks, shell quoting and
# --dry-run, which prints each command exactly as it would run, ready to copy, instead of
# running it.

DRY_RUN=0

# Print the error and the calling script's usage (its `usage` function) and exit 2.
die() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

# `need_value "$@"` before reading an option's value from $2.
need_value() {
  if (( $# < 2 )) || [[ $2 == --* ]]; then
    die "$1 needs a value"
  fi
}

# Fail unless every named variable is set, naming the option that sets it (NAME -> --name).
require() {
  local var
  for var in "$@"; do
    if [[ -z ${!var} ]]; then
      var=${var,,}
      die "$COMMAND needs --${var//_/-}"
    fi
  done
}

# The arguments after `--` are klip config overrides; catch a stray one here rather than on
# every worker after the slice has started.
check_overrides() {
  local o
  for o in "$@"; do
    [[ $o == --config.?*=* ]] || die "'$o' is not a config override like --config.train.steps=100"
  done
}

# One word as bash reads it back: bare if it is only safe characters, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *"'"* ]]; then
    printf "'%s'" "$1"
  else
    printf '%q' "$1"
  fi
}

# One word for a command line that will itself be single-quoted (gcloud ssh --command):
# double quotes where a word needs quoting, so the outer single quotes stay plain.
quote_inner() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf '%q' "$1"
  fi
}

# The words quoted with `quote_inner` and joined into one command line.
join_inner() {
  local words=() w
  for w in "$@"; do
    words+=("$(quote_inner "$w")")
  done
  printf '%s' "${words[*]}"
}

# Run the command, or with --dry-run print it as one copyable line.
run() {
  if (( DRY_RUN )); then
    local words=() w
    for w in "$@"; do
      words+=("$(quote "$w")")
    done
    printf '%s\n' "${words[*]}"
  else
    "$@"
  fi
}

#!/usr/bin/env bash
# Install saasquatch-agent as a systemd service (run as root; safe to run again; also upgrades).
#
#   scripts/install.sh [--instance NAME] [--no-package] [--wheels DIR]     install, repair or upgrade
#   scripts/install.sh --uninstall [--instance NAME] [--purge]
#
# Creates the service user, the group whose members may drop files, the folders with their owners and
# modes (drop/ group-writable with setgid, everything else private to the service), a configuration
# from config/agent.example.toml when there is none, the unit files, and (unless --no-package) the
# package in a virtualenv under /opt/saasquatch-agent, built from the system's /usr/bin/python3 and
# checked by running `saasquatch-agent --version` as the service user, linked as
# /usr/local/bin/saasquatch-agent. --wheels DIR installs from a wheelhouse (`pip wheel -w DIR .`)
# without network. An existing configuration, key, journal and files are kept.
# --uninstall stops, disables and removes the unit (the template only when no other instance is
# left) and, once no unit is left, the package and the command. --purge also removes the
# configuration, key and state of the unit it names (the plain unit: never an instance's), and the
# shared parts (user, groups, /etc/saasquatch-agent, /var/lib/saasquatch-agent) once nothing else is
# installed.
#
# Locations can be moved for tests with SAASQUATCH_ETC, SAASQUATCH_LIB, SAASQUATCH_UNIT_DIR,
# SAASQUATCH_OPT, SAASQUATCH_BIN, SAASQUATCH_DOC, SAASQUATCH_USER, SAASQUATCH_DROP_GROUP and
# SAASQUATCH_PYTHON (the interpreter the virtualenv is built from).
set -euo pipefail
umask 022  # the package and units must be readable by the service user and systemd
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ETC="${SAASQUATCH_ETC:-/etc/saasquatch-agent}"
LIB="${SAASQUATCH_LIB:-/var/lib/saasquatch-agent}"
UNIT_DIR="${SAASQUATCH_UNIT_DIR:-/etc/systemd/system}"
OPT="${SAASQUATCH_OPT:-/opt/saasquatch-agent}"
BIN="${SAASQUATCH_BIN:-/usr/local/bin}"
DOC="${SAASQUATCH_DOC:-/usr/share/doc/saasquatch-agent}"
AGENT_USER="${SAASQUATCH_USER:-saasquatch-agent}"
DROP_GROUP="${SAASQUATCH_DROP_GROUP:-saasquatch-drop}"
PYTHON="${SAASQUATCH_PYTHON:-/usr/bin/python3}"
TYPE_FOLDERS=(users user-events delete-users reward-redemptions)
# names the plain unit's own state uses under $LIB, so no instance may have them
RESERVED=(drop archive failed spool keys agent)

instance="" uninstall=0 purge=0 package=1 wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --instance) instance="${2:?--instance needs a name}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --no-package) package=0; shift ;;
    --wheels) wheels="$(cd "${2:?--wheels needs a folder}" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$instance" ] && ! [[ "$instance" =~ ^[a-z0-9][a-z0-9_-]{0,31}$ ]]; then
  echo "install.sh: instance name must be lower-case letters, digits, - or _" >&2; exit 2
fi
for name in "${RESERVED[@]}"; do
  if [ "$instance" = "$name" ]; then echo "install.sh: instance name $name is reserved" >&2; exit 2; fi
done
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root" >&2; exit 2; fi

if [ -n "$instance" ]; then
  unit="saasquatch-agent@${instance}.service" unit_file="saasquatch-agent@.service"
  config="$ETC/${instance}.toml" key="$ETC/keys/${instance}_ed25519"
  known_hosts="$ETC/keys/${instance}_known_hosts" state="$LIB/$instance"
else
  unit="saasquatch-agent.service" unit_file="saasquatch-agent.service"
  config="$ETC/agent.toml" key="$ETC/keys/id_ed25519" known_hosts="$ETC/keys/known_hosts" state="$LIB"
fi
# sd_booted(3): systemd is PID 1 exactly when /run/systemd/system exists
have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
as_service_user() { runuser -u "$AGENT_USER" -- "$@"; }

# Instances other than this one that are configured, enabled or known to systemd (one name a line).
other_instances() {
  {
    for file in "$ETC"/*.toml; do
      [ -e "$file" ] || continue
      name="$(basename "$file" .toml)"; [ "$name" = agent ] || echo "$name"
    done
    for link in "$UNIT_DIR"/*/saasquatch-agent@*.service; do
      [ -L "$link" ] || continue
      name="$(basename "$link" .service)"; echo "${name#saasquatch-agent@}"
    done
    if have_systemd; then
      systemctl list-units --all --plain --no-legend 'saasquatch-agent@*.service' 2>/dev/null \
        | awk '{print $1}' | sed -n 's/^saasquatch-agent@\(.*\)\.service$/\1/p'
    fi
  } | sort -u | grep -vx -e "$instance" -e '' || true
}

if [ "$uninstall" = 1 ]; then
  status=0
  if have_systemd; then systemctl disable --now "$unit" 2>/dev/null || true; fi
  # enable links left without systemd (or by a unit file removed before it was disabled)
  for link in "$UNIT_DIR"/*/"$unit"; do [ -L "$link" ] && rm -f "$link"; done
  others="$(other_instances)"
  if [ -z "$instance" ]; then
    rm -f "$UNIT_DIR/saasquatch-agent.service"
  elif [ -z "$others" ]; then
    rm -f "$UNIT_DIR/saasquatch-agent@.service"
  fi
  if have_systemd; then
    systemctl daemon-reload
    systemctl reset-failed "$unit" 2>/dev/null || true
  fi
  # what is still installed: the template with an instance, or the plain unit with its configuration
  # (install.sh writes both unit files; the plain one without agent.toml was never set up)
  units_left=0
  [ -e "$UNIT_DIR/saasquatch-agent@.service" ] && units_left=1
  [ -e "$UNIT_DIR/saasquatch-agent.service" ] && [ -e "$ETC/agent.toml" ] && units_left=1
  if [ "$units_left" = 0 ] && [ -e "$UNIT_DIR/saasquatch-agent.service" ]; then
    rm -f "$UNIT_DIR/saasquatch-agent.service"
    if have_systemd; then systemctl daemon-reload; fi
  fi
  if [ "$purge" = 1 ]; then
    rm -f "$config" "$key" "$key.pub" "$known_hosts"
    if [ -n "$instance" ]; then
      rm -rf "$state"
    elif [ -d "$LIB" ]; then
      # the plain unit's state is $LIB itself, which also holds the instances' folders: keep those
      for entry in "$LIB"/* "$LIB"/.[!.]*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        grep -qxF -e "$(basename "$entry")" <<<"$others" || rm -rf "$entry"
      done
    fi
    echo "removed $unit, its configuration, key and state"
  else
    echo "removed $unit; kept $config, $ETC/keys and $state (add --purge to delete them)"
  fi
  if [ "$units_left" = 0 ]; then
    rm -rf "$OPT" "$DOC"; rm -f "$BIN/saasquatch-agent"
    echo "removed the package ($OPT) and the command ($BIN/saasquatch-agent)"
  fi
  if [ "$purge" = 1 ]; then
    if [ "$units_left" = 0 ] && [ -z "$others" ] && [ ! -e "$ETC/agent.toml" ]; then
      rm -rf "$LIB" "$ETC"
      if id "$AGENT_USER" >/dev/null 2>&1 && ! userdel "$AGENT_USER"; then
        echo "install.sh: could not remove the user $AGENT_USER (a process of it still runs?)" >&2
        status=1
      fi
      if getent group "$AGENT_USER" >/dev/null; then groupdel "$AGENT_USER" || status=1; fi
      if getent group "$DROP_GROUP" >/dev/null; then groupdel "$DROP_GROUP" || status=1; fi
      echo "removed $ETC, $LIB, the user $AGENT_USER and the group $DROP_GROUP"
    else
      kept=""
      [ -z "$others" ] || kept="$(sed 's/^/saasquatch-agent@/' <<<"$others" | tr '\n' ' ')"
      [ -e "$UNIT_DIR/saasquatch-agent.service" ] && kept="saasquatch-agent $kept"
      echo "kept the user, groups, $ETC and $LIB for what is still installed: ${kept:-configuration in $ETC}"
    fi
  fi
  exit "$status"
fi

# user and groups
getent group "$DROP_GROUP" >/dev/null || groupadd --system "$DROP_GROUP"
if ! id "$AGENT_USER" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$LIB" --no-create-home --shell /usr/sbin/nologin \
    --comment "saasquatch-agent service" "$AGENT_USER"
fi
id -nG "$AGENT_USER" | tr ' ' '\n' | grep -qx "$DROP_GROUP" || usermod -a -G "$DROP_GROUP" "$AGENT_USER"

# folders: configuration readable by the service; the key readable by root only (systemd passes it)
install -d -o root -g "$AGENT_USER" -m 0750 "$ETC"
install -d -o root -g "$AGENT_USER" -m 0750 "$ETC/keys"
# $LIB is the plain unit's StateDirectory= (also the parent of the instances' ones): it must belong
# to the service user, or systemd re-owns the whole tree, drop folders of every instance included.
install -d -o "$AGENT_USER" -g "$AGENT_USER" -m 0711 "$LIB"
install -d -o "$AGENT_USER" -g "$AGENT_USER" -m 0711 "$state"
for sub in archive failed spool; do install -d -o "$AGENT_USER" -g "$AGENT_USER" -m 0700 "$state/$sub"; done
install -d -o "$AGENT_USER" -g "$DROP_GROUP" -m 2770 "$state/drop"
for sub in "${TYPE_FOLDERS[@]}"; do install -d -o "$AGENT_USER" -g "$DROP_GROUP" -m 2770 "$state/drop/$sub"; done
[ -e "$known_hosts" ] || install -o root -g "$AGENT_USER" -m 0644 /dev/null "$known_hosts"

if [ ! -e "$config" ]; then
  sed -e "s#^private_key = .*#private_key = \"$key\"#" \
      -e "s#^known_hosts = .*#known_hosts = \"$known_hosts\"#" \
      -e "s#/var/lib/saasquatch-agent#$state#g" \
      "$REPO/config/agent.example.toml" > "$config.new"
  chown root:"$AGENT_USER" "$config.new"; chmod 0640 "$config.new"; mv "$config.new" "$config"
  created_config=1
else
  created_config=0
fi

# units (paths follow the locations above) and the README they name in Documentation=
for file in saasquatch-agent.service saasquatch-agent@.service; do
  sed -e "s#/usr/local/bin/saasquatch-agent#$BIN/saasquatch-agent#g" \
      -e "s#/usr/share/doc/saasquatch-agent#$DOC#g" \
      -e "s#/etc/saasquatch-agent#$ETC#g" "$REPO/systemd/$file" > "$UNIT_DIR/$file.new"
  chmod 0644 "$UNIT_DIR/$file.new"; mv "$UNIT_DIR/$file.new" "$UNIT_DIR/$file"
done
install -D -m 0644 "$REPO/README.md" "$DOC/README.md"
if have_systemd; then systemctl daemon-reload; fi

if [ "$package" = 1 ]; then
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "install.sh: $PYTHON with venv is needed: apt-get install -y python3 python3-venv" \
         "(or SAASQUATCH_PYTHON=/path/to/python3)" >&2
    exit 2
  fi
  if ! as_service_user "$PYTHON" -c '' 2>/dev/null; then
    echo "install.sh: $AGENT_USER cannot run $PYTHON ($(readlink -f "$PYTHON")); use a system" \
         "interpreter (SAASQUATCH_PYTHON=/usr/bin/python3)" >&2
    exit 2
  fi
  if [ -e "$OPT/bin/python" ] && ! as_service_user "$OPT/bin/python" -c '' 2>/dev/null; then
    echo "install.sh: $OPT was built from an interpreter $AGENT_USER cannot run" \
         "($(readlink -f "$OPT/bin/python")); building it again from $PYTHON"
    rm -rf "$OPT"
  fi
  [ -x "$OPT/bin/python" ] || "$PYTHON" -m venv "$OPT"
  if [ -n "$wheels" ]; then
    "$OPT/bin/pip" install --quiet --no-index --find-links "$wheels" --upgrade saasquatch-agent
    # the same version number again (a rebuilt checkout) is installed anew too
    "$OPT/bin/pip" install --quiet --no-index --find-links "$wheels" --force-reinstall --no-deps \
      saasquatch-agent
  else
    "$OPT/bin/pip" install --quiet --upgrade "$REPO"
  fi
  ln -sfn "$OPT/bin/saasquatch-agent" "$BIN/saasquatch-agent"
  if ! version="$(as_service_user "$BIN/saasquatch-agent" --version 2>&1)"; then
    echo "install.sh: $AGENT_USER cannot run $BIN/saasquatch-agent: $version" >&2
    exit 1
  fi
  echo "package: $version in $OPT (runs as $AGENT_USER)"
fi

cat <<EOF
saasquatch-agent is installed ($unit).
  configuration: $config$([ "$created_config" = 1 ] && echo " (new: set [sftp] host, port, username, remote_dir)")
  drop folder:   $state/drop  (add people who drop files: usermod -a -G $DROP_GROUP NAME)
Next steps:$([ "$package" = 0 ] && ! command -v saasquatch-agent >/dev/null && printf '\n%s\n%s' \
  "  0. the saasquatch-agent command is not installed (--no-package): run this script without" \
  "     --no-package, or install the package yourself so that $BIN/saasquatch-agent runs it")
  1. saasquatch-agent keygen $key
     and paste the printed public line into SaaSquatch (Integrations > SFTP Import Integration)
  2. saasquatch-agent trust-host --config $config
     (check the fingerprint with SaaSquatch; --fingerprint SHA256:... for scripted installs)
  3. saasquatch-agent doctor --config $config
EOF
if ! have_systemd; then
  cat <<EOF
  4. systemd is not running as PID 1 on this machine (no /run/systemd/system), so the service
     cannot be started here: the unit is installed in $UNIT_DIR for when this machine boots with
     systemd.
EOF
elif systemctl is-active --quiet "$unit"; then
  echo "  4. $unit is running the old code: systemctl restart $unit (it resumes where it stopped)"
else
  echo "  4. systemctl enable --now $unit && journalctl -u $unit -f"
fi

#!/usr/bin/env bash
# Install saasquatch-agent as a systemd service (run as root; safe to run again).
#
#   scripts/install.sh [--instance NAME] [--no-package]      install or repair
#   scripts/install.sh --uninstall [--instance NAME] [--purge]
#
# Creates the service user, the group whose members may drop files, the folders with their owners and
# modes (drop/ group-writable with setgid, everything else private to the service), a configuration
# from config/agent.example.toml when there is none, the unit files, and (unless --no-package) the
# package in a virtualenv under /opt/saasquatch-agent linked as /usr/local/bin/saasquatch-agent.
# --uninstall removes the units and the command; --purge also removes the configuration, the keys,
# the state (journal, archive/, failed/, drop/) and the user and group.
#
# Locations can be moved for tests with SAASQUATCH_ETC, SAASQUATCH_LIB, SAASQUATCH_UNIT_DIR,
# SAASQUATCH_OPT, SAASQUATCH_BIN, SAASQUATCH_USER and SAASQUATCH_DROP_GROUP.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ETC="${SAASQUATCH_ETC:-/etc/saasquatch-agent}"
LIB="${SAASQUATCH_LIB:-/var/lib/saasquatch-agent}"
UNIT_DIR="${SAASQUATCH_UNIT_DIR:-/etc/systemd/system}"
OPT="${SAASQUATCH_OPT:-/opt/saasquatch-agent}"
BIN="${SAASQUATCH_BIN:-/usr/local/bin}"
AGENT_USER="${SAASQUATCH_USER:-saasquatch-agent}"
DROP_GROUP="${SAASQUATCH_DROP_GROUP:-saasquatch-drop}"
TYPE_FOLDERS=(users user-events delete-users reward-redemptions)

instance="" uninstall=0 purge=0 package=1
while [ $# -gt 0 ]; do
  case "$1" in
    --instance) instance="${2:?--instance needs a name}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --no-package) package=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$instance" ] && ! [[ "$instance" =~ ^[a-z0-9][a-z0-9_-]{0,31}$ ]]; then
  echo "install.sh: instance name must be lower-case letters, digits, - or _" >&2; exit 2
fi
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root" >&2; exit 2; fi

if [ -n "$instance" ]; then
  unit="saasquatch-agent@${instance}.service" unit_file="saasquatch-agent@.service"
  config="$ETC/${instance}.toml" key="$ETC/keys/${instance}_ed25519"
  known_hosts="$ETC/keys/${instance}_known_hosts" state="$LIB/$instance"
else
  unit="saasquatch-agent.service" unit_file="saasquatch-agent.service"
  config="$ETC/agent.toml" key="$ETC/keys/id_ed25519" known_hosts="$ETC/keys/known_hosts" state="$LIB"
fi
have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ "$uninstall" = 1 ]; then
  if have_systemd; then systemctl disable --now "$unit" 2>/dev/null || true; fi
  rm -f "$UNIT_DIR/$unit_file"
  if have_systemd; then systemctl daemon-reload; fi
  if [ "$purge" = 1 ]; then
    rm -rf "$state" "$config" "$key" "$key.pub" "$known_hosts"
    if [ -z "$instance" ] || [ -z "$(ls -A "$LIB" 2>/dev/null)" ]; then
      rm -rf "$LIB" "$ETC" "$OPT"; rm -f "$BIN/saasquatch-agent"
      rm -f "$UNIT_DIR/saasquatch-agent.service" "$UNIT_DIR/saasquatch-agent@.service"
      if id "$AGENT_USER" >/dev/null 2>&1; then userdel "$AGENT_USER"; fi
      if getent group "$AGENT_USER" >/dev/null; then groupdel "$AGENT_USER"; fi
      if getent group "$DROP_GROUP" >/dev/null; then groupdel "$DROP_GROUP"; fi
    fi
    echo "removed $unit, its configuration, key and state"
  else
    echo "removed $unit; kept $config, $ETC/keys and $state (add --purge to delete them)"
  fi
  exit 0
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
install -d -o root -g root -m 0755 "$(dirname "$state")"
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

# units (paths follow the locations above)
for file in saasquatch-agent.service saasquatch-agent@.service; do
  sed -e "s#/usr/local/bin/saasquatch-agent#$BIN/saasquatch-agent#g" \
      -e "s#/etc/saasquatch-agent#$ETC#g" "$REPO/systemd/$file" > "$UNIT_DIR/$file.new"
  chmod 0644 "$UNIT_DIR/$file.new"; mv "$UNIT_DIR/$file.new" "$UNIT_DIR/$file"
done
if have_systemd; then systemctl daemon-reload; fi

if [ "$package" = 1 ]; then
  [ -x "$OPT/bin/python" ] || python3 -m venv "$OPT"
  "$OPT/bin/pip" install --quiet --upgrade "$REPO"
  ln -sfn "$OPT/bin/saasquatch-agent" "$BIN/saasquatch-agent"
fi

cat <<EOF
saasquatch-agent is installed ($unit).
  configuration: $config$([ "$created_config" = 1 ] && echo " (new: set [sftp] host, port, username, remote_dir)")
  drop folder:   $state/drop  (add people who drop files: usermod -a -G $DROP_GROUP NAME)
Next steps:
  1. saasquatch-agent keygen $key
     and paste the printed public line into SaaSquatch (Integrations > SFTP Import Integration)
  2. saasquatch-agent trust-host --config $config
     (check the fingerprint with SaaSquatch; --fingerprint SHA256:... for scripted installs)
  3. saasquatch-agent doctor --config $config
  4. systemctl enable --now $unit && journalctl -u $unit -f
EOF

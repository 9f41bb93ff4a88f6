#!/usr/bin/env bash
# Run the README's two commands as a new user meets them: in a fresh Debian 12 root made with
# debootstrap from this machine's own apt sources, with nothing in it but Debian's minimal base,
# the Rust toolchain of this machine bind-mounted read-only (the one prerequisite the README
# names) and a clean clone of this repository's HEAD. Then `make demo` and `make test`, each timed.
#
#   sudo scripts/fresh-debian-check.sh [ROOT]     (default ROOT: /var/tmp/ferry-fresh-root)
#
# Too slow for every CI run: about 20 min in all on 2 cores (2026-12-04: debootstrap 25 s, then
# make demo, which installs the packages and builds everything, 111 s, and make test 782 s). The
# result is the last lines of the output and ROOT.log: each command's exit code and seconds.
# FRESH_KEEP=1 keeps the root afterwards (to look inside: chroot ROOT bash).
# FRESH_STEPS="demo test" chooses the commands (e.g. FRESH_STEPS=demo for a quicker look).
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "fresh-debian-check: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
root=${1:-/var/tmp/ferry-fresh-root}
log=$root.log
steps=${FRESH_STEPS:-demo test}
rust_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$cargo_bin/cargo" ] || { echo "fresh-debian-check: no rustup toolchain at $cargo_bin" >&2; exit 2; }

# The mirror and suite of this machine's Debian sources: deb822 (*.sources) or one-line (*.list),
# read at run time; the first enabled 'deb' entry whose suite is not -updates/-security.
mirror="" suite=""
read_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    while read -r typ rest; do
      [ "$typ" = deb ] || continue
      rest=$(sed -E 's/^\[[^]]*\] *//' <<<"$rest")
      read -r uri s _ <<<"$rest"
      case "$s" in *-updates|*-security|*/updates) continue ;; esac
      mirror=$uri suite=$s; return 0
    done < "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # One stanza per paragraph: Types, URIs, Suites.
    local out
    out=$(awk 'BEGIN{RS=""; FS="\n"}
      { t=""; u=""; s="";
        for (i=1;i<=NF;i++) {
          if ($i ~ /^Types:/) t=$i; if ($i ~ /^URIs:/) u=$i; if ($i ~ /^Suites:/) s=$i;
          if ($i ~ /^Enabled: *no/) t="";
        }
        if (t ~ /(^|[ :])deb( |$)/) {
          sub(/^URIs: */,"",u); split(u,uu," ");
          sub(/^Suites: */,"",s); n=split(s,ss," ");
          for (j=1;j<=n;j++) if (ss[j] !~ /-(updates|security)$/) { print uu[1], ss[j]; exit }
        } }' "$f")
    if [ -n "$out" ]; then read -r mirror suite <<<"$out"; return 0; fi
  done
  return 1
}
read_sources || { echo "fresh-debian-check: no Debian 'deb' source found in /etc/apt" >&2; exit 2; }

mounts=()
cleanup() {
  # Stop what the run left (the Slurm cluster's daemons, munged) by their root, then unmount.
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && kill -9 "${p#/proc/}" 2>/dev/null
  done
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
  # Anything a test mounted inside (tmpfs faults) and left behind.
  grep -o " $root/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ "${FRESH_KEEP:-0}" != 1 ]; then rm -rf --one-file-system "$root"; fi
}
trap cleanup EXIT

say() { echo "fresh-debian-check: $*" | tee -a "$log"; }
: > "$log"
command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
# A root left by a killed run: unmount what is still mounted inside it first, and never remove
# across a mount (the machine's /dev and /sys are bound in while a run lasts).
if [ -e "$root" ]; then
  grep -o " $root/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$root"
fi
say "debootstrap --variant=minbase $suite from $mirror into $root"
t0=$(date +%s)
debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
say "debootstrap took $(( $(date +%s) - t0 )) s"

# The machine's own apt sources, so that apt-get inside reaches what the host reaches.
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && cp "$f" "$root$f"
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The machine's own name, as every booted machine has it in /etc/hosts (debootstrap writes none:
# without it, Open MPI's MPI_Abort waited 10 s for a DNS lookup of the host name).
cp /etc/hosts "$root/etc/hosts"
[ -f /etc/hostname ] && cp /etc/hostname "$root/etc/hostname"
# The machine's own network trust (a site or proxy CA under /usr/local/share/ca-certificates),
# as a new machine of this kind has it: update-ca-certificates adds it once ca-certificates is
# installed by scripts/install-deps.sh.
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi

bind() { mkdir -p "$root$2"; mount "${@:3}" --bind "$1" "$root$2"; mounts+=("$root$2"); }
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
# The machine's /sys with everything mounted below it (the cgroup hierarchy slurmd needs), as a
# booted machine has it.
mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"; mounts+=("$root/sys")
bind /dev /dev
mount -t devpts devpts "$root/dev/pts" -o newinstance,ptmxmode=0666 2>/dev/null && mounts+=("$root/dev/pts") || true
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"; mounts+=("$root/dev/shm")
# The Rust toolchain, read-only: the README's one prerequisite besides root.
bind "$rust_home" /root/.rustup -o ro
mount -o remount,ro,bind "$root/root/.rustup"
bind "$cargo_bin" /root/.cargo/bin -o ro
mount -o remount,ro,bind "$root/root/.cargo/bin"

git clone -q "$repo" "$root/root/ferry"
say "clean clone of $(git -C "$repo" rev-parse --short HEAD) in $root/root/ferry"
[ -d "$repo/../shared" ] && cp -r "$repo/../shared" "$root/root/shared"

# A login environment as on a new machine: nothing of this shell's variables.
run_in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 USER=root \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    FERRY_SLURM_PORT=17817 FERRY_SLURM_DIR=/tmp/ferry-slurm \
    /bin/bash -c "cd /root/ferry && $1"
}

# `make` itself: the README's commands are make commands. Nothing else is added by hand.
run_in_root "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make >/dev/null"
have=""
for p in make gcc libc6-dev ca-certificates pkg-config libclang-dev libopenmpi-dev; do
  have="$have $p=$(chroot "$root" dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || echo absent)"
done
say "in the root before make:$have"

status=0
for step in $steps; do
  say "make $step: started $(date -u +%H:%M:%S)"
  t0=$(date +%s)
  set +e
  run_in_root "make $step" > "$root.$step.log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  say "make $step: exit $rc after $secs s (output: $root.$step.log)"
  tail -5 "$root.$step.log" | sed 's/^/    /' | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done
exit $status

# Shared by the fetch scripts that take a data set from a Debian package (sourced, not run).
# The caller sets, before sourcing:
#   me        the script's name, for messages;
#   dest      the cache directory the files go to;
#   package   the Debian package, and spec (package or package=version) to download;
#   deb_sha   the .deb's sha256; expected: how to name the expected package in an error;
#   src_dir   where the files sit inside the package;
#   files     an associative array: destination path (relative to dest) -> sha256; the source
#             file is src_dir/basename(path).
# and then calls `fetch_dataset` (which exits 0 early when every file is already there and
# verifies).

# True when every file is in dest with its checksum.
verified() {
  for f in "${!files[@]}"; do
    [ -f "$dest/$f" ] || return 1
    echo "${files[$f]}  $dest/$f" | sha256sum --check --status || return 1
  done
}

fetch_dataset() {
  if verified; then
    echo "$me: verified copy in $dest"
    exit 0
  fi
  for tool in apt-get dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null ||
      { echo "$me: $tool not found (needs a Debian-based system)" >&2; exit 1; }
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  download() { (cd "$work" && apt-get download -q "$spec" >"$work/apt.log" 2>&1); }
  echo "$me: apt-get download $spec"
  if ! download; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "$me: apt-get download failed (package lists missing?); running apt-get update as root"
      apt-get update -q >/dev/null || { echo "$me: apt-get update failed" >&2; exit 1; }
      download || {
        cat "$work/apt.log" >&2
        echo "$me: apt-get download $spec failed after apt-get update" >&2
        exit 1
      }
    else
      cat "$work/apt.log" >&2
      echo "$me: apt-get download $spec failed; if the package lists are missing," \
        "run 'apt-get update' as root (not done here: not running as root) and try again" >&2
      exit 1
    fi
  fi
  local debs=("$work"/"$package"_*_all.deb)
  [ -f "${debs[0]}" ] || { echo "$me: apt-get download produced no $package .deb" >&2; exit 1; }
  local deb=${debs[0]}
  echo "$deb_sha  $deb" | sha256sum --check --status ||
    { echo "$me: checksum mismatch for $(basename "$deb") (expected $expected)" >&2; exit 1; }
  echo "$me: $(basename "$deb") verified; extracting"
  dpkg-deb -x "$deb" "$work/root"
  for f in "${!files[@]}"; do
    local src
    src="$work/root/$src_dir/$(basename "$f")"
    echo "${files[$f]}  $src" | sha256sum --check --status ||
      { echo "$me: checksum mismatch for $(basename "$f")" >&2; exit 1; }
    mkdir -p "$(dirname "$dest/$f")"
    cp "$src" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
    echo "$me: $f ($(stat -c %s "$dest/$f") bytes) verified"
  done
  verified || { echo "$me: the copies in $dest do not verify" >&2; exit 1; }
  echo "$me: verified and copied into $dest"
}

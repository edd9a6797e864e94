#!/usr/bin/env bash
# Fetch the original Fashion-MNIST IDX files from Debian's package archive
# (the only registry reachable here that carries them) and verify them.
#
# Usage: tools/get_fashion_mnist.sh DIR
#   -> DIR/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
#
# Source: Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1
# (bookworm, main, Architecture: all). It ships the four .gz files under
# /usr/share/datasets/fashion-mnist/, but Debian's build step
# (strip-nondeterminism) rewrote each gzip header: FNAME removed, mtime set
# to the build time. The deflate streams, CRCs and sizes are untouched, so the
# original upstream .gz files are rebuilt byte for byte by putting the
# original 10-byte header + file name back. The md5 of the result must equal
# the upstream md5s published by zalandoresearch/fashion-mnist.
#
# FM_METHOD=source uses the Debian *source* package instead: its
# orig.tar.xz (46 MB) holds upstream's data/fashion/*.gz unmodified.
# Needs: apt-get, dpkg-deb, gzip, md5sum, sha256sum (and xz for source mode).
set -euo pipefail

die() { echo "get_fashion_mnist: ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
DEST="$1/FashionMNIST/raw"

PKG=dataset-fashion-mnist
VER='0.0~git20200523.55506a9-1'
DEB_SHA256=39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
ORIG_SHA256=094d3928be84192f9bb88f33ff2cfeef692db8ff1da67763f52318fbda5a2fd4
METHOD="${FM_METHOD:-deb}"

NAMES=(train-images-idx3-ubyte train-labels-idx1-ubyte
       t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
declare -A GZ_MD5=(
  [train-images-idx3-ubyte]=8d4fb7e6c68d591d4c3dfef9ec88bf0d
  [train-labels-idx1-ubyte]=25c81989df183df01b3e8a0aad5dffbe
  [t10k-images-idx3-ubyte]=bef4ecab320f06d8554ea6380940ec79
  [t10k-labels-idx1-ubyte]=bb300cfdad3c16e7a12a480ee83cd310
)
declare -A RAW_SHA256=(
  [train-images-idx3-ubyte]=c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
  [train-labels-idx1-ubyte]=bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
  [t10k-images-idx3-ubyte]=5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
  [t10k-labels-idx1-ubyte]=0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
)
# Original gzip MTIME fields (little-endian, as printf escapes).
declare -A GZ_MTIME=(
  [train-images-idx3-ubyte]='\xde\xe9\xa7\x59'
  [train-labels-idx1-ubyte]='\xde\xe9\xa7\x59'
  [t10k-images-idx3-ubyte]='\xf3\xe9\xa7\x59'
  [t10k-labels-idx1-ubyte]='\xf3\xe9\xa7\x59'
)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
APT_OPTS=(-o APT::Sandbox::User=root)

check_sha256() {  # file expected
  local got; got="$(sha256sum "$1" | cut -d' ' -f1)"
  [ "$got" = "$2" ] || die "sha256 mismatch for $1: got $got, want $2"
}

mkdir -p "$WORK/gz"
if [ "$METHOD" = deb ]; then
  (cd "$WORK" && apt-get "${APT_OPTS[@]}" download "$PKG=$VER") || {
    echo "get_fashion_mnist: apt-get download failed; running apt-get update and retrying" >&2
    apt-get update -qq
    (cd "$WORK" && apt-get "${APT_OPTS[@]}" download "$PKG=$VER")
  } || die "could not download $PKG=$VER (try FM_METHOD=source)"
  deb=("$WORK"/"${PKG}"_*_all.deb)
  check_sha256 "${deb[0]}" "$DEB_SHA256"
  dpkg-deb -x "${deb[0]}" "$WORK/x"
  for n in "${NAMES[@]}"; do
    src="$WORK/x/usr/share/datasets/fashion-mnist/$n.gz"
    [ -f "$src" ] || die "missing $src in the package"
    # Debian header is 10 bytes without FNAME (FLG=0); rebuild upstream's:
    # ID1 ID2 CM=8 FLG=FNAME MTIME XFL=0 OS=3(unix) name NUL, then the body.
    [ "$(head -c 4 "$src" | od -An -tx1 | tr -d ' \n')" = 1f8b0800 ] \
      || die "unexpected gzip header in $src"
    { printf '\x1f\x8b\x08\x08'; printf "${GZ_MTIME[$n]}"; printf '\x00\x03%s\x00' "$n"
      tail -c +11 "$src"; } > "$WORK/gz/$n.gz"
  done
elif [ "$METHOD" = source ]; then
  # Temporary deb-src list, leaving the system's apt configuration alone.
  mkdir -p "$WORK/apt/parts" "$WORK/apt/lists/partial" "$WORK/src"
  cat > "$WORK/apt/parts/src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  SRC_OPTS=("${APT_OPTS[@]}" -o Dir::Etc::SourceList=/dev/null
            -o Dir::Etc::SourceParts="$WORK/apt/parts"
            -o Dir::State::Lists="$WORK/apt/lists")
  apt-get "${SRC_OPTS[@]}" update -qq
  # The debian.tar.xz may be missing from the mirror; only orig.tar.xz matters.
  (cd "$WORK/src" && apt-get "${SRC_OPTS[@]}" source --download-only "$PKG=$VER") || true
  orig=("$WORK"/src/"${PKG}"_*.orig.tar.xz)
  [ -f "${orig[0]}" ] || die "could not download the source tarball of $PKG=$VER"
  check_sha256 "${orig[0]}" "$ORIG_SHA256"
  tar -xJf "${orig[0]}" -C "$WORK/src" --wildcards '*/data/fashion/*-ubyte.gz'
  for n in "${NAMES[@]}"; do
    cp "$WORK"/src/*/data/fashion/"$n.gz" "$WORK/gz/$n.gz"
  done
else
  die "FM_METHOD must be 'deb' or 'source', not '$METHOD'"
fi

# Verify the .gz files against the upstream md5s, then the uncompressed IDX.
for n in "${NAMES[@]}"; do
  got="$(md5sum "$WORK/gz/$n.gz" | cut -d' ' -f1)"
  [ "$got" = "${GZ_MD5[$n]}" ] || die "md5 mismatch for $n.gz: got $got, want ${GZ_MD5[$n]}"
  gzip -dc "$WORK/gz/$n.gz" > "$WORK/gz/$n"
  check_sha256 "$WORK/gz/$n" "${RAW_SHA256[$n]}"
  echo "get_fashion_mnist: OK $n.gz md5 ${GZ_MD5[$n]}; $n sha256 ${RAW_SHA256[$n]}"
done

mkdir -p "$DEST"
for n in "${NAMES[@]}"; do
  install -m 0644 "$WORK/gz/$n.gz" "$DEST/$n.gz"
  install -m 0644 "$WORK/gz/$n" "$DEST/$n"
done
echo "get_fashion_mnist: wrote verified files to $DEST"

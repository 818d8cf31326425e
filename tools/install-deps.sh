#!/bin/sh
# Installs the Debian packages the build, the tests and `make run` need.
# As root, missing packages are installed with apt-get; otherwise the
# missing ones are listed and the script fails.
#
# usage: tools/install-deps.sh [build|test|bench|asan]...

set -eu

build_pkgs="gcc make pkg-config nginx nginx-dev libpcre2-dev zlib1g-dev
libssl-dev liblua5.4-dev lua-cjson lua-cjson-dev libseccomp-dev
libhiredis-dev libmaxminddb-dev"
test_pkgs="perl libmaxmind-db-writer-perl redis-server curl nghttp2-client"
bench_pkgs="wrk libnginx-mod-http-lua lua-nginx-redis"
asan_pkgs="clang libclang-rt-14-dev"

want=""
[ $# -eq 0 ] && set -- build
for set in "$@"; do
    case "$set" in
    build) want="$want $build_pkgs" ;;
    test)  want="$want $build_pkgs $test_pkgs" ;;
    bench) want="$want $build_pkgs $test_pkgs $bench_pkgs" ;;
    asan)  want="$want $build_pkgs $test_pkgs $asan_pkgs" ;;
    *) echo "install-deps: unknown set \"$set\"" >&2; exit 2 ;;
    esac
done

missing=""
for p in $want; do
    case " $missing " in *" $p "*) continue ;; esac
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
         | grep -q "install ok installed"
    then
        missing="$missing $p"
    fi
done

[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages:$missing" >&2
    echo "install-deps: run as root, or: apt-get install$missing" >&2
    exit 1
fi

echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# do not start the packaged nginx or redis services
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
trap '[ $created_policy -eq 1 ] && rm -f "$policy"' EXIT
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends $missing

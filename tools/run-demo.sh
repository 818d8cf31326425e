#!/bin/sh
# Runs nginx in the foreground with the demo configuration of conf.d/
# (`make run` calls it after building).
#
#   BUILD       build directory (default: <repo>/build)
#   NGINX       nginx binary (default: /usr/sbin/nginx)
#   SBX_LISTEN  listen address (default: 127.0.0.1:8080)
#   SBX_UPSTREAM  listen address of the demo's toy CRM upstream
#               (default: 127.0.0.1:8081)
#
# The prefix is $BUILD/demo: nginx.conf, pid, logs and temporary files live
# there, so the demo never touches /etc/nginx or /var/lib/nginx.  Ctrl-C
# stops nginx.

set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$root/build}
nginx=${NGINX:-/usr/sbin/nginx}
listen=${SBX_LISTEN:-127.0.0.1:8080}
upstream=${SBX_UPSTREAM:-127.0.0.1:8081}

case "$build" in
/*) ;;
*) build=$root/$build ;;
esac

for f in "$build/ngx_http_sbx_module.so" "$build/sbx-lua-helper"; do
    if [ ! -f "$f" ]; then
        echo "run-demo: $f is missing: run make first" >&2
        exit 1
    fi
done

prefix=$build/demo
mkdir -p "$prefix"

# the workers (and the helpers, which drop root to "nobody") must be able
# to read the module, execute the helper and read the scripts
chmod 755 "$prefix"

sed -e "s|@BUILD@|$build|g" \
    -e "s|@ROOT@|$root|g" \
    -e "s|@PREFIX@|$prefix|g" \
    -e "s|@LISTEN@|$listen|g" \
    -e "s|@UPSTREAM@|$upstream|g" \
    "$root/conf.d/nginx.conf" > "$prefix/nginx.conf"

echo "run-demo: nginx on http://$listen/ (configuration: $prefix/nginx.conf)"
echo "run-demo: try  curl -d '{\"full_name\":\"Ada Lovelace\"}'" \
     "$listen/connectors/profile/"
echo "run-demo: connector mode: curl $listen/connectors/crm/customers/1001"

exec "$nginx" -p "$prefix" -c "$prefix/nginx.conf" -e stderr \
     -g 'daemon off;'

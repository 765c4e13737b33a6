#!/bin/sh
# Builds the libFuzzer targets into DIR (default build/fuzz): the core's C
# objects and llhttp with clang, -fsanitize=fuzzer-no-link,address (so the
# fuzzer sees their coverage and ASan checks them), then each harness with
# -fsanitize=fuzzer,address. Objects are rebuilt only when their source is
# newer. Usage: sh bench/fuzz/build.sh [DIR]   (run from the repository root)
set -eu
DIR=${1:-build/fuzz}
CC=${FUZZ_CC:-clang-14}
command -v "$CC" >/dev/null 2>&1 || CC=clang
command -v "$CC" >/dev/null 2>&1 || { echo "fuzz: clang not found (apt-get install clang)" >&2; exit 1; }
LLHTTP_SRC=/usr/share/llhttp
LLHTTP_INC=/usr/share/include/llhttp
LUA_INC=/usr/include/lua5.4
LUA_STATIC=/usr/lib/x86_64-linux-gnu/liblua5.4.a
PKG_CFLAGS=$(pkg-config --cflags libuv sqlite3 openssl)
PKG_LIBS=$(pkg-config --libs libuv sqlite3 openssl)
FLAGS="-g -O1 -fno-omit-frame-pointer -std=c11 -D_GNU_SOURCE"
SAN="-fsanitize=fuzzer-no-link,address"

mkdir -p "$DIR/obj"
objs=""
build() { # build SRC OBJ EXTRA...
    src=$1; obj=$2; shift 2
    if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ c/tn.h -nt "$obj" ] || [ c/net.h -nt "$obj" ]; then
        echo "  FUZZCC  $src"
        # product warnings are the product build's business (-Werror there)
        $CC $FLAGS $SAN -w -I"$LUA_INC" -I"$LLHTTP_INC" $PKG_CFLAGS "$@" -c "$src" -o "$obj"
    fi
    objs="$objs $obj"
}
for src in c/*.c; do
    case $src in c/main.c) continue ;; esac
    build "$src" "$DIR/obj/$(basename "$src" .c).o"
done
for f in llhttp api http; do
    build "$LLHTTP_SRC/$f.c" "$DIR/obj/llhttp_$f.o"
done
for t in http toml; do
    out="$DIR/${t}_fuzz"
    echo "  FUZZLD  $out"
    if [ "$t" = toml ]; then
        $CC $FLAGS -fsanitize=fuzzer,address -Wall -Wextra -Werror -I"$LUA_INC" "bench/fuzz/${t}_fuzz.c" \
            -o "$out" "$LUA_STATIC" -lm -ldl
    else
        $CC $FLAGS -fsanitize=fuzzer,address -Wall -Wextra -Werror -I"$LUA_INC" "bench/fuzz/${t}_fuzz.c" \
            $objs -o "$out" "$LUA_STATIC" $PKG_LIBS -lm -ldl
    fi
done

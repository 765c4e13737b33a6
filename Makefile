# tenement: build, dependencies, tests.
#
#   make            build build/ten, build/slum and build/lib/tenement/core.so
#   make deps       install the Debian packages the build and tests need (root)
#   make run        deps, build, then `ten serve` on config/tenement.toml
#   make test       deps, build, every spec (unit, core, e2e)
#   make asan       the same specs with AddressSanitizer + UBSan
#   make lint       luac -p on every Lua file, cppcheck on c/
#   make clean
#
# Knobs: CC, INIT_CC (builds the instances' init, default musl-gcc), V=1 (show
# commands), BUSTED_ARGS (e.g. "spec/core"), BUILD (dir).

CC      ?= cc
INIT_CC ?= musl-gcc
LUA     ?= lua5.4
BUILD   ?= build
V       ?=
Q       := $(if $(V),,@)

LLHTTP_SRC := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp
LUA_INC    := /usr/include/lua5.4
LUA_STATIC := /usr/lib/x86_64-linux-gnu/liblua5.4.a

PKGS       := libuv sqlite3 openssl
PKG_CFLAGS  = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS    = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

WARN     := -Wall -Wextra -Werror
# -O3 with link-time optimisation: 13% fewer instructions per proxied
# request than -O2 (callgrind, 50 connections), the HTTP callbacks and
# buffer helpers inlined across files.
CFLAGS   ?= -O3 -g -flto=auto
SAN      ?=
ALL_CFLAGS = -std=c11 $(WARN) $(CFLAGS) $(SAN) -fPIC -D_GNU_SOURCE -MMD -MP \
             -I$(LUA_INC) -I$(LLHTTP_INC) $(PKG_CFLAGS)
# llhttp's generated C has unused parameters; only those files get the exemption.
LLHTTP_CFLAGS = -std=c11 $(WARN) -Wno-unused-parameter $(CFLAGS) $(SAN) -fPIC -I$(LLHTTP_INC)

CORE_SRC := $(filter-out c/main.c,$(wildcard c/*.c))
CORE_OBJ := $(CORE_SRC:c/%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/init_image.o \
            $(BUILD)/obj/llhttp_llhttp.o $(BUILD)/obj/llhttp_api.o $(BUILD)/obj/llhttp_http.o
LUA_SRC  := $(shell find lua runtimes -name '*.lua' 2>/dev/null | LC_ALL=C sort)

FIXTURE_SRC := $(wildcard spec/fixtures/*.c)
FIXTURES    := $(FIXTURE_SRC:spec/fixtures/%.c=$(BUILD)/fixtures/%)

DEBIAN_PKGS := lua5.4 liblua5.4-dev libuv1-dev node-llhttp libsqlite3-dev lua-cjson \
               libssl-dev lua-busted pkg-config build-essential musl-tools e2fsprogs runsc
# Only the specs need these: promtool checks /metrics.
TEST_PKGS   := prometheus

.PHONY: all deps run test test-only asan lint clean install install-rock
all: $(BUILD)/ten $(BUILD)/slum $(BUILD)/lib/tenement/core.so $(FIXTURES) $(BUILD)/fixtures/no_threads.so

$(BUILD)/obj/%.o: c/%.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/obj/llhttp_%.o: $(LLHTTP_SRC)/%.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(LLHTTP_CFLAGS) -c $< -o $@

$(BUILD)/gen/embedded.c: c/embed.lua $(LUA_SRC)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  EMBED   $(words $(LUA_SRC)) Lua files")
	$(Q)$(LUA) c/embed.lua $@ $(LUA_SRC)

$(BUILD)/obj/embedded.o: $(BUILD)/gen/embedded.c
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

# PID 1 of namespaced instances: c/init.c alone, static, stripped, against
# musl. glibc's static start queries the CPU's caches and features with
# cpuid, a trap to the hypervisor on a VM (about 0.4 ms a start on the test
# machines); musl's asks nothing. Never sanitized: it has no Lua, no libuv,
# and a sanitizer runtime cannot link into it.
$(BUILD)/tenement-init: c/init.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  INITCC  $@")
	@command -v $(firstword $(INIT_CC)) >/dev/null || { echo "make: no $(firstword $(INIT_CC)) to build" \
	  "the instances' init: install musl-tools (make deps does), or set INIT_CC" >&2; exit 1; }
	$(Q)$(INIT_CC) -std=c11 $(WARN) -Os -static -s -D_GNU_SOURCE -DTN_INIT_ALONE -o $@ $<

# Its bytes, compiled into ten and core.so alike (core.proc.init_fd serves
# them), so ten stays one file and the specs run the very same init.
$(BUILD)/gen/init_image.c: $(BUILD)/tenement-init
	@mkdir -p $(@D)
	@$(if $(Q),echo "  EMBED   $<")
	$(Q){ echo '/* generated from $< (c/init.c built alone): do not edit */'; \
	  echo '#include <stddef.h>'; \
	  echo 'extern const unsigned char tn_init_image[];'; \
	  echo 'extern const size_t tn_init_image_size;'; \
	  echo 'const unsigned char tn_init_image[] = {'; \
	  od -An -v -tu1 $< | sed 's/^ *//; s/  */,/g; s/$$/,/'; \
	  echo '};'; \
	  echo 'const size_t tn_init_image_size = sizeof tn_init_image;'; } > $@.tmp && mv $@.tmp $@

$(BUILD)/obj/init_image.o: $(BUILD)/gen/init_image.c
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

# Lua is linked statically and its symbols exported (-Wl,-E) so C modules such
# as cjson.so, loaded at run time, find the API in this binary. libuv, SQLite
# and libcrypto are linked statically too: every `ten` command starts sooner
# without the dynamic relocations of those libraries.
STATIC_LIBS := $(wildcard /usr/lib/x86_64-linux-gnu/libuv_a.a /usr/lib/x86_64-linux-gnu/libsqlite3.a \
                 /usr/lib/x86_64-linux-gnu/libcrypto.a)
TEN_LIBS = $(if $(word 3,$(STATIC_LIBS)),$(STATIC_LIBS) -lpthread,$(PKG_LIBS))
$(BUILD)/ten: $(BUILD)/obj/main.o $(BUILD)/obj/embedded.o $(CORE_OBJ)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(SAN) -Wl,-E -o $@ $^ $(LUA_STATIC) $(TEN_LIBS) -lm -ldl

$(BUILD)/slum: $(BUILD)/ten
	$(Q)ln -sf ten $@

# The module must not link liblua: lua5.4 exports the API itself, and a second
# copy of Lua in one process breaks.
$(BUILD)/lib/tenement/core.so: $(CORE_OBJ)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LINK    $@")
	$(Q)$(CC) $(SAN) -shared -o $@ $^ $(PKG_LIBS)

$(BUILD)/fixtures/%: spec/fixtures/%.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) -std=c11 $(WARN) -O2 -g -D_GNU_SOURCE -o $@ $<

# Preloaded by specs into a process that can start no thread.
$(BUILD)/fixtures/no_threads.so: spec/fixtures/preload/no_threads.c
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) -std=c11 $(WARN) -O2 -shared -fPIC -o $@ $<

# The lean head parser's checker links it with llhttp, its oracle.
HEADCHECK_OBJ := $(BUILD)/obj/head.o $(BUILD)/obj/llhttp_llhttp.o $(BUILD)/obj/llhttp_api.o $(BUILD)/obj/llhttp_http.o
$(BUILD)/fixtures/headcheck: spec/fixtures/headcheck.c $(HEADCHECK_OBJ)
	@mkdir -p $(@D)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) -std=c11 $(WARN) $(CFLAGS) $(SAN) -D_GNU_SOURCE -Ic -I$(LLHTTP_INC) -o $@ $< $(HEADCHECK_OBJ)

deps:
	@missing=""; for p in $(DEBIAN_PKGS) $(TEST_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "  DEPS    installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	fi

run: deps
	$(Q)$(MAKE) --no-print-directory all
	$(BUILD)/ten serve --config config/tenement.toml

test: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory test-only

test-only:
	$(Q)TEN=$(abspath $(BUILD))/ten TEN_BUILD=$(abspath $(BUILD)) busted --lua=$(LUA) --cpath='$(BUILD)/lib/?.so' $(BUSTED_ARGS)

ASAN_LIB = $(shell $(CC) -print-file-name=libasan.so)
UBSAN_LIB = $(shell $(CC) -print-file-name=libubsan.so)
# Reports of every process (ten serve started by the e2e specs included) go
# to build-asan/reports: the run fails if any process wrote one.
ASAN_REPORTS = $(abspath build-asan)/reports
asan: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" CFLAGS="-O1 -g" all
	$(Q)rm -rf $(ASAN_REPORTS) && mkdir -p $(ASAN_REPORTS)
	$(Q)LD_PRELOAD="$(ASAN_LIB) $(UBSAN_LIB)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(ASAN_REPORTS)/asan \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(ASAN_REPORTS)/ubsan \
	  $(MAKE) --no-print-directory BUILD=build-asan test-only
	$(Q)if [ -n "$$(ls $(ASAN_REPORTS))" ]; then cat $(ASAN_REPORTS)/*; echo "make asan: sanitizer reports above" >&2; exit 1; fi
	@echo "make asan: no sanitizer report from any process"

lint:
	$(Q)for f in $(LUA_SRC) $$(find spec -name '*.lua'); do luac5.4 -p $$f || exit 1; done
	$(Q)if command -v luacheck >/dev/null; then luacheck --std lua54 --no-max-line-length -q lua runtimes config/hooks; fi
	$(Q)if command -v cppcheck >/dev/null; then cppcheck -q --error-exitcode=1 --enable=warning,performance \
	  --suppress=missingIncludeSystem -I$(LUA_INC) -I$(LLHTTP_INC) c/; fi

PREFIX ?= /usr/local
install: all
	install -D -m 0755 $(BUILD)/ten $(DESTDIR)$(PREFIX)/bin/ten
	ln -sf ten $(DESTDIR)$(PREFIX)/bin/slum

# luarocks (tenement-dev-1.rockspec) passes LUADIR and LIBDIR.
install-rock: $(BUILD)/lib/tenement/core.so
	@test -n "$(LUADIR)" -a -n "$(LIBDIR)" || { echo "install-rock needs LUADIR and LIBDIR" >&2; exit 1; }
	for f in $$(cd lua && find . -name '*.lua'); do install -D -m 0644 lua/$$f $(LUADIR)/$$f; done
	for f in $$(cd runtimes && find . -name '*.lua'); do install -D -m 0644 runtimes/$$f $(LUADIR)/tenement/runtimes/$$f; done
	install -D -m 0755 $(BUILD)/lib/tenement/core.so $(LIBDIR)/tenement/core.so

clean:
	rm -rf build build-asan

# ---- benchmarks, stress and fuzzing (bench/; never part of `make test`) ----
#   make bench  [BENCH="proxy spawn density logs scale"]  results: bench/results/latest.{md,json}
#   make stress [STRESS="kill9 serve-kill conns slowloris malformed fuzz"] [FUZZ_SECONDS=60]
#   make fuzz   [FUZZ_SECONDS=60]  libFuzzer + ASan (clang), targets http, head and toml
# Knobs read by bench/: BENCH_SECONDS (wrk run length), BENCH_PROXY_ROUNDS, BENCH_IDLE_SECONDS, BENCH_KEEP=1.
BENCH        ?=
STRESS       ?=
FUZZ_SECONDS ?= 60
FUZZ_DIR      = $(BUILD)/fuzz
BENCH_ENV     = BUILD=$(BUILD) LUA_PATH='bench/?.lua;lua/?.lua;;' LUA_CPATH='$(BUILD)/lib/?.so;;'

.PHONY: bench stress fuzz
bench: all
	$(Q)$(BENCH_ENV) $(LUA) bench/run.lua $(BENCH)

stress: all
	$(Q)INIT_IMAGE=$(BUILD)/gen/init_image.c sh bench/fuzz/build.sh $(FUZZ_DIR)
	$(Q)$(BENCH_ENV) FUZZ_DIR=$(FUZZ_DIR) FUZZ_SECONDS=$(FUZZ_SECONDS) $(LUA) bench/stress.lua $(STRESS)

fuzz: $(BUILD)/gen/init_image.c
	$(Q)INIT_IMAGE=$(BUILD)/gen/init_image.c sh bench/fuzz/build.sh $(FUZZ_DIR)
	$(Q)sh bench/fuzz/run.sh $(FUZZ_DIR) $(FUZZ_SECONDS) http head toml

-include $(wildcard $(BUILD)/obj/*.d)

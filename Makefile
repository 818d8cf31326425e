SHELL := /bin/bash
# ngx_sbx_module: build, test, run, bench, install.
#
#   make            module (build/ngx_http_sbx_module.so) and helper
#                   (build/sbx-lua-helper)
#   make run        nginx in the foreground on 127.0.0.1:8080 with conf.d/
#   make test       every test (t/, prove)
#   make bench      benchmarks (bench/)
#   make soak       mixed traffic for DURATION seconds, fails on growth,
#                   a non-contract answer or a worker crash (tools/soak.pl)
#   make install    into Debian's nginx module directory

TOP        := $(CURDIR)
BUILD      ?= $(TOP)/build
NGX_SRC    := /usr/share/nginx/src
NGX_BUILD  := $(BUILD)/nginx
MODDIR     ?= /usr/lib/nginx/modules
NGINX      ?= /usr/sbin/nginx
PROVE      ?= prove

CC         ?= cc
SBX_CFLAGS ?= -O2 -g
HELPER_CFLAGS := $(SBX_CFLAGS) -std=gnu11 -Wall -Wextra -Werror \
                 -Wno-unused-parameter -D_FORTIFY_SOURCE=2 \
                 -fstack-protector-strong -fPIE
HELPER_LDFLAGS := -pie -Wl,-z,relro,-z,now
HELPER_LIBS := -llua5.4-cjson -llua5.4 -lseccomp -lcrypto -lm

HELPER_SRCS := $(wildcard lua-runtime/*.c)
HELPER_HDRS := $(wildcard lua-runtime/*.h)
MODULE_SRCS := $(wildcard ngx_sbx_module/*.c ngx_sbx_module/*.h)

DEPS_STAMP := $(BUILD)/.deps-build

.PHONY: all deps deps-test run test bench install clean helper module

all: module helper

deps: $(DEPS_STAMP)

$(DEPS_STAMP): tools/install-deps.sh
	@mkdir -p $(BUILD)
	sh tools/install-deps.sh build
	@touch $@

deps-test:
	sh tools/install-deps.sh test

helper: $(BUILD)/sbx-lua-helper

module: $(BUILD)/ngx_http_sbx_module.so

$(BUILD)/sbx-lua-helper: $(HELPER_SRCS) $(HELPER_HDRS) | $(DEPS_STAMP)
	@mkdir -p $(BUILD)
	$(CC) $(HELPER_CFLAGS) $$(pkg-config --cflags lua5.4) -o $@ \
	    $(HELPER_SRCS) $(HELPER_LDFLAGS) $(HELPER_LIBS)

$(NGX_BUILD)/Makefile: config | $(DEPS_STAMP)
	rm -rf $(NGX_BUILD)
	mkdir -p $(BUILD)
	cp -a $(NGX_SRC) $(NGX_BUILD)
	cd $(NGX_BUILD) && . ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(SBX_CFLAGS) $(NGX_EXTRA_CFLAGS) -fPIC" \
	        --with-ld-opt="$(NGX_EXTRA_LDFLAGS)" \
	        --add-dynamic-module=$(TOP) > $(BUILD)/configure.log 2>&1 \
	    || { tail -5 $(BUILD)/configure.log; exit 1; }

$(BUILD)/ngx_http_sbx_module.so: $(NGX_BUILD)/Makefile $(MODULE_SRCS) \
                                 lua-runtime/sbx_proto.c lua-runtime/sbx_proto.h
	$(MAKE) -C $(NGX_BUILD) -f objs/Makefile modules
	cp $(NGX_BUILD)/objs/ngx_http_sbx_module.so $@

run: all
	sh tools/run-demo.sh

test: all
	sh tools/install-deps.sh test
	$(PROVE) -r t/

bench: all
	sh tools/install-deps.sh bench
	sh bench/run.sh

install: all
	install -d $(DESTDIR)$(MODDIR)
	install -m 644 $(BUILD)/ngx_http_sbx_module.so $(DESTDIR)$(MODDIR)/
	install -m 755 $(BUILD)/sbx-lua-helper $(DESTDIR)$(MODDIR)/

# make soak [DURATION=600]: tools/soak.pl drives mixed traffic (transforms,
# rate-limited keys, residency denials, about 1 % hostile scripts) and
# samples RSS, descriptors and helper restarts; see docs/operations.md.
.PHONY: soak
DURATION ?= 120
soak: all
	sh tools/install-deps.sh test
	SBX_BUILD=$(BUILD) perl tools/soak.pl --duration $(DURATION)

clean:
	rm -rf $(BUILD)

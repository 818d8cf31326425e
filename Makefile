SHELL := /bin/bash
# ngx_sbx_module: build, test, run, bench, install.
#
#   make            module (build/ngx_http_sbx_module.so), helper
#                   (build/sbx-lua-helper) and audit chain verifier
#                   (build/sbx-audit-verify, run by tools/sbx-audit-verify)
#   make run        nginx in the foreground on 127.0.0.1:8080 with conf.d/
#   make test       every test (t/, prove)
#   make test-asan  every test, module and helper under ASan and UBSan
#   make fuzz       libFuzzer targets (fuzz/), FUZZ_TIME seconds each
#   make bench      benchmarks (bench/)
#   make soak       mixed traffic for DURATION seconds, fails on growth,
#                   a non-contract answer or a worker crash (tools/soak.pl)
#   make install    into Debian's nginx module directory

TOP        := $(CURDIR)
BUILD      ?= $(TOP)/build
NGX_SRC    := /usr/share/nginx/src
NGX_BUILD  := $(BUILD)/nginx
MODDIR     ?= /usr/lib/nginx/modules
SBINDIR    ?= /usr/sbin
NGINX      ?= /usr/sbin/nginx
PROVE      ?= prove

CC         ?= cc
SBX_CFLAGS ?= -O2 -g
HELPER_CFLAGS := $(SBX_CFLAGS) -std=gnu11 -Wall -Wextra -Werror \
                 -Wno-unused-parameter -D_FORTIFY_SOURCE=2 \
                 -fstack-protector-strong -fPIE
HELPER_CFLAGS += $(HELPER_EXTRA_CFLAGS)
HELPER_LDFLAGS := -pie -Wl,-z,relro,-z,now
HELPER_LIBS := -llua5.4-cjson -llua5.4 -lseccomp -lcrypto -lm

HELPER_SRCS := $(wildcard lua-runtime/*.c)
HELPER_HDRS := $(wildcard lua-runtime/*.h)
MODULE_SRCS := $(wildcard ngx_sbx_module/*.c ngx_sbx_module/*.h)

DEPS_STAMP := $(BUILD)/.deps-build
# the compiler and flags of this build directory: a change rebuilds
FLAGS_STAMP := $(BUILD)/.flags

.PHONY: all deps deps-test run test bench install clean helper module
.PHONY: verify
.PHONY: test-asan fuzz fuzz-build FORCE
.DELETE_ON_ERROR:

all: module helper verify

deps: $(DEPS_STAMP)

$(DEPS_STAMP): tools/install-deps.sh
	@mkdir -p $(BUILD)
	sh tools/install-deps.sh build
	@touch $@

deps-test:
	sh tools/install-deps.sh test

$(FLAGS_STAMP): FORCE
	@mkdir -p $(BUILD)
	@printf '%s\n' '$(CC) $(HELPER_CFLAGS)' '$(NGX_EXTRA_CFLAGS)' \
	    '$(NGX_EXTRA_LDFLAGS)' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

helper: $(BUILD)/sbx-lua-helper

verify: $(BUILD)/sbx-audit-verify

module: $(BUILD)/ngx_http_sbx_module.so

$(BUILD)/sbx-lua-helper: $(HELPER_SRCS) $(HELPER_HDRS) $(FLAGS_STAMP) \
                         | $(DEPS_STAMP)
	@mkdir -p $(BUILD)
	$(CC) $(HELPER_CFLAGS) $$(pkg-config --cflags lua5.4) -o $@ \
	    $(HELPER_SRCS) $(HELPER_LDFLAGS) $(HELPER_LIBS)

$(BUILD)/sbx-audit-verify: tools/sbx_audit_verify.c $(FLAGS_STAMP) \
                           | $(DEPS_STAMP)
	@mkdir -p $(BUILD)
	$(CC) $(HELPER_CFLAGS) $$(pkg-config --cflags lua5.4) -o $@ \
	    tools/sbx_audit_verify.c $(HELPER_LDFLAGS) \
	    -llua5.4-cjson -llua5.4 -lcrypto -lm

$(NGX_BUILD)/objs/Makefile: config $(FLAGS_STAMP) | $(DEPS_STAMP)
	rm -rf $(NGX_BUILD)
	mkdir -p $(BUILD)
	cp -a $(NGX_SRC) $(NGX_BUILD)
	cd $(NGX_BUILD) && . ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(SBX_CFLAGS) $(NGX_EXTRA_CFLAGS) -fPIC" \
	        --with-ld-opt="$(NGX_EXTRA_LDFLAGS)" \
	        --add-dynamic-module=$(TOP) > $(BUILD)/configure.log 2>&1 \
	    || { tail -5 $(BUILD)/configure.log; exit 1; }

$(BUILD)/ngx_http_sbx_module.so: $(NGX_BUILD)/objs/Makefile $(MODULE_SRCS) \
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
	BUILD=$(BUILD) sh bench/run.sh

install: all
	install -d $(DESTDIR)$(MODDIR)
	install -m 644 $(BUILD)/ngx_http_sbx_module.so $(DESTDIR)$(MODDIR)/
	install -m 755 $(BUILD)/sbx-lua-helper $(DESTDIR)$(MODDIR)/
	install -d $(DESTDIR)$(SBINDIR)
	install -m 755 $(BUILD)/sbx-audit-verify $(DESTDIR)$(SBINDIR)/

# make test-asan: the module and the helper built by clang with
# AddressSanitizer and UndefinedBehaviorSanitizer into $(ASAN_BUILD), and
# the whole suite run against them.  nginx stays the distro binary: the
# wrapper $(ASAN_BUILD)/nginx-asan (SBX_NGINX) LD_PRELOADs the ASan runtime,
# which the module's undefined __asan_* and __ubsan_* symbols bind to.  The
# helper is built with SBX_SANITIZE: the few sanitizer-only seccomp
# allowances of docs/security.md.  nginx processes (ASAN_OPTIONS log_path)
# and helpers (compiled-in, SBX_SANITIZE_LOG) write every report to
# $(SAN_LOG); a non-empty file there fails the target, as does any test.
ASAN_BUILD ?= $(TOP)/build-asan
SAN_FLAGS  := -fsanitize=address,undefined -fno-omit-frame-pointer
SAN_LOG    := $(ASAN_BUILD)/sanitizer-logs
SAN_RT      = $(shell clang -print-file-name=libclang_rt.asan-x86_64.so)
SAN_HELPER_CFLAGS := -Wno-missing-field-initializers \
                     -DSBX_SANITIZE_LOG=\"$(SAN_LOG)\"
SAN_NGINX_OPTIONS := log_path=$(SAN_LOG)/nginx:detect_leaks=0:color=never

test-asan:
	sh tools/install-deps.sh asan
	$(MAKE) BUILD=$(ASAN_BUILD) CC=clang \
	    SBX_CFLAGS="-O1 -g $(SAN_FLAGS) -DSBX_SANITIZE \
	        -fsanitize-ignorelist=$(TOP)/tools/asan-ignore.txt" \
	    HELPER_EXTRA_CFLAGS='$(SAN_HELPER_CFLAGS)' \
	    NGX_EXTRA_LDFLAGS="$(SAN_FLAGS)" all
	rm -rf $(SAN_LOG)
	mkdir -m 1777 -p $(SAN_LOG)
	printf '#!/bin/sh\nexport LD_PRELOAD=%s\nexport ASAN_OPTIONS=%s\nexport UBSAN_OPTIONS=%s\nexec %s "$$@"\n' \
	    '$(SAN_RT)' '$(SAN_NGINX_OPTIONS)' \
	    '$(SAN_NGINX_OPTIONS):print_stacktrace=1' '$(NGINX)' \
	    > $(ASAN_BUILD)/nginx-asan
	chmod 755 $(ASAN_BUILD)/nginx-asan
	sh tools/install-deps.sh test
	SBX_BUILD=$(ASAN_BUILD) SBX_NGINX=$(ASAN_BUILD)/nginx-asan \
	    $(PROVE) -r t/; rc=$$?; \
	    reports=$$(find $(SAN_LOG) -type f -size +0); \
	    for f in $$reports; do echo "== $$f"; head -40 $$f; done; \
	    if [ -n "$$reports" ]; then \
	        echo "test-asan: sanitizer reports in $(SAN_LOG)"; exit 1; \
	    fi; \
	    echo "test-asan: no sanitizer report"; exit $$rc

# make fuzz: libFuzzer targets of fuzz/ (clang -fsanitize=fuzzer,address,
# undefined) built into $(FUZZ_BUILD), each run for FUZZ_TIME seconds from
# its committed seeds (fuzz/corpus/TARGET/, dictionary fuzz/corpus/
# TARGET.dict); what they find is kept in $(FUZZ_BUILD)/corpus/TARGET.
# A crash, a sanitizer report or a failed check fails the target.
FUZZ_BUILD   ?= $(TOP)/build-fuzz
FUZZ_TIME    ?= 60
FUZZ_TARGETS := proto call result params audit
FUZZ_CFLAGS  := -O1 -g -fsanitize=fuzzer,address,undefined \
                -fno-omit-frame-pointer -std=gnu11 -Wall -Wextra -Werror \
                -Wno-unused-parameter -Wno-missing-field-initializers \
                -Ilua-runtime -Ingx_sbx_module
FUZZ_SRCS    := $(filter-out lua-runtime/sbx_main.c lua-runtime/sbx_run.c, \
                    $(HELPER_SRCS)) \
                ngx_sbx_module/ngx_http_sbx_gcra.c

$(FUZZ_BUILD)/fuzz-%: fuzz/fuzz_%.c fuzz/fuzz_common.h fuzz/fuzz_check.h \
                      $(FUZZ_SRCS) $(HELPER_HDRS)
	@mkdir -p $(FUZZ_BUILD)
	clang $(FUZZ_CFLAGS) $$(pkg-config --cflags lua5.4) -o $@ $< \
	    $(FUZZ_SRCS) $(HELPER_LIBS)

# the audit verifier's line parser: its own program, no helper sources
$(FUZZ_BUILD)/fuzz-audit: fuzz/fuzz_audit.c fuzz/fuzz_check.h \
                          tools/sbx_audit_verify.c
	@mkdir -p $(FUZZ_BUILD)
	clang $(FUZZ_CFLAGS) $$(pkg-config --cflags lua5.4) -o $@ $< \
	    -llua5.4-cjson -llua5.4 -lcrypto -lm

fuzz-build: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz-%)

fuzz:
	sh tools/install-deps.sh asan
	$(MAKE) fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	    echo "fuzz: $$t for $(FUZZ_TIME)s"; \
	    ( cd $(FUZZ_BUILD) && ./fuzz-$$t -max_total_time=$(FUZZ_TIME) \
	        -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 \
	        $$(test -f $(TOP)/fuzz/corpus/$$t.dict \
	           && echo -dict=$(TOP)/fuzz/corpus/$$t.dict) \
	        corpus/$$t $(TOP)/fuzz/corpus/$$t ) > $(FUZZ_BUILD)/$$t.log 2>&1; \
	    rc=$$?; \
	    grep -E '^#[0-9]+ +DONE|^stat::number_of_executed_units|^stat::peak' \
	        $(FUZZ_BUILD)/$$t.log | sed "s/^/fuzz: $$t: /"; \
	    if [ $$rc -ne 0 ]; then \
	        tail -60 $(FUZZ_BUILD)/$$t.log; \
	        echo "fuzz: $$t FAILED (exit $$rc, $(FUZZ_BUILD)/$$t.log)"; \
	        exit 1; \
	    fi; \
	done

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

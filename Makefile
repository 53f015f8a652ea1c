# clhclip build. `make` builds the library (static + shared), the Lua module and the
# tests; `make test` runs every C and Lua test; `make deps` installs Debian packages.
# BUILD selects the output directory (default build/).

BUILD ?= build
CC ?= cc
PKGS := OpenCL clblast openblas libutf8proc libcjson zlib
DEB_PACKAGES := ocl-icd-opencl-dev pocl-opencl-icd libclblast-dev liblua5.4-dev lua5.4 \
                libstb-dev libcmocka-dev libutf8proc-dev libcjson-dev zlib1g-dev libopenblas-dev \
                pkg-config make gcc

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
LUA_CFLAGS := $(shell pkg-config --cflags lua5.4 2>/dev/null)

WARN := -Wall -Wextra -Werror -Wno-unused-parameter
CFLAGS ?= -O2 -g
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE $(WARN) -fPIC $(CFLAGS) -Iclhclip -I$(BUILD)/gen \
              -I/usr/include/stb $(PKG_CFLAGS)
LIBS := $(PKG_LIBS) -lm -lpthread

LIB_SRCS := $(sort $(wildcard clhclip/*.c))
LIB_OBJS := $(LIB_SRCS:clhclip/%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/kernels_embed.o
KERNELS := $(sort $(wildcard kernels/*.cl))
HEADERS := $(wildcard clhclip/*.h)
TEST_SRCS := $(sort $(wildcard tests/test_*.c))
TEST_BINS := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)

STATIC_LIB := $(BUILD)/libclhclip.a
SHARED_LIB := $(BUILD)/libclhclip.so
LUA_MODULE := $(BUILD)/clhclip.so

.PHONY: all lib lua tests test demo deps format check-format clean
all: lib lua tests

lib: $(STATIC_LIB) $(SHARED_LIB)
lua: $(LUA_MODULE)
tests: $(TEST_BINS)

$(BUILD)/gen/kernels_embed.c: $(KERNELS) kernels/embed.sh
	@mkdir -p $(dir $@)
	sh kernels/embed.sh $@ $(KERNELS)

$(BUILD)/obj/kernels_embed.o: $(BUILD)/gen/kernels_embed.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: clhclip/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(STATIC_LIB): $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(SHARED_LIB): $(LIB_OBJS)
	$(CC) -shared -o $@ $^ $(LIBS)

# The Lua module does not link liblua: lua5.4 exports the C API (toolchain.md 5).
LUA_SRCS := $(sort $(wildcard lua/*.c))
$(LUA_MODULE): $(LUA_SRCS) lua/binding.h $(STATIC_LIB) $(HEADERS)
	$(CC) $(ALL_CFLAGS) $(LUA_CFLAGS) -Ilua -shared -o $@ $(LUA_SRCS) $(STATIC_LIB) $(LIBS)

$(BUILD)/tests/%: tests/%.c tests/testutil.h $(STATIC_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Itests -o $@ $< $(STATIC_LIB) $(LIBS) -lcmocka

test: all
	BUILD=$(BUILD) sh tests/run_tests.sh $(TEST_BINS)

demo: deps all
	lua5.4 scripts/demo.lua

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: all Debian packages present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "deps: installing$$missing"; apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	else echo "deps: missing$$missing; run 'sudo make deps'"; exit 1; fi

format:
	clang-format -i clhclip/*.c clhclip/*.h lua/*.c lua/*.h tests/*.c tests/*.h

check-format:
	clang-format --dry-run --Werror clhclip/*.c clhclip/*.h lua/*.c lua/*.h tests/*.c tests/*.h

clean:
	rm -rf $(BUILD)

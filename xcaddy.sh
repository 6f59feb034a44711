#!/usr/bin/env bash
# xcaddy.sh: build, run, test and benchmark etcaddy from a fresh clone.
#
#   ./xcaddy.sh build [--output PATH]   Caddy with etcaddy compiled in (default ./caddy)
#   ./xcaddy.sh run [CADDYFILE]         build, then serve the single-member default on
#                                       http://127.0.0.1:2379 (or the given Caddyfile)
#   ./xcaddy.sh test                    install the test tools, then gofmt, vet, staticcheck, go test -race
#   ./xcaddy.sh bench                   build, then run etcaddy and a real etcd side by side
#
# Needs Go 1.26; `test` also installs Debian's etcd-server and etcd-client (the reference
# server and etcdctl) and python3-etcd (a v2 client) with apt-get, and runs as root (the DNS
# SRV tests give processes a resolv.conf of their own with unshare and a DNS server on port 53
# of a loopback address; the power-loss test mounts a FUSE file system on /dev/fuse). Never
# reads standard input.
set -euo pipefail

readonly CADDY_VERSION=v2.11.9
readonly XCADDY_VERSION=v0.4.5
readonly STATICCHECK_VERSION=v0.8.2 # staticcheck 2026.2.2: the first release that reads Go 1.26 code
readonly MODULE=github.com/etcaddy/etcaddy

die() {
	echo "xcaddy.sh: $*" >&2
	exit 1
}

# Resolve --output against the caller's directory before moving to the repository root.
callerdir=$PWD
cd "$(dirname "$0")"
repo=$PWD

command -v go >/dev/null || die "go is not on PATH (Go 1.26 is required)"
gobin=$(go env GOBIN)
[[ -n $gobin ]] || gobin="$(go env GOPATH)/bin"
export PATH="$gobin:$PATH"

usage() {
	sed -n '2,8p' "$repo/xcaddy.sh" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

ensure_xcaddy() {
	if ! command -v xcaddy >/dev/null; then
		echo "xcaddy.sh: installing xcaddy $XCADDY_VERSION"
		go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"
	fi
	command -v xcaddy >/dev/null || die "xcaddy is still missing after go install"
}

# stale PATH: true when PATH is missing or older than a Go source, go.mod or go.sum of the
# repository. Test files and testdata never reach the binary, so they don't count.
stale() {
	local bin=$1
	[[ -x $bin ]] || return 0
	local newer
	newer=$(find . -path ./.git -prune -o -path '*/testdata' -prune -o \
		\( \( -name '*.go' ! -name '*_test.go' \) -o -name go.mod -o -name go.sum \) \
		-newer "$bin" -print -quit)
	[[ -n $newer ]]
}

build() {
	local out=$repo/caddy
	while (($#)); do
		case $1 in
		--output)
			(($# >= 2)) || die "--output needs a path"
			out=$2
			shift 2
			;;
		--output=*)
			out=${1#--output=}
			shift
			;;
		*) die "build: unknown argument $1" ;;
		esac
	done
	[[ $out == /* ]] || out=$callerdir/$out

	if ! stale "$out"; then
		echo "xcaddy.sh: $out is up to date"
		return 0
	fi
	ensure_xcaddy
	# The module path is not published, and the Go proxy reachable here answers 403 for it
	# instead of 404/410, so the `go get` inside xcaddy stops there instead of falling back to
	# the --replace directory. Chain the configured proxies with '|' (go on after any error)
	# and end with the module cache as a file:// proxy: every real dependency still comes from
	# the proxy (or the cache, offline), and the last word on the unpublished path is a plain
	# "not found", after which Go uses the replacement.
	local proxies cache
	proxies=$(go env GOPROXY | tr ',|' '\n\n' | grep -v -x -e direct -e off -e '' | paste -s -d '|' || true)
	cache=$(go env GOMODCACHE)/cache/download
	echo "xcaddy.sh: building $out (caddy $CADDY_VERSION + $MODULE)"
	GOPROXY="${proxies:+$proxies|}file://$cache" GOFLAGS="$(go env GOFLAGS) -mod=mod" \
		xcaddy build "$CADDY_VERSION" \
		--with "$MODULE/caddymodule" \
		--replace "$MODULE=$repo" \
		--output "$out"
}

# apt_install PKG...: Debian packages, as root or through sudo, without prompts.
apt_install() {
	local sudo=()
	if [[ $(id -u) != 0 ]]; then
		command -v sudo >/dev/null || die "need root or sudo to install $*"
		sudo=(sudo -n)
	fi
	command -v apt-get >/dev/null || die "apt-get is missing: install $* by hand"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" </dev/null
}

install_test_tools() {
	local pkgs=()
	command -v etcd >/dev/null || pkgs+=(etcd-server)
	command -v etcdctl >/dev/null || pkgs+=(etcd-client)
	# python-etcd, the Python v2 client, for Debian's own Python 3 (a python3 earlier on PATH
	# may be another installation that cannot see Debian's packages).
	/usr/bin/python3 -c 'import etcd' 2>/dev/null || pkgs+=(python3-etcd)
	# unshare and mount give the DNS SRV tests' processes a resolv.conf of their own.
	command -v unshare >/dev/null || pkgs+=(util-linux)
	command -v mount >/dev/null || pkgs+=(mount)
	if ((${#pkgs[@]})); then
		echo "xcaddy.sh: installing ${pkgs[*]}"
		apt_install "${pkgs[@]}"
	fi
	ensure_xcaddy
	if ! command -v staticcheck >/dev/null; then
		echo "xcaddy.sh: installing staticcheck $STATICCHECK_VERSION"
		go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
	fi
	local tool missing=()
	for tool in etcd etcdctl xcaddy staticcheck unshare mount; do
		command -v "$tool" >/dev/null || missing+=("$tool")
	done
	/usr/bin/python3 -c 'import etcd' 2>/dev/null || missing+=(python3-etcd)
	((${#missing[@]} == 0)) || die "still missing after install: ${missing[*]}"
	# The power-loss test mounts a FUSE file system (as root, with the mount syscall).
	[[ -c /dev/fuse ]] || die "/dev/fuse is missing: the power-loss test needs the kernel's FUSE"
}

run_tests() {
	install_test_tools
	build

	echo "xcaddy.sh: gofmt"
	local unformatted
	unformatted=$(gofmt -l .)
	[[ -z $unformatted ]] || die "gofmt -l lists:"$'\n'"$unformatted"
	echo "xcaddy.sh: go vet"
	go vet ./...
	echo "xcaddy.sh: staticcheck"
	staticcheck ./...

	# -v so the summary below can count tests (fuzz targets run their seed corpora here as
	# ordinary tests); the full log stays in a file, the console gets all but the RUN lines.
	local log rcfile rc
	log=$(mktemp -t etcaddy-test.XXXXXX.log)
	rcfile=$(mktemp -t etcaddy-test-rc.XXXXXX)
	echo "xcaddy.sh: go test -race (full log: $log)"
	{
		set +e
		ETCADDY_CADDY_BIN=$repo/caddy ETCADDY_PYTHON=/usr/bin/python3 go test -race -count=1 -timeout 30m -v ./... 2>&1
		echo $? >"$rcfile"
	} | tee "$log" | grep --line-buffered -v -E '^[[:space:]]*=== (RUN|PAUSE|CONT|NAME)' || true
	rc=$(<"$rcfile")
	rm -f "$rcfile"

	local passed failed skipped
	passed=$(grep -cE '^[[:space:]]*--- PASS' "$log" || true)
	failed=$(grep -cE '^[[:space:]]*--- FAIL' "$log" || true)
	skipped=$(grep -cE '^[[:space:]]*--- SKIP' "$log" || true)
	echo
	echo "== go test summary =="
	grep -E '^(ok|FAIL|\?)[[:space:]]' "$log" || true
	# Subtests and fuzz seeds count one each.
	echo "tests: $passed passed, $failed failed, $skipped skipped"
	if ((failed)); then
		echo "failed:"
		grep -E '^[[:space:]]*--- FAIL' "$log" || true
	fi
	[[ $rc == 0 ]] || die "go test failed (exit $rc)"
}

bench() {
	build
	ETCADDY_CADDY_BIN=$repo/caddy go test -run '^$' -bench 'BenchmarkVsEtcd|BenchmarkClusterVsEtcd' -benchtime 1x -timeout 60m ./caddymodule/
}

(($#)) || usage
cmd=$1
shift
case $cmd in
build) build "$@" ;;
run)
	(($# <= 1)) || die "run takes at most one argument: a Caddyfile"
	build
	config=${1:-}
	if [[ -z $config ]]; then
		# The single-member default. Caddyfile.example is a three-member
		# HTTPS cluster, which needs certificates and two more machines.
		# Loopback only and any host name (127.0.0.1 or localhost), as
		# etcd's default listener.
		mkdir -p "$repo/etcaddy-data"
		config=$repo/etcaddy-data/Caddyfile
		printf '{\n\traftkv {\n\t\tdata_dir %s\n\t}\n}\n\nhttp://:2379 {\n\tbind 127.0.0.1\n\tetcd\n}\n' \
			"$repo/etcaddy-data/default" >"$config"
	elif [[ $config != /* ]]; then
		config=$callerdir/$config
	fi
	exec ./caddy run --config "$config" --adapter caddyfile
	;;
test)
	(($# == 0)) || die "test takes no arguments"
	run_tests
	;;
bench)
	(($# == 0)) || die "bench takes no arguments"
	bench
	;;
*) usage ;;
esac

// Package redistest starts the Redis servers redlatch's tests run against:
// miniredis always; a real redis-server (single node) and a local 3-master
// Redis Cluster whenever redis-server can be run.
//
// Every test that takes a Backend runs on each of them:
//
//	func TestX(t *testing.T) {
//		redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
//			rdb := b.Client(t)
//			key := redistest.UniqueName(t)
//			...
//		})
//	}
//
// and the package's TestMain calls Main, which stops the shared servers and
// fails the run when a goroutine outlives the tests. ForEach runs the
// backends at the same time (ForEachInTurn one after the other), and
// Together runs a test's own subtests at once: the suite mostly waits on
// leases and timeouts, and takes about half as long so.
//
// Environment:
//
//   - REDLATCH_REQUIRE_REDIS=1 turns a missing redis-server from a skip of
//     the real backends into a test failure (use it in CI).
//   - REDLATCH_REDIS_SERVER names the redis-server binary (a path, or a name
//     looked up on PATH); the default is "redis-server". Setting it to a path
//     that does not exist simulates a machine without Redis.
//   - REDLATCH_LEAK_WAIT is how long Main waits for goroutines to exit
//     before reporting them as leaked (a Go duration; default 5s).
//
// Every server listens on 127.0.0.1 on a free port, keeps nothing on disk,
// and is killed when the test binary dies.
package redistest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch/internal/demo"
	"github.com/redlatch/redlatch/internal/leakcheck"
)

// Environment variables read by the package.
const (
	EnvRequire  = "REDLATCH_REQUIRE_REDIS" // "1": a missing redis-server fails tests
	EnvServer   = "REDLATCH_REDIS_SERVER"  // the redis-server binary; default "redis-server"
	EnvLeakWait = "REDLATCH_LEAK_WAIT"     // Main's wait for goroutines to exit; default 5s
)

// Backend names.
const (
	BackendMiniredis = "miniredis"
	BackendRedis     = "redis"
	BackendCluster   = "cluster"
)

// RequireRedis reports whether REDLATCH_REQUIRE_REDIS=1 is set.
func RequireRedis() bool { return os.Getenv(EnvRequire) == "1" }

// serverBinary returns the redis-server binary to run: REDLATCH_REDIS_SERVER
// or "redis-server".
func serverBinary() string {
	if p := os.Getenv(EnvServer); p != "" {
		return p
	}
	return "redis-server"
}

// HaveRedisServer reports whether redis-server (or REDLATCH_REDIS_SERVER)
// is an executable on PATH (or at the given path).
func HaveRedisServer() bool {
	_, err := exec.LookPath(serverBinary())
	return err == nil
}

// needServer skips t, or fails it under REDLATCH_REQUIRE_REDIS=1, when there
// is no redis-server.
func needServer(t testing.TB) {
	t.Helper()
	if HaveRedisServer() {
		return
	}
	if RequireRedis() {
		t.Fatalf("redistest: %s not found, and %s=1", serverBinary(), EnvRequire)
	}
	t.Skipf("redistest: %s not found (set %s=1 to fail instead)", serverBinary(), EnvRequire)
}

// Backend is one Redis to run a test against. Exactly one of Mini, Server
// and Cluster is set.
type Backend struct {
	Name    string               // "miniredis", "redis" or "cluster"
	Mini    *miniredis.Miniredis // set for "miniredis"
	Server  *Server              // set for "redis"
	Cluster *Cluster             // set for "cluster"
}

// Real reports whether the backend is a real redis-server (not miniredis).
func (b Backend) Real() bool { return b.Mini == nil }

// miniOptions are client options for a miniredis, with the timeouts of
// Server.Options.
func miniOptions(m *miniredis.Miniredis) *redis.Options {
	return &redis.Options{
		Addr:                  m.Addr(),
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           2 * time.Second,
		WriteTimeout:          2 * time.Second,
	}
}

// Client returns a fresh client of the backend, closed in t.Cleanup: a
// *redis.Client for "miniredis" and "redis", a *redis.ClusterClient for
// "cluster".
func (b Backend) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	switch {
	case b.Mini != nil:
		rdb := redis.NewClient(miniOptions(b.Mini))
		t.Cleanup(func() { _ = rdb.Close() })
		return rdb
	case b.Server != nil:
		return b.Server.Client(t)
	case b.Cluster != nil:
		return b.Cluster.Client(t)
	}
	t.Fatalf("redistest: empty Backend %q", b.Name)
	return nil
}

// NodeClients returns one fresh client per node of the backend (per master
// of a cluster), closed in t.Cleanup.
func (b Backend) NodeClients(t testing.TB) []*redis.Client {
	t.Helper()
	switch {
	case b.Mini != nil:
		rdb := redis.NewClient(miniOptions(b.Mini))
		t.Cleanup(func() { _ = rdb.Close() })
		return []*redis.Client{rdb}
	case b.Server != nil:
		return []*redis.Client{b.Server.Client(t)}
	case b.Cluster != nil:
		var out []*redis.Client
		for _, s := range b.Cluster.Servers {
			out = append(out, s.Client(t))
		}
		return out
	}
	t.Fatalf("redistest: empty Backend %q", b.Name)
	return nil
}

// eachNode runs cmd on every node, failing t on an error.
func (b Backend) eachNode(t testing.TB, name string, cmd func(context.Context, *redis.Client) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, r := range b.NodeClients(t) {
		if err := cmd(ctx, r); err != nil {
			t.Fatalf("redistest: %s on %s %s: %v", name, b.Name, r.Options().Addr, err)
		}
	}
}

// FlushAll runs FLUSHALL on every node (every master of a cluster). Shared
// backends are shared by every test of the binary: only flush when no other
// test runs in parallel.
func (b Backend) FlushAll(t testing.TB) {
	t.Helper()
	b.eachNode(t, "FLUSHALL", func(ctx context.Context, r *redis.Client) error {
		return r.FlushAll(ctx).Err()
	})
}

// ScriptFlush runs SCRIPT FLUSH on every node, emptying the script caches
// (so that the next EVALSHA gets NOSCRIPT).
func (b Backend) ScriptFlush(t testing.TB) {
	t.Helper()
	b.eachNode(t, "SCRIPT FLUSH", func(ctx context.Context, r *redis.Client) error {
		return r.ScriptFlush(ctx).Err()
	})
}

// shared holds the servers shared by the tests of one binary, started on
// first use and stopped by Main.
var shared struct {
	miniOnce sync.Once
	mini     *miniredis.Miniredis
	stopTick func()
	miniErr  error

	realOnce sync.Once
	server   *Server
	cluster  *Cluster
	realErr  error
}

// sharedMini starts the shared miniredis once. Its keys expire in real time
// (see demo.Tick): miniredis itself only ages keys when told to.
func sharedMini() (*miniredis.Miniredis, error) {
	shared.miniOnce.Do(func() {
		m := miniredis.NewMiniRedis()
		if err := m.StartAddr("127.0.0.1:0"); err != nil {
			shared.miniErr = fmt.Errorf("redistest: start miniredis: %w", err)
			return
		}
		shared.mini, shared.stopTick = m, demo.Tick(m)
	})
	return shared.mini, shared.miniErr
}

// sharedReal starts the shared redis-server and 3-master cluster once,
// concurrently. A failure is remembered: later callers fail too, at once.
func sharedReal() (*Server, *Cluster, error) {
	shared.realOnce.Do(func() {
		var wg sync.WaitGroup
		var serverErr, clusterErr error
		wg.Add(2)
		go func() { defer wg.Done(); shared.server, serverErr = newServer(false) }()
		go func() { defer wg.Done(); shared.cluster, clusterErr = newCluster(3) }()
		wg.Wait()
		if serverErr != nil {
			shared.realErr = serverErr
		} else if clusterErr != nil {
			shared.realErr = clusterErr
		}
	})
	return shared.server, shared.cluster, shared.realErr
}

// closeShared stops the shared servers.
func closeShared() {
	if shared.server != nil {
		shared.server.Close()
	}
	if shared.cluster != nil {
		shared.cluster.Close()
	}
	if shared.mini != nil {
		shared.stopTick()
		shared.mini.Close()
	}
}

// Backends returns the backends to run a test on: the shared miniredis,
// then, when redis-server is available, the shared single "redis" server
// and the shared 3-master "cluster". When redis-server is missing it returns
// only miniredis, or fails t under REDLATCH_REQUIRE_REDIS=1.
//
// The shared servers start on first use (once per test binary; the first
// call takes about 2s, the cluster's start-up) and are stopped by Main. Tests
// share them, so they must use unique key names (UniqueName).
func Backends(t testing.TB) []Backend {
	t.Helper()
	m, err := sharedMini()
	if err != nil {
		t.Fatal(err)
	}
	out := []Backend{{Name: BackendMiniredis, Mini: m}}
	if !HaveRedisServer() {
		if RequireRedis() {
			t.Fatalf("redistest: %s not found, and %s=1", serverBinary(), EnvRequire)
		}
		return out
	}
	s, c, err := sharedReal()
	if err != nil {
		t.Fatal(err)
	}
	return append(out, Backend{Name: BackendRedis, Server: s}, Backend{Name: BackendCluster, Cluster: c})
}

// ForEach runs fn as a subtest per backend, t.Run(b.Name, ...), the
// backends at the same time: a test takes as long as its slowest backend
// instead of their sum (most tests mostly wait, on leases, sleeps and
// timeouts). Each backend is its own server, so fn may flush, stop or
// reconfigure its backend; see Together for what it may not touch. Without
// redis-server the "redis" and "cluster" subtests are reported as skipped
// (or t fails, under REDLATCH_REQUIRE_REDIS=1).
func ForEach(t *testing.T, fn func(t *testing.T, b Backend)) {
	t.Helper()
	forEach(t, fn, true)
}

// ForEachInTurn is ForEach with the backends one after the other, for a
// test that counts the process's goroutines or otherwise needs the process
// to itself.
func ForEachInTurn(t *testing.T, fn func(t *testing.T, b Backend)) {
	t.Helper()
	forEach(t, fn, false)
}

func forEach(t *testing.T, fn func(t *testing.T, b Backend), atOnce bool) {
	t.Helper()
	backends := Backends(t)
	if atOnce {
		Together(t, func(run func(string, func(*testing.T))) {
			for _, b := range backends {
				run(b.Name, func(t *testing.T) { fn(t, b) })
			}
		})
	} else {
		for _, b := range backends {
			t.Run(b.Name, func(t *testing.T) { fn(t, b) })
		}
	}
	if !HaveRedisServer() {
		for _, name := range []string{BackendRedis, BackendCluster} {
			t.Run(name, func(t *testing.T) {
				t.Skipf("redistest: %s not found (set %s=1 to fail instead)", serverBinary(), EnvRequire)
			})
		}
	}
}

// Together runs the subtests that body starts with run(name, f) at the same
// time, and returns when every one has ended:
//
//	redistest.Together(t, func(run func(string, func(*testing.T))) {
//		for _, k := range kinds {
//			run(k.name, func(t *testing.T) { ... })
//		}
//	})
//
// The subtests do not call t.Parallel: they run beside each other only,
// never beside other tests, and go test's -parallel does not limit them.
//
// Since they run together, a subtest must not touch what its siblings
// share: variables of the enclosing test, package-level state, the
// process's goroutine count (see ForEachInTurn), and, for subtests on one
// server, that server's whole state (FLUSHALL, SCRIPT FLUSH, CONFIG SET,
// Stop, the miniredis clock). Its time bounds must allow for its siblings'
// load.
func Together(t *testing.T, body func(run func(name string, f func(t *testing.T)))) {
	t.Helper()
	var wg sync.WaitGroup
	defer wg.Wait()
	body(func(name string, f func(t *testing.T)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(name, f)
		}()
	})
}

// Main runs the tests, for use in TestMain: it runs m, stops the shared
// servers, then checks that no goroutine outlived the tests (waiting up to
// REDLATCH_LEAK_WAIT, 5s by default, for them to exit). It exits with m's
// code, or 1 when goroutines leaked; their stacks are printed to stderr.
func Main(m *testing.M) {
	code := m.Run()
	closeShared()
	wait := 5 * time.Second
	if d, err := time.ParseDuration(os.Getenv(EnvLeakWait)); err == nil {
		wait = d
	}
	leakcheck.Exit(code, wait)
}

var unique atomic.Int64

// UniqueName returns a name unique within the test binary, made of t.Name()
// and a counter, e.g. "TestLock.cluster-17". It contains only letters,
// digits and ".-_", so it is safe in Redis keys (no braces: it can be used
// inside a hash tag) and channel names.
func UniqueName(t testing.TB) string {
	name := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		case r == '/':
			return '.'
		}
		return '_'
	}, t.Name())
	return name + "-" + strconv.FormatInt(unique.Add(1), 10)
}

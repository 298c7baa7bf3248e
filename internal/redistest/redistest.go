// Package redistest starts the Redis servers redlatch's tests run against:
// miniredis always; a real redis-server (single node) and a local 3-master
// Redis Cluster whenever redis-server is on PATH. With
// REDLATCH_REQUIRE_REDIS=1 a missing redis-server fails the tests instead of
// skipping the real backends. Every server listens on 127.0.0.1, on a free
// port, and is stopped by the test (or by Main, for shared ones).
package redistest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch/internal/demo"
	"github.com/redlatch/redlatch/internal/leakcheck"
)

// RequireRedis reports whether REDLATCH_REQUIRE_REDIS=1 is set.
func RequireRedis() bool { return os.Getenv("REDLATCH_REQUIRE_REDIS") == "1" }

// serverBinary is redis-server, or the path in REDLATCH_REDIS_SERVER.
func serverBinary() string {
	if p := os.Getenv("REDLATCH_REDIS_SERVER"); p != "" {
		return p
	}
	return "redis-server"
}

// HaveRedisServer reports whether redis-server can be run.
func HaveRedisServer() bool {
	_, err := exec.LookPath(serverBinary())
	return err == nil
}

// needServer skips (or fails, under REDLATCH_REQUIRE_REDIS=1) a test that
// needs a real redis-server when there is none.
func needServer(t testing.TB) {
	t.Helper()
	if HaveRedisServer() {
		return
	}
	if RequireRedis() {
		t.Fatalf("redis-server (%s) not found and REDLATCH_REQUIRE_REDIS=1", serverBinary())
	}
	t.Skipf("redis-server (%s) not found", serverBinary())
}

// Server is one redis-server process on 127.0.0.1 without persistence.
type Server struct {
	Addr string

	args []string
	dir  string
	mu   sync.Mutex
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
}

// NewServer starts a redis-server for one test and stops it at its end.
// extraArgs are passed to redis-server.
func NewServer(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	needServer(t)
	s, err := startServer(extraArgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func startServer(extraArgs ...string) (*Server, error) {
	dir, err := os.MkdirTemp("", "redlatch-redis-")
	if err != nil {
		return nil, err
	}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), dir: dir}
		s.args = append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir, "--protected-mode", "no",
			"--cluster-config-file", "nodes-" + strconv.Itoa(port) + ".conf"}, extraArgs...)
		if last = s.start(); last == nil {
			return s, nil
		}
	}
	_ = os.RemoveAll(dir)
	return nil, last
}

// freePort returns a port free on 127.0.0.1, whose cluster bus port
// (port+10000) is free too.
func freePort() (int, error) {
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if port+10000 > 65535 {
			continue
		}
		bus, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+10000))
		if err != nil {
			continue
		}
		_ = bus.Close()
		return port, nil
	}
	return 0, fmt.Errorf("redistest: no free port")
}

// start runs the process and waits until it answers PING.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(serverBinary(), s.args...)
	s.out = &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	rdb := redis.NewClient(&redis.Options{Addr: s.Addr, DialTimeout: 200 * time.Millisecond, MaxRetries: -1})
	defer rdb.Close()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("redistest: redis-server exited: %s", s.out.String())
		default:
		}
		if rdb.Ping(context.Background()).Err() == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	<-done
	return fmt.Errorf("redistest: redis-server did not answer on %s: %s", s.Addr, s.out.String())
}

// Options returns client options for the server, with context deadlines
// honoured on the socket and short timeouts.
func (s *Server) Options() *redis.Options {
	return &redis.Options{
		Addr: s.Addr, ContextTimeoutEnabled: true,
		DialTimeout: time.Second, ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
	}
}

// Client returns a new client of the server, closed at the end of the test.
func (s *Server) Client(t testing.TB) *redis.Client {
	rdb := redis.NewClient(s.Options())
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// PID returns the process id of the running server.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd.Process.Pid
}

func (s *Server) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("redistest: signal %v: %v", sig, err)
	}
}

// Stop freezes the server (SIGSTOP): connections stay open, nothing answers.
func (s *Server) Stop(t testing.TB) { s.signal(t, syscall.SIGSTOP) }

// Cont resumes a frozen server (SIGCONT).
func (s *Server) Cont(t testing.TB) { s.signal(t, syscall.SIGCONT) }

// Kill kills the server (SIGKILL) and waits for it to exit.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	s.kill()
}

func (s *Server) kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
	_ = cmd.Process.Kill()
	<-done
}

// Start starts a killed server again, on the same port, with empty data.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
}

// Restart kills and starts the server: a restart without persistence.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Kill(t)
	s.Start(t)
}

// Close stops the server for good and removes its directory.
func (s *Server) Close() {
	s.kill()
	_ = os.RemoveAll(s.dir)
}

// Cluster is a local Redis Cluster of masters without replicas.
type Cluster struct {
	Servers []*Server
	Addrs   []string
}

// NewCluster starts a cluster of n masters for one test.
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	needServer(t)
	c, err := startCluster(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func startCluster(n int) (*Cluster, error) {
	c := &Cluster{}
	for i := 0; i < n; i++ {
		s, err := startServer("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
		if err != nil {
			c.Close()
			return nil, err
		}
		c.Servers = append(c.Servers, s)
		c.Addrs = append(c.Addrs, s.Addr)
	}
	if err := c.create(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// create assigns the slots evenly, joins the nodes and waits until every
// node sees a healthy cluster covering all 16384 slots.
func (c *Cluster) create() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := len(c.Servers)
	var nodes []*redis.Client
	for _, s := range c.Servers {
		nodes = append(nodes, redis.NewClient(&redis.Options{Addr: s.Addr}))
	}
	defer func() {
		for _, r := range nodes {
			_ = r.Close()
		}
	}()
	for i, r := range nodes {
		lo, hi := i*16384/n, (i+1)*16384/n-1
		if err := r.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
			return fmt.Errorf("redistest: ADDSLOTSRANGE: %w", err)
		}
	}
	for i := 1; i < n; i++ {
		host, port, _ := net.SplitHostPort(c.Servers[i].Addr)
		if err := nodes[0].ClusterMeet(ctx, host, port).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER MEET: %w", err)
		}
	}
	for {
		ready := true
		for _, r := range nodes {
			info, err := r.ClusterInfo(ctx).Result()
			if err != nil || !strings.Contains(info, "cluster_state:ok") ||
				!strings.Contains(info, "cluster_known_nodes:"+strconv.Itoa(n)+"\r") {
				ready = false
				break
			}
			slots, err := r.ClusterSlots(ctx).Result()
			covered := 0
			for _, s := range slots {
				covered += int(s.End-s.Start) + 1
			}
			if err != nil || covered != 16384 || len(slots) != n {
				ready = false
				break
			}
		}
		if ready {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("redistest: cluster not ready: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	cc := redis.NewClusterClient(c.Options())
	defer cc.Close()
	for i := 0; i < 30; i++ {
		if err := cc.Set(ctx, "{redistest-"+strconv.Itoa(i)+"}", "1", time.Second).Err(); err != nil {
			return fmt.Errorf("redistest: cluster sanity SET: %w", err)
		}
	}
	return nil
}

// Options returns cluster client options for the cluster.
func (c *Cluster) Options() *redis.ClusterOptions {
	return &redis.ClusterOptions{
		Addrs: c.Addrs, ContextTimeoutEnabled: true,
		DialTimeout: time.Second, ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
	}
}

// Client returns a new cluster client, closed at the end of the test.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	cc := redis.NewClusterClient(c.Options())
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// Close stops every node.
func (c *Cluster) Close() {
	for _, s := range c.Servers {
		s.Close()
	}
}

// Backend is one Redis to run a test against.
type Backend struct {
	Name    string               // "miniredis", "redis" or "cluster"
	Mini    *miniredis.Miniredis // set for "miniredis"
	Server  *Server              // set for "redis"
	Cluster *Cluster             // set for "cluster"
}

// Real reports whether the backend is a real redis-server.
func (b Backend) Real() bool { return b.Mini == nil }

// Client returns a fresh client of the backend, closed at the end of the test.
func (b Backend) Client(t testing.TB) redis.UniversalClient {
	switch {
	case b.Mini != nil:
		rdb := redis.NewClient(&redis.Options{Addr: b.Mini.Addr(), ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = rdb.Close() })
		return rdb
	case b.Cluster != nil:
		return b.Cluster.Client(t)
	default:
		return b.Server.Client(t)
	}
}

// each runs fn on every node (every master of a cluster).
func (b Backend) each(t testing.TB, fn func(ctx context.Context, r *redis.Client) error) {
	t.Helper()
	ctx := context.Background()
	switch rdb := b.Client(t).(type) {
	case *redis.ClusterClient:
		if err := rdb.ForEachMaster(ctx, fn); err != nil {
			t.Fatal(err)
		}
	case *redis.Client:
		if err := fn(ctx, rdb); err != nil {
			t.Fatal(err)
		}
	}
}

// FlushAll empties every node.
func (b Backend) FlushAll(t testing.TB) {
	t.Helper()
	b.each(t, func(ctx context.Context, r *redis.Client) error { return r.FlushAll(ctx).Err() })
}

// ScriptFlush empties every node's script cache.
func (b Backend) ScriptFlush(t testing.TB) {
	t.Helper()
	b.each(t, func(ctx context.Context, r *redis.Client) error { return r.ScriptFlush(ctx).Err() })
}

var shared struct {
	mu       sync.Mutex
	mini     *miniredis.Miniredis
	stopTick func()
	server   *Server
	cluster  *Cluster
	err      error
}

// Backends returns miniredis, and the shared single server and 3-master
// cluster when redis-server is available (a failure when it is not and
// REDLATCH_REQUIRE_REDIS=1). Shared servers start on first use and are
// stopped by Main. The shared miniredis ages keys in real time.
func Backends(t testing.TB) []Backend {
	t.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.mini == nil {
		m := miniredis.NewMiniRedis()
		if err := m.StartAddr("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		shared.mini, shared.stopTick = m, demo.Tick(m)
	}
	out := []Backend{{Name: "miniredis", Mini: shared.mini}}
	if !HaveRedisServer() {
		if RequireRedis() {
			t.Fatalf("redis-server (%s) not found and REDLATCH_REQUIRE_REDIS=1", serverBinary())
		}
		return out
	}
	if shared.err == nil && shared.server == nil {
		shared.server, shared.err = startServer()
	}
	if shared.err == nil && shared.cluster == nil {
		shared.cluster, shared.err = startCluster(3)
	}
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return append(out, Backend{Name: "redis", Server: shared.server}, Backend{Name: "cluster", Cluster: shared.cluster})
}

// ForEach runs fn as a subtest on every backend.
func ForEach(t *testing.T, fn func(t *testing.T, b Backend)) {
	t.Helper()
	for _, b := range Backends(t) {
		t.Run(b.Name, func(t *testing.T) { fn(t, b) })
	}
}

var unique atomic.Int64

// UniqueName returns a key-safe name unique within the test binary.
func UniqueName(t testing.TB) string {
	r := strings.NewReplacer("/", "-", " ", "_", "{", "(", "}", ")")
	return fmt.Sprintf("%s-%d-%d", r.Replace(t.Name()), os.Getpid(), unique.Add(1))
}

// Main runs the tests, stops the shared servers, and fails the run when a
// goroutine outlives the tests. Use it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	shared.mu.Lock()
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
	shared.mu.Unlock()
	if code == 0 {
		if err := leakcheck.Check(5 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// Sentinel is one redis-sentinel process monitoring a master as "mymaster".
type Sentinel struct {
	Addr       string
	MasterName string
	srv        *Server
}

// NewSentinel starts a sentinel on 127.0.0.1 monitoring master (quorum 1,
// down after 1s), stopped at the end of the test.
func NewSentinel(t testing.TB, master *Server) *Sentinel {
	t.Helper()
	needServer(t)
	dir := t.TempDir()
	host, port, _ := net.SplitHostPort(master.Addr)
	conf := dir + "/sentinel.conf"
	body := "sentinel monitor mymaster " + host + " " + port + " 1\n" +
		"sentinel down-after-milliseconds mymaster 1000\n" +
		"sentinel failover-timeout mymaster 5000\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		p, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(p), dir: dir,
			args: []string{conf, "--sentinel", "--port", strconv.Itoa(p), "--bind", "127.0.0.1", "--dir", dir}}
		if last = s.start(); last == nil {
			t.Cleanup(s.kill)
			return &Sentinel{Addr: s.Addr, MasterName: "mymaster", srv: s}
		}
	}
	t.Fatal(last)
	return nil
}

// FailoverClient returns a sentinel-backed client for the monitored master,
// closed at the end of the test.
func (s *Sentinel) FailoverClient(t testing.TB) *redis.Client {
	rdb := redis.NewFailoverClient(&redis.FailoverOptions{
		MasterName: s.MasterName, SentinelAddrs: []string{s.Addr},
		ContextTimeoutEnabled: true, DialTimeout: time.Second,
		ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
	})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

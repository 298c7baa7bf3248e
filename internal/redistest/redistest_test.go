package redistest

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { Main(m) }

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestBackends: every backend answers PING, SET and GET, on keys with 20
// distinct hash tags (on the cluster: on every master).
func TestBackends(t *testing.T) {
	ForEach(t, func(t *testing.T, b Backend) {
		ctx := ctxT(t, 10*time.Second)
		rdb := b.Client(t)
		require.NoError(t, rdb.Ping(ctx).Err())
		require.Equal(t, b.Name != BackendMiniredis, b.Real())

		base := UniqueName(t)
		slots, masters := map[int]bool{}, map[*Server]bool{}
		for i := 0; i < 20; i++ {
			key := "{" + base + "." + string(rune('a'+i)) + "}x"
			require.NoError(t, rdb.Set(ctx, key, key, time.Minute).Err())
			got, err := rdb.Get(ctx, key).Result()
			require.NoError(t, err)
			require.Equal(t, key, got)
			slots[KeySlot(key)] = true
			if b.Cluster != nil {
				masters[b.Cluster.ServerFor(key)] = true
				// The key is on the master ServerFor names, not elsewhere.
				direct := b.Cluster.ServerFor(key).Client(t)
				require.Equal(t, key, direct.Get(ctx, key).Val())
			}
		}
		require.Greater(t, len(slots), 15, "the hash tags should spread over slots")
		if b.Cluster != nil {
			require.Len(t, masters, len(b.Cluster.Servers), "keys on every master")
			cc := rdb.(*redis.ClusterClient)
			require.NoError(t, cc.ForEachMaster(ctx, func(ctx context.Context, r *redis.Client) error {
				return r.Ping(ctx).Err()
			}))
		}
	})
}

// TestKeySlot compares KeySlot with known values (from redis-server 7.0's
// CLUSTER KEYSLOT) and with CLUSTER KEYSLOT on the shared cluster.
func TestKeySlot(t *testing.T) {
	known := map[string]int{
		"foo": 12182, "bar": 5061, "hello": 866, "somekey": 11058, "": 0,
		"{user1000}.following": 3443, "{user1000}.followers": 3443,
		"foo{}{bar}":    8363, // an empty tag: the whole key is hashed
		"foo{{bar}}zap": 4015, // the tag is "{bar"
	}
	for k, want := range known {
		require.Equal(t, want, KeySlot(k), k)
	}
	require.Equal(t, KeySlot("bar"), KeySlot("foo{bar}{zap}"))

	for _, b := range Backends(t) {
		if b.Cluster == nil {
			continue // CLUSTER KEYSLOT needs cluster mode; miniredis gets "foo{}{bar}" wrong
		}
		ctx := ctxT(t, 10*time.Second)
		r := b.NodeClients(t)[0]
		keys := []string{"a{b}c", "{}", "}{", "{a}{", UniqueName(t)}
		for k := range known {
			keys = append(keys, k)
		}
		for i := 0; i < 200; i++ {
			keys = append(keys, "key:"+strconv.Itoa(i))
		}
		for _, k := range keys {
			want, err := r.ClusterKeySlot(ctx, k).Result()
			require.NoError(t, err)
			require.Equal(t, int(want), KeySlot(k), "%q", k)
		}
	}
}

// TestFlushes: FlushAll empties, and ScriptFlush empties the script cache
// of, every node.
func TestFlushes(t *testing.T) {
	ForEach(t, func(t *testing.T, b Backend) {
		ctx := ctxT(t, 10*time.Second)
		rdb := b.Client(t)
		base := UniqueName(t)
		for i := 0; i < 20; i++ {
			require.NoError(t, rdb.Set(ctx, "{"+base+strconv.Itoa(i)+"}", "v", time.Minute).Err())
		}
		nodes := b.NodeClients(t)
		if b.Cluster != nil {
			require.Len(t, nodes, 3)
		}
		var sha string
		for _, r := range nodes {
			var err error
			sha, err = r.ScriptLoad(ctx, "return 1").Result()
			require.NoError(t, err)
		}

		b.FlushAll(t)
		b.ScriptFlush(t)
		for _, r := range nodes {
			require.Zero(t, r.DBSize(ctx).Val(), r.Options().Addr)
			exists, err := r.ScriptExists(ctx, sha).Result()
			require.NoError(t, err)
			require.Equal(t, []bool{false}, exists, r.Options().Addr)
		}
	})
}

// TestServerFaults exercises a dedicated server's Stop, Cont, Restart, Kill
// and Start.
func TestServerFaults(t *testing.T) {
	s := NewServer(t)
	rdb := s.Client(t)
	ctx := ctxT(t, 20*time.Second)
	require.NoError(t, rdb.Set(ctx, "k", "v", 0).Err())
	pid := s.PID()
	require.NotZero(t, pid)

	// Frozen: a command runs into its context deadline, not the 2s read
	// timeout.
	s.Stop(t)
	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	start := time.Now()
	err := rdb.Ping(sctx).Err()
	cancel()
	require.Error(t, err, "a frozen server answered")
	var ne net.Error
	require.True(t, errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()), "%v", err)
	require.Less(t, time.Since(start), time.Second)

	s.Cont(t)
	require.NoError(t, rdb.Ping(ctx).Err())
	require.Equal(t, "v", rdb.Get(ctx, "k").Val(), "SIGSTOP/SIGCONT kept the data")
	require.Equal(t, pid, s.PID())

	// Restart: a new process on the same port, without the data.
	s.Restart(t)
	require.NotEqual(t, pid, s.PID())
	require.Eventually(t, func() bool { return rdb.Ping(ctx).Err() == nil }, 3*time.Second, 10*time.Millisecond)
	require.Zero(t, rdb.Exists(ctx, "k").Val(), "a restart without persistence kept data")

	// Killed: nothing answers; Start brings it back.
	s.Kill(t)
	require.Zero(t, s.PID())
	s.Kill(t) // idempotent
	kctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	require.Error(t, rdb.Ping(kctx).Err())
	cancel()
	s.Start(t)
	require.NotZero(t, s.PID())
	require.Eventually(t, func() bool { return rdb.Ping(ctx).Err() == nil }, 3*time.Second, 10*time.Millisecond)
	require.Contains(t, s.Log(), "Ready to accept connections")

	s.Close()
	s.Close() // idempotent
	require.Zero(t, s.PID())
}

// TestServerExtraArgs: extra arguments reach redis-server, here to make a
// replica.
func TestServerExtraArgs(t *testing.T) {
	master := NewServer(t, "--repl-diskless-sync-delay", "0")
	host, port, err := net.SplitHostPort(master.Addr)
	require.NoError(t, err)
	replica := NewServer(t, "--replicaof", host, port)
	ctx := ctxT(t, 10*time.Second)
	require.NoError(t, master.Client(t).Set(ctx, "k", "v", 0).Err())
	r := replica.Client(t)
	require.Eventually(t, func() bool { return r.Get(ctx, "k").Val() == "v" }, 5*time.Second, 10*time.Millisecond)
	require.Error(t, r.Set(ctx, "k", "w", 0).Err(), "a replica accepted a write")
}

// TestNewCluster: a dedicated 2-master cluster works, and a killed and
// restarted master rejoins with its slots.
func TestNewCluster(t *testing.T) {
	c := NewCluster(t, 2)
	require.Len(t, c.Servers, 2)
	require.Equal(t, []string{c.Servers[0].Addr, c.Servers[1].Addr}, c.Addrs)
	cc := c.Client(t)
	ctx := ctxT(t, 20*time.Second)
	keys := append(keysOn(0, 2, 1), keysOn(1, 2, 1)...)
	for i, key := range keys {
		require.Equal(t, c.Servers[i], c.ServerFor(key))
		require.NoError(t, cc.Set(ctx, key, "v", time.Minute).Err())
	}

	victim := c.ServerFor(keys[1])
	victim.Restart(t)
	c.WaitReady(t)
	require.Zero(t, cc.Exists(ctx, keys[1]).Val(), "the restarted master lost its data")
	require.Equal(t, "v", cc.Get(ctx, keys[0]).Val(), "the other master kept its data")
	require.Eventually(t, func() bool { return cc.Set(ctx, keys[1], "w", time.Minute).Err() == nil },
		5*time.Second, 20*time.Millisecond)
	require.Equal(t, "w", victim.Client(t).Get(ctx, keys[1]).Val())
}

func TestUniqueName(t *testing.T) {
	seen := map[string]bool{}
	for _, sub := range []string{"plain", "with space{and}braces/and:colon"} {
		t.Run(sub, func(t *testing.T) {
			for i := 0; i < 100; i++ {
				n := UniqueName(t)
				require.False(t, seen[n], n)
				seen[n] = true
				require.NotContains(t, n, "{")
				require.NotContains(t, n, "}")
				require.NotContains(t, n, " ")
				require.True(t, strings.HasPrefix(n, "TestUniqueName."), n)
			}
		})
	}
}

// TestMissingRedisServer runs this test binary again with
// REDLATCH_REDIS_SERVER pointing nowhere: the real backends are skipped and
// miniredis still passes, unless REDLATCH_REQUIRE_REDIS=1, which fails.
func TestMissingRedisServer(t *testing.T) {
	if os.Getenv("REDISTEST_CHILD") == "1" {
		t.Skip("in the child run")
	}
	run := func(require string) (string, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^(TestBackends|TestServerFaults|TestNewCluster)$",
			"-test.v", "-test.count=1", "-test.timeout=60s")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with this binary
		cmd.Env = append(os.Environ(), "REDISTEST_CHILD=1",
			EnvServer+"=/nonexistent/redis-server", EnvRequire+"="+require)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := run("0")
	require.NoError(t, err, out)
	for _, want := range []string{
		"--- PASS: TestBackends/miniredis", "--- SKIP: TestBackends/redis", "--- SKIP: TestBackends/cluster",
		"--- SKIP: TestServerFaults", "--- SKIP: TestNewCluster", "\nPASS\n",
	} {
		require.Contains(t, out, want)
	}

	out, err = run("1")
	require.Error(t, err, out)
	for _, want := range []string{
		"--- FAIL: TestBackends", "--- FAIL: TestServerFaults", "--- FAIL: TestNewCluster",
		"/nonexistent/redis-server not found, and REDLATCH_REQUIRE_REDIS=1",
	} {
		require.Contains(t, out, want)
	}
	require.NotContains(t, out, "--- PASS: TestBackends/miniredis", "Backends fails before any subtest")
}

// leakForever is what TestLeakyChild leaks.
func leakForever(block chan struct{}) { <-block }

// TestLeakyChild leaks a goroutine when run by TestMainReportsLeaks.
func TestLeakyChild(t *testing.T) {
	if os.Getenv("REDISTEST_LEAK") != "1" {
		t.Skip("only run by TestMainReportsLeaks")
	}
	go leakForever(make(chan struct{}))
}

// TestMainReportsLeaks: Main fails a run whose tests pass but leave a
// goroutine behind, and prints its stack.
func TestMainReportsLeaks(t *testing.T) {
	if os.Getenv("REDISTEST_LEAK") == "1" {
		t.Skip("in the child run")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestLeakyChild$", "-test.v", "-test.count=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(os.Environ(), "REDISTEST_LEAK=1", EnvLeakWait+"=200ms")
	out, err := cmd.CombinedOutput()
	require.Error(t, err, string(out))
	require.Contains(t, string(out), "--- PASS: TestLeakyChild")
	require.Contains(t, string(out), "FAIL: leakcheck: 1 goroutine(s) still running")
	require.Contains(t, string(out), "redistest.leakForever")
}

// TestStartOnTakenPort: a server whose port, or cluster bus port, another
// process holds fails with errPortTaken, so newServer tries another port.
func TestStartOnTakenPort(t *testing.T) {
	needServer(t)
	for _, cluster := range []bool{false, true} {
		port, err := freePort(true)
		require.NoError(t, err)
		taken := port
		if cluster {
			taken = port + 10000
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(taken))
		require.NoError(t, err)
		dir := t.TempDir()
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), dir: dir,
			args: []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--dir", dir}}
		if cluster {
			s.args = append(s.args, "--cluster-enabled", "yes")
		}
		t.Cleanup(s.kill) // should the start succeed after all
		err = s.start()
		require.ErrorIs(t, err, errPortTaken)
		require.Zero(t, s.PID())
		require.NoError(t, l.Close())
	}
}

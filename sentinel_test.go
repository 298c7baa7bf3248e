package redlatch_test

import (
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSentinelFailoverClient: a Client on a sentinel failover client locks,
// re-enters, wakes a waiter by pub/sub and unlocks.
func TestSentinelFailoverClient(t *testing.T) {
	master := redistest.NewServer(t)
	sentinel := redistest.NewSentinel(t, master)
	ctx := ctxT(t, 20*time.Second)
	c1 := newClientOn(t, sentinel.FailoverClient(t))
	c2 := newClientOn(t, sentinel.FailoverClient(t))

	m := c1.ReentrantMutex("sentinel-lock")
	require.NoError(t, m.Lock(ctx))
	require.NoError(t, m.Lock(ctx))
	got := make(chan time.Time, 1)
	waiter := c2.Mutex("sentinel-lock")
	go func() {
		if waiter.Lock(ctx) == nil {
			got <- time.Now()
		}
	}()
	time.Sleep(100 * time.Millisecond)
	require.NoError(t, m.Unlock(ctx))
	require.NoError(t, m.Unlock(ctx))
	released := time.Now()
	select {
	case at := <-got:
		require.Less(t, at.Sub(released), time.Second)
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not woken through the sentinel-backed client")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// TestSentinelReplicaOnlySubscriberKept: a ReplicaOnly failover client
// dials each connection to a random replica, with no failover: a latch
// waiter's subscriber connection (on one replica) is not dropped each time
// a command connection goes to another.
func TestSentinelReplicaOnlySubscriberKept(t *testing.T) {
	master := redistest.NewServer(t, "--repl-diskless-sync-delay", "0")
	host, port, _ := net.SplitHostPort(master.Addr)
	r1 := redistest.NewServer(t, "--replicaof", host, port)
	r2 := redistest.NewServer(t, "--replicaof", host, port)
	waitInSync(t, master, r1)
	waitInSync(t, master, r2)
	sentinel := redistest.NewSentinel(t, master)
	ctx := ctxT(t, 30*time.Second)
	sadm := redis.NewSentinelClient(&redis.Options{Addr: sentinel.Addr})
	t.Cleanup(func() { _ = sadm.Close() })
	require.Eventually(t, func() bool {
		rs, err := sadm.Replicas(ctx, sentinel.MasterName).Result()
		return err == nil && len(rs) == 2
	}, 20*time.Second, 100*time.Millisecond, "sentinel did not find the replicas")

	var mu sync.Mutex
	var logs strings.Builder
	logger := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logs.Write(p)
	}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	rdb := redis.NewFailoverClient(&redis.FailoverOptions{
		MasterName: sentinel.MasterName, SentinelAddrs: []string{sentinel.Addr},
		ReplicaOnly: true, ContextTimeoutEnabled: true, PoolSize: 64,
	})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb, redlatch.WithLogger(logger))
	mc := newClientOn(t, master.Client(t))
	name := redistest.UniqueName(t)
	ok, err := mc.CountDownLatch(name).TrySetCount(ctx, 1)
	require.NoError(t, err)
	require.True(t, ok)
	waitInSync(t, master, r1)
	waitInSync(t, master, r2)

	done := make(chan error, 1)
	go func() { done <- c.CountDownLatch(name).Wait(ctx) }()
	time.Sleep(300 * time.Millisecond) // subscribed
	// Commands that need new connections: go-redis dials each to a random
	// replica.
	for range 16 {
		conn := rdb.Conn()
		require.NoError(t, conn.Ping(ctx).Err())
		defer conn.Close()
	}
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, mc.CountDownLatch(name).CountDown(ctx))
	require.NoError(t, <-done)
	mu.Lock()
	drops := strings.Count(logs.String(), "commands reach another server") +
		strings.Count(logs.String(), "subscriber connection lost")
	mu.Unlock()
	require.Zero(t, drops, "subscriber connection dropped with no failover")
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

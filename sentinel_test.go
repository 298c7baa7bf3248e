package redlatch_test

import (
	"testing"
	"time"

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
	c1 := redlatch.New(sentinel.FailoverClient(t))
	t.Cleanup(func() { _ = c1.Close() })
	c2 := redlatch.New(sentinel.FailoverClient(t))
	t.Cleanup(func() { _ = c2.Close() })

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

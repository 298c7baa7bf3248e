package redlatch

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestWakeAfterShardedReconnect: one Client waits on two locks whose
// channels are in two slots of the same master, and its sharded subscriber
// connection to that master is killed. go-redis reconnects and
// re-subscribes every channel of the connection in one SSUBSCRIBE, which
// the cluster refuses (CROSSSLOT) when they span slots; the refusal makes
// the subscriber send an SSUBSCRIBE per channel, and the confirmations wake
// the waiters. Also when the connection breaks again before the new one
// delivered anything (a flapping link: broken is set beforehand). Before,
// nothing was subscribed again (then only on a first failure), and the
// waiters slept until their holders' lease bound. (Found by reviewers.)
func TestWakeAfterShardedReconnect(t *testing.T) {
	redistest.Together(t, func(run func(string, func(*testing.T))) {
		for _, again := range []bool{false, true} {
			run(fmt.Sprintf("second break=%v", again), func(t *testing.T) {
				shardedReconnect(t, again)
			})
		}
	})
}

func shardedReconnect(t *testing.T, again bool) {
	cl := redistest.NewCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	base := redistest.UniqueName(t)
	var names []string
	first := ""
	for i := 0; len(names) < 2 && i < 1000; i++ {
		n := base + "-" + strconv.Itoa(i)
		tag := "{" + n + "}"
		if len(names) == 0 {
			names, first = append(names, n), tag
			continue
		}
		if cl.ServerFor(tag) == cl.ServerFor(first) && redistest.KeySlot(tag) != redistest.KeySlot(first) {
			names = append(names, n)
		}
	}
	require.Len(t, names, 2)
	admin := redis.NewClient(cl.ServerFor(first).Options())
	t.Cleanup(func() { _ = admin.Close() })

	hc := New(cl.Client(t))
	t.Cleanup(func() { _ = hc.Close() })
	wc := New(cl.Client(t))
	t.Cleanup(func() { _ = wc.Close() })
	var holders []*Mutex
	got := make(chan string, 2)
	for _, n := range names {
		h := hc.Mutex(n, WithLease(30*time.Second))
		require.NoError(t, h.Lock(ctx))
		holders = append(holders, h)
		go func() {
			w := wc.Mutex(n)
			if err := w.Lock(ctx); err == nil {
				got <- n
				_ = w.Unlock(ctx)
			}
		}()
	}
	require.Eventually(t, func() bool {
		ch, err := admin.PubSubShardChannels(ctx, "{"+base+"*").Result()
		return err == nil && len(ch) == 2
	}, 5*time.Second, 10*time.Millisecond, "both channels subscribed")
	if again {
		wc.ps.mu.Lock()
		for _, n := range wc.ps.nodes {
			n.broken.Store(true) // a failure earlier, nothing read since
		}
		wc.ps.mu.Unlock()
	}
	require.NoError(t, admin.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err())
	time.Sleep(time.Second)
	ch, _ := admin.PubSubShardChannels(ctx, "{"+base+"*").Result()
	t.Logf("sharded channels subscribed after the reconnection: %v", ch)
	released := time.Now()
	for _, h := range holders {
		require.NoError(t, h.Unlock(ctx))
	}
	for range names {
		select {
		case n := <-got:
			t.Logf("%s woken %v after the releases", n, time.Since(released))
		case <-time.After(5 * time.Second):
			t.Fatal("a waiter slept through its release: its channel was not subscribed again")
		}
	}
}

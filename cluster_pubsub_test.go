package redlatch_test

import (
	"context"
	"log/slog"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestWakeAfterSlotMovedStaleMap: a lock's slot moved to another
// master before a waiter of a Client whose slot map predates the move
// subscribes. Its attempt is redirected (MOVED) by go-redis, which only
// starts a reload of the slot map in the background; the join that follows
// asks MasterForKey at once, gets the old master, and SSUBSCRIBEs there. The
// old master answers -MOVED, which makes the subscription follow the slot to
// its new master, as after a migration (it was ignored as a refused command:
// the channel stayed on the wrong master, every release SPUBLISHed on the
// new one was lost, and the waiter slept until the holder's lease bound).
// (Found by a reviewer.)
func TestWakeAfterSlotMovedStaleMap(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	name := redistest.UniqueName(t)
	owner := cl.ServerFor("{" + name + "}")
	to := 0
	for i, s := range cl.Servers {
		if s != owner {
			to = i
		}
	}
	// The waiter's slot map reloads take 200ms (a loaded or remote node):
	// without this the test still fails about every other run, the
	// background reload racing the join.
	admin := redis.NewClient(cl.Servers[0].Options())
	t.Cleanup(func() { _ = admin.Close() })
	var slow atomic.Bool
	opt := cl.Options()
	opt.ClusterSlots = func(ctx context.Context) ([]redis.ClusterSlot, error) {
		if slow.Load() {
			time.Sleep(200 * time.Millisecond)
		}
		return admin.ClusterSlots(ctx).Result()
	}
	wrdb := redis.NewClusterClient(opt)
	t.Cleanup(func() { _ = wrdb.Close() })
	wc := redlatch.New(wrdb, redlatch.WithLogger(slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	t.Cleanup(func() { _ = wc.Close() })
	// The waiter's Client has been in use: slot map loaded, publish command
	// probed.
	warm := wc.Mutex(name + "-warm")
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	_, err := wc.Mutex(name).IsLocked(ctx)
	require.NoError(t, err)

	cl.MoveSlot(t, redistest.KeySlot("{"+name+"}"), to)
	slow.Store(true)

	hc := redlatch.New(cl.Client(t))
	t.Cleanup(func() { _ = hc.Close() })
	holder := hc.Mutex(name, redlatch.WithLease(30*time.Second))
	require.NoError(t, holder.Lock(ctx))

	waiter := wc.Mutex(name)
	got := make(chan time.Time, 1)
	go func() {
		if err := waiter.Lock(ctx); err == nil {
			got <- time.Now()
		}
	}()
	time.Sleep(1500 * time.Millisecond) // the waiter subscribes and sleeps
	newOwner := redis.NewClient(cl.Servers[to].Options())
	oldOwner := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = newOwner.Close(); _ = oldOwner.Close() })
	nn, _ := newOwner.Do(ctx, "PUBSUB", "SHARDNUMSUB", "{"+name+"}:wake").Slice()
	t.Logf("SHARDNUMSUB on the new master: %v", nn)

	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		t.Logf("woken %v after the release", at.Sub(released))
		require.Less(t, at.Sub(released), 2*time.Second)
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter slept through the release: its channel is subscribed on the slot's old master")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// tWriter writes a Client's log lines to the test log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// TestWakeAfterShardedReconnectTwoSlots: one Client waits on two
// locks whose channels are in two slots of the same master. Its sharded
// subscriber connection to that master is killed. go-redis reconnects and
// re-subscribes every sharded channel of the connection in ONE SSUBSCRIBE,
// which a Redis Cluster refuses with -CROSSSLOT when the channels are in
// different slots; the subscriber therefore subscribes each channel again
// itself, and the confirmations wake the waiters. (Before, nothing was
// subscribed again, and both waiters slept through the releases until the
// holders' lease bound. Found by a reviewer.)
func TestWakeAfterShardedReconnectTwoSlots(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
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
	owner := cl.ServerFor(first)
	admin := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = admin.Close() })

	hc := redlatch.New(cl.Client(t))
	t.Cleanup(func() { _ = hc.Close() })
	wc := redlatch.New(cl.Client(t), redlatch.WithLogger(slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	t.Cleanup(func() { _ = wc.Close() })
	var holders []*redlatch.Mutex
	got := make(chan string, 2)
	for _, n := range names {
		h := hc.Mutex(n, redlatch.WithLease(30*time.Second))
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
	require.NoError(t, admin.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err())
	time.Sleep(time.Second) // go-redis reconnects and re-subscribes
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
			t.Fatal("a waiter slept through its release after the sharded subscriber reconnected")
		}
	}
}

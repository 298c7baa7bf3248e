package redlatch_test

import (
	"context"
	"log/slog"
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

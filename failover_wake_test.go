package redlatch_test

import (
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestWakeAfterClusterFailover: the master of a lock's slot dies and its
// replica takes the slot over. A waiter whose sharded subscription was on
// the dead master follows the slot to the new master and is woken by the
// release published there, instead of sleeping until the holder's lease
// bound.
func TestWakeAfterClusterFailover(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 100*time.Second)
	name := redistest.UniqueName(t)
	owner, rep := cl.AddReplica(t, "{"+name+"}")
	oadm := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = oadm.Close() })
	radm := redis.NewClient(rep.Options())
	t.Cleanup(func() { _ = radm.Close() })

	hrdb := cl.Client(t)
	wrdb := cl.Client(t)
	hc, wc := redlatch.New(hrdb), redlatch.New(wrdb)
	t.Cleanup(func() { _ = hc.Close(); _ = wc.Close() })
	holder := hc.Mutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, holder.Lock(ctx))
	waiter := wc.Mutex(name)
	got := make(chan time.Time, 1)
	go func() {
		err := waiter.Lock(ctx)
		if err == nil {
			got <- time.Now()
		}
	}()
	require.Eventually(t, func() bool {
		n, err := oadm.Do(ctx, "PUBSUB", "SHARDNUMSUB", "{"+name+"}:wake").Slice()
		return err == nil && len(n) == 2 && n[1] == int64(1)
	}, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")
	require.NoError(t, oadm.Do(ctx, "WAIT", 1, 2000).Err())

	owner.Kill(t)
	require.Eventually(t, func() bool {
		s, _ := radm.Info(ctx, "replication").Result()
		return strings.Contains(s, "role:master")
	}, 30*time.Second, 100*time.Millisecond, "the replica was not promoted")
	require.Eventually(t, func() bool {
		hrdb.ReloadState(ctx)
		wrdb.ReloadState(ctx)
		return hrdb.Exists(ctx, "{"+name+"}:lock").Err() == nil &&
			wrdb.Exists(ctx, "{"+name+"}:lock").Err() == nil
	}, 20*time.Second, 200*time.Millisecond, "the holder's client does not reach the new master")

	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		t.Logf("woken %v after the release", at.Sub(released))
		require.Less(t, at.Sub(released), 2*time.Second, "waiter slept through the release")
	case <-time.After(40 * time.Second):
		t.Fatal("not woken")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

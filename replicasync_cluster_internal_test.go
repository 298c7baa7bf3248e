package redlatch

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSyncedRenewalAfterSlotMoved: under WithReplicaSync the
// watchdog sends renewals straight to the master its cluster client's slot
// map names (runBatchesSynced). After the slot moved, that master answers
// -MOVED; the batch counts as a transient failure, and the slot map is
// reloaded (as runSynced does; the plain renewal path follows MOVED through
// go-redis), so the next renewal reaches the new master. (Before, renewals
// kept going to the old master until go-redis reloaded the map by age,
// 10s, and a hold whose lease is shorter was lost although the new master
// had it. Found by a reviewer.)
// (No replicas here: a renewal that reached the right master reports -1,
// renewed but not replicated; one that did not reports nothing, nil.)
func TestSyncedRenewalAfterSlotMoved(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rdb := cl.Client(t)
	c := New(rdb, WithReplicaSync(1, 50*time.Millisecond))
	t.Cleanup(func() { _ = c.Close() })
	key := "{synced-renew}:lock"
	require.NoError(t, rdb.HSet(ctx, key, "o", "me", "c", 1, "t", 1).Err())
	require.NoError(t, rdb.PExpire(ctx, key, time.Minute).Err())
	h := &hold{name: "synced-renew", key: key, kind: 'h', member: "me", lease: 30 * time.Second, renew: true}

	out := c.wd.runBatchesSynced(ctx, [][]*hold{{h}})
	require.Equal(t, [][]int64{{-1}}, out, "renewed on the owner, not replicated (no replicas)")

	owner := cl.ServerFor(key)
	to := 0
	for i, s := range cl.Servers {
		if s != owner {
			to = i
		}
	}
	cl.MoveSlot(t, redistest.KeySlot(key), to)
	moved := time.Now()
	var reached time.Duration
	for time.Since(moved) < 3*time.Second {
		out = c.wd.runBatchesSynced(ctx, [][]*hold{{h}})
		if out[0] != nil {
			reached = time.Since(moved)
			break
		}
		time.Sleep(300 * time.Millisecond) // a renewal period of a 900ms watchdog timeout
	}
	n, err := redis.NewClient(cl.Servers[to].Options()).Exists(ctx, key).Result()
	require.NoError(t, err)
	require.EqualValues(t, 1, n, "the hold is on the new master")
	require.NotZero(t, reached, "no renewal reached the slot's new master within 3s of the move")
}

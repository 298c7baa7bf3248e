package redlatch

import (
	"context"
	"errors"
	"strings"
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

// TestSyncedAfterFailover: the master of a lock's slot dies and its replica
// takes the slot over. Under WithReplicaSync, renewals (runBatchesSynced)
// and acquisitions (runSynced) go straight to the master the slot map
// names, and failed with the dead master's network error until go-redis
// reloaded the map by age (10s): a hold whose lease is shorter was lost
// although the promoted replica had it, which is what the option is for,
// and every acquisition on the slot failed meanwhile. (Without the option,
// go-redis tries another node after a network error and is redirected.) A
// network error from a cluster node now reloads the slot map, as MOVED
// does. Found by a reviewer.
// (The promoted replica has no replica of its own: a renewal that reached
// it reports -1, renewed but not replicated, and an acquisition fails with
// ErrNotReplicated; one that did not reach it reports nil, or a network
// error.)
func TestSyncedAfterFailover(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	key := "{synced-failover}:held" // beside the Mutex's keys, in its slot
	owner, rep := cl.AddReplica(t, key)
	radm := redis.NewClient(rep.Options())
	t.Cleanup(func() { _ = radm.Close() })
	// One Client renews, the other acquires: each has a slot map of its own.
	rdb := cl.Client(t)
	rc, ac := New(rdb, WithReplicaSync(1, 500*time.Millisecond)), New(cl.Client(t), WithReplicaSync(1, 500*time.Millisecond))
	t.Cleanup(func() { _ = rc.Close(); _ = ac.Close() })
	h := &hold{name: "synced-failover", key: key, kind: 'h', member: "me", lease: 30 * time.Second, renew: true}
	m := ac.Mutex("synced-failover")
	ok, err := m.TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, m.Unlock(ctx))
	require.NoError(t, rdb.HSet(ctx, key, "o", "me", "c", 1, "t", 1).Err())
	require.NoError(t, rdb.PExpire(ctx, key, time.Minute).Err())
	require.Equal(t, [][]int64{{1}}, rc.wd.runBatchesSynced(ctx, [][]*hold{{h}}), "renewed and replicated")

	owner.Kill(t)
	require.NoError(t, radm.Do(ctx, "CLUSTER", "FAILOVER", "TAKEOVER").Err())
	require.Eventually(t, func() bool {
		s, _ := radm.Info(ctx, "replication").Result()
		return strings.Contains(s, "role:master")
	}, 10*time.Second, 50*time.Millisecond, "the replica was not promoted")
	var renewed, acquired bool
	for deadline := time.Now().Add(6 * time.Second); time.Now().Before(deadline) && !(renewed && acquired); {
		renewed = renewed || rc.wd.runBatchesSynced(ctx, [][]*hold{{h}})[0] != nil
		if !acquired {
			_, err := ac.Mutex("synced-failover").TryLock(ctx)
			acquired = errors.Is(err, ErrNotReplicated)
		}
		time.Sleep(300 * time.Millisecond) // a renewal period of a 900ms watchdog timeout
	}
	require.True(t, renewed, "no renewal reached the slot's new master within 6s of the failover")
	require.True(t, acquired, "no acquisition reached the slot's new master within 6s of the failover")
}

package redlatch

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestRenewSortedSetHold: the watchdog renews sorted-set entries (the kind
// that permits, read holds and queue places use) by moving their expiry score
// and keeping the key's TTL, and reports the hold lost once the entry is gone.
func TestRenewSortedSetHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := context.Background()
		rdb := b.Client(t)
		c := New(rdb, WithWatchdogTimeout(300*time.Millisecond))
		t.Cleanup(func() { _ = c.Close() })
		key := "{" + redistest.UniqueName(t) + "}:permits"
		require.NoError(t, rdb.ZAdd(ctx, key, redisZ(1, "holder-1")).Err())
		require.NoError(t, rdb.PExpire(ctx, key, 300*time.Millisecond).Err())
		h := c.wd.add("permits", key, 'z', "holder-1", 300*time.Millisecond, true, time.Now())

		time.Sleep(700 * time.Millisecond) // two leases: only renewal keeps it
		score, err := rdb.ZScore(ctx, key, "holder-1").Result()
		require.NoError(t, err)
		require.Greater(t, score, float64(time.Now().UnixMilli()), "expiry score not moved ahead")
		ttl, err := rdb.PTTL(ctx, key).Result()
		require.NoError(t, err)
		require.Positive(t, ttl)
		require.False(t, h.isLost())

		require.NoError(t, rdb.ZRem(ctx, key, "holder-1").Err())
		select {
		case <-h.lostChan():
		case <-time.After(time.Second):
			t.Fatal("a vanished entry was not reported lost")
		}
		c.wd.remove(h)
	})
}

func redisZ(score float64, member string) redis.Z { return redis.Z{Score: score, Member: member} }

// TestHoldLostOnArrival: a hold whose acquisition reply came after its lease
// ran out (a slow link, a paused client) is lost the moment it is tracked,
// before the caller can look at Lost, not at the next tick of a timer.
func TestHoldLostOnArrival(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	c := New(rdb, WithWatchdogTimeout(time.Second))
	t.Cleanup(func() { _ = c.Close(); _ = rdb.Close() })
	h := c.wd.add("late", "{late}:lock", 'h', "owner", 500*time.Millisecond, true, time.Now().Add(-800*time.Millisecond))
	require.True(t, h.isLost(), "a hold past its lease on arrival is not lost at once")
	require.True(t, c.wd.remove(h))
}

// TestSyncedRenewalPerMaster: under WithReplicaSync on a cluster, renewals
// are grouped per master (one pipeline and one WAIT each). With no replica
// to acknowledge, every master still runs its renewals (the keys' TTLs move)
// but no hold's local deadline moves, so each hold is lost at its deadline.
func TestSyncedRenewalPerMaster(t *testing.T) {
	var cluster *redistest.Backend
	for _, b := range redistest.Backends(t) {
		if b.Cluster != nil {
			cluster = &b
		}
	}
	if cluster == nil {
		t.Skip("no redis-server: no local cluster")
	}
	ctx := context.Background()
	rdb := cluster.Client(t)
	c := New(rdb, WithReplicaSync(1, 20*time.Millisecond), WithWatchdogTimeout(900*time.Millisecond))
	t.Cleanup(func() { _ = c.Close() })
	base := redistest.UniqueName(t)
	masters := map[int]bool{}
	var holds []*hold
	var keys []string
	for i := 0; len(masters) < 3 || len(keys) < 12; i++ {
		key := "{" + base + "-" + string(rune('a'+i%26)) + string(rune('a'+i/26)) + "}:lock"
		masters[redistest.KeySlot(key)*3/16384] = true
		require.NoError(t, rdb.HSet(ctx, key, "o", "owner").Err())
		require.NoError(t, rdb.PExpire(ctx, key, 900*time.Millisecond).Err())
		keys = append(keys, key)
		holds = append(holds, c.wd.add("synced", key, 'h', "owner", 900*time.Millisecond, true, time.Now()))
	}
	time.Sleep(500 * time.Millisecond) // past the first renewal (every 300ms)
	for _, key := range keys {
		ttl, err := rdb.PTTL(ctx, key).Result()
		require.NoError(t, err)
		require.Greater(t, ttl, 500*time.Millisecond, "renewal did not run on the master of %s", key)
	}
	for _, h := range holds {
		select {
		case <-h.lostChan():
		case <-time.After(3 * time.Second):
			t.Fatal("a hold whose renewals no replica acknowledged was not lost at its deadline")
		}
		c.wd.remove(h)
	}
}

package redlatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
)

// TestFairGrantRoundExpiry: miniredis formats a whole ZSCORE with 8 or more
// trailing zeros in exponent notation ("1.8e+12"). A grant gives the place's
// expiry to PEXPIREAT, which refuses that form: it is reformatted first, or
// the holder's Unlock would fail halfway (the queue head popped, the hash
// rewritten, nothing published).
func TestFairGrantRoundExpiry(t *testing.T) {
	m := miniredis.RunT(t)
	const wl = 30 * time.Second
	// place expiry = now + wl = 1.8e12 ms exactly
	m.SetTime(time.UnixMilli(1_800_000_000_000 - wl.Milliseconds()))
	newC := func() *redlatch.Client {
		rdb := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = rdb.Close() })
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(wl))
		return c
	}
	a, b := newC(), newC()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	ma := a.FairMutex("round")
	require.NoError(t, ma.Lock(ctx))
	done := make(chan error, 1)
	go func() { done <- b.FairMutex("round").Lock(ctx) }()
	rdb := redis.NewClient(&redis.Options{Addr: m.Addr()})
	defer rdb.Close()
	for {
		n, err := rdb.ZCard(ctx, "{round}:fairq").Result()
		require.NoError(t, err)
		if n == 1 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	s, _ := rdb.ZRangeWithScores(ctx, "{round}:fairx", 0, -1).Result()
	t.Logf("places: %v", s)
	sc, _ := rdb.Do(ctx, "ZSCORE", "{round}:fairx", s[0].Member).Text()
	t.Logf("ZSCORE reply: %q", sc)
	err := ma.Unlock(ctx)
	if err != nil {
		h, _ := rdb.HGetAll(ctx, "{round}:fair").Result()
		q, _ := rdb.ZCard(ctx, "{round}:fairq").Result()
		t.Logf("after the failed Unlock: hash %v, queue length %d", h, q)
	}
	require.NoError(t, err, "Unlock with a waiter whose place expires at a round ms")
	require.NoError(t, <-done)
}

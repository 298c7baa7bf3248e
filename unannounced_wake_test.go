package redlatch_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestQueuedWaiterWokenAtExpiry: a waiter queued behind a waiter of its own
// Client (no attempt of its own, so no remaining lease to sleep on) takes
// the lock soon after the hold that waiter took runs out of its fixed
// lease, not at its default bound of a third of the watchdog timeout.
func TestQueuedWaiterWokenAtExpiry(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		const lease = 300 * time.Millisecond
		first := c.Mutex(name, redlatch.WithLease(lease))
		require.NoError(t, first.Lock(ctx))
		second := c.Mutex(name, redlatch.WithLease(lease))
		third := c.Mutex(name, redlatch.WithLease(lease))
		got2, got3 := make(chan time.Time, 1), make(chan time.Time, 1)
		go func() {
			if second.Lock(ctx) == nil {
				got2 <- time.Now()
			}
		}()
		time.Sleep(50 * time.Millisecond) // second attempts and sleeps first
		go func() {
			if third.Lock(ctx) == nil {
				got3 <- time.Now()
			}
		}()
		// Nobody unlocks: first's lease runs out, second takes the lock,
		// and its lease runs out too.
		var t2 time.Time
		select {
		case t2 = <-got2:
		case <-time.After(3 * time.Second):
			t.Fatal("second waiter not woken at the first hold's expiry")
		}
		select {
		case t3 := <-got3:
			t.Logf("third took the lock %v after second", t3.Sub(t2))
		case <-time.After(3 * time.Second):
			t.Fatal("third waiter not woken at the second hold's expiry")
		}
	})
}

// thirdQueuedBehind locks first, starts second's Lock (an attempt, then a
// sleep) and then third's (queued behind second, no attempt of its own),
// and unlocks first, which transfers the lock to second locally. It
// returns third's result.
func thirdQueuedBehind(t *testing.T, ctx context.Context, first, second, third *redlatch.Mutex) <-chan error {
	t.Helper()
	require.NoError(t, first.Lock(ctx))
	got2, got3 := make(chan error, 1), make(chan error, 1)
	go func() { got2 <- second.Lock(ctx) }()
	time.Sleep(100 * time.Millisecond) // second attempts, joins, sleeps
	go func() { got3 <- third.Lock(ctx) }()
	time.Sleep(100 * time.Millisecond)    // third queues behind second, no attempt
	require.NoError(t, first.Unlock(ctx)) // local transfer to second
	require.NoError(t, <-got2)
	return got3
}

// requireTakesFreeLock requires the Lock whose result got delivers to take
// the lock, freed at start, within 500ms.
func requireTakesFreeLock(t *testing.T, got <-chan error, start time.Time) {
	t.Helper()
	select {
	case err := <-got:
		require.NoError(t, err)
		t.Logf("third took the free lock %v after the Unlock", time.Since(start))
	case <-time.After(500 * time.Millisecond):
		err := <-got
		t.Fatalf("third slept on a free lock: took it %v after the Unlock (err %v)", time.Since(start), err)
	}
}

// TestUnlockOfGoneHoldWakesQueued: when the holder's Unlock finds its hold
// already gone in Redis (its lease ran out before the Unlock arrived, an
// eviction, a failover, a DEL) before the watchdog noticed, the waiter
// queued locally without an attempt (third) tries at once: the lock may be
// free. (It slept its whole bound, a third of the watchdog timeout: the
// transfer reserved for it was undone without a wake-up, and no loss was
// reported.)
func TestUnlockOfGoneHoldWakesQueued(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		refuse := &refuseHook{match: scriptWith(lockKey(name)), nth: 1} // the Unlock below
		rdb.AddHook(refuse)
		c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(6*time.Second)) // queued sleep: 2s
		t.Cleanup(func() { _ = c.Close() })
		second := c.Mutex(name, redlatch.WithLease(5*time.Second))
		got3 := thirdQueuedBehind(t, ctx, c.Mutex(name, redlatch.WithLease(5*time.Second)), second, c.Mutex(name))
		// second's hold ends in Redis before its Unlock arrives.
		require.NoError(t, b.Client(t).Del(ctx, lockKey(name)).Err())
		start := time.Now()
		err := second.Unlock(ctx)
		require.True(t, errors.Is(err, redlatch.ErrNotHeld), "Unlock: %v", err)
		requireTakesFreeLock(t, got3, start)
	})
}

// TestFailedPublicUnlockWakesQueued: after 8 local transfers in a row the
// next Unlock releases publicly (no transfer reserved, a yield armed). When
// that Unlock fails before reaching Redis (here its ctx is cancelled
// already; a network error likewise), the watchdog forgets the hold, which
// runs out unannounced: a local waiter is woken to try, and the last
// waiter, queued without an attempt, takes the lock once the hold's 300ms
// lease ran out (it slept a third of the watchdog timeout).
func TestFailedPublicUnlockWakesQueued(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Name == "cluster" {
			t.Skip("one backend is enough")
		}
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		refuse := &refuseHook{match: scriptWith(lockKey(name)), nth: 1} // the Unlock below
		rdb.AddHook(refuse)
		c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(6*time.Second)) // queued sleep: 2s
		t.Cleanup(func() { _ = c.Close() })
		const lease = 300 * time.Millisecond
		ms := make([]*redlatch.Mutex, 10)
		got := make([]chan error, 10)
		for i := range ms {
			ms[i] = c.Mutex(name, redlatch.WithLease(lease))
			got[i] = make(chan error, 1)
		}
		require.NoError(t, ms[0].Lock(ctx))
		for i := 1; i < 10; i++ {
			go func() { got[i] <- ms[i].Lock(ctx) }()
			time.Sleep(30 * time.Millisecond) // in order: 1 attempts, 2..9 queue without one
		}
		for i := 0; i < 8; i++ { // 8 local transfers: 0->1 ... 7->8
			require.NoError(t, ms[i].Unlock(ctx))
			require.NoError(t, <-got[i+1])
		}
		refuse.armed.Store(true)
		start := time.Now()
		err := ms[8].Unlock(ctx) // public release, fails before Redis
		t.Logf("Unlock: %v", err)
		select {
		case err := <-got[9]:
			require.NoError(t, err)
			t.Logf("last waiter took the lock %v after the failed Unlock", time.Since(start))
		case <-time.After(lease + 400*time.Millisecond):
			err := <-got[9]
			t.Fatalf("last waiter slept on a free lock: took it %v after the failed Unlock (lease %v; err %v)",
				time.Since(start), lease, err)
		}
	})
}

// TestQueuedWaiterLostOwnReleaseWakeup: a waiter queued behind a waiter of
// its own Client (no attempt of its own, so no remaining lease to sleep on)
// is woken by its own Client's public release of the lock even when the
// release's wake-up message is lost (here the user may not PUBLISH: the
// release is done, its wake-up dropped, as README says; a subscriber that
// misses the message likewise). It slept a third of the watchdog timeout
// on the free lock, past the released hold's whole lease: a lost wake-up
// delays a Mutex waiter by at most the holder's remaining lease. (Found by
// a reviewer.)
func TestQueuedWaiterLostOwnReleaseWakeup(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx := ctxT(t, 30*time.Second)
	adm := srv.Client(t)
	// Subscribes, but its PUBLISH (in the release script's pcall) is refused.
	require.NoError(t, adm.Do(ctx, "ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-publish", "-spublish").Err())
	o := srv.Options()
	o.Username, o.Password = "app", "pw"
	rdb := redis.NewClient(o)
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(6*time.Second)) // queued sleep: 2s
	name := redistest.UniqueName(t)

	second := c.Mutex(name, redlatch.WithLease(600*time.Millisecond))
	got3 := thirdQueuedBehind(t, ctx, c.Mutex(name, redlatch.WithLease(300*time.Millisecond)), second,
		c.Mutex(name, redlatch.WithLease(300*time.Millisecond))) // third's lease is shorter: no transfer to it
	start := time.Now()
	require.NoError(t, second.Unlock(ctx)) // public release: third's lease is shorter; its wake-up is lost
	requireTakesFreeLock(t, got3, start)   // within the released hold's 600ms lease
}

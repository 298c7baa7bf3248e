package redlatch_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// fairQueue is the documented key of a FairMutex's queue (arrival numbers).
func fairQueue(name string) string { return "{" + name + "}:fairq" }

// fairKeysLeft returns the keys of the lock called name, on every node,
// other than its fencing counter.
func fairKeysLeft(t *testing.T, b redistest.Backend, name string) []string {
	t.Helper()
	ctx := ctxT(t, 5*time.Second)
	var out []string
	for _, r := range b.NodeClients(t) {
		keys, err := r.Keys(ctx, "{"+name+"}*").Result()
		require.NoError(t, err)
		for _, k := range keys {
			if k != "{"+name+"}:fence" {
				out = append(out, k)
			}
		}
	}
	return out
}

// requireNoFairKeys waits a little for the keys of an idle lock to go (a
// last Unlock may still be in flight) and fails when any but the fencing
// counter remains.
func requireNoFairKeys(t *testing.T, b redistest.Backend, name string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		left := fairKeysLeft(t, b, name)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("keys left when idle: %v", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitQueued waits until n waiters are queued for name.
func waitQueued(t *testing.T, rdb redis.UniversalClient, name string, n int64) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	for {
		got, err := rdb.ZCard(ctx, fairQueue(name)).Result()
		require.NoError(t, err)
		if got == n {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("queue length %d, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFairOrder: 12 waiters over 3 Clients, arriving 40ms apart, get the
// lock in exact arrival order, each with a higher fencing token, and no key
// but the fencing counter remains afterwards.
func TestFairOrder(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 60*time.Second)
		name := redistest.UniqueName(t)
		cs := []*redlatch.Client{newClient(t, b), newClient(t, b), newClient(t, b)}
		rdb := b.Client(t)

		holder := cs[0].FairMutex(name)
		require.NoError(t, holder.Lock(ctx))
		first := holder.Token()

		const waiters = 12
		var (
			mu     sync.Mutex
			order  []int
			tokens []int64
		)
		var wg sync.WaitGroup
		errs := make(chan error, waiters)
		for i := range waiters {
			m := cs[i%3].FairMutex(name)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := m.Lock(ctx); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				order = append(order, i)
				tokens = append(tokens, m.Token())
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
				if err := m.Unlock(ctx); err != nil {
					errs <- err
				}
			}()
			// Arrivals 40ms apart (at least: each is queued before the next
			// starts, however loaded the machine).
			waitQueued(t, rdb, name, int64(i+1))
			time.Sleep(40 * time.Millisecond)
		}
		ok, err := cs[1].FairMutex(name).TryLock(ctx)
		require.NoError(t, err)
		require.False(t, ok, "TryLock must not jump the queue")

		require.NoError(t, holder.Unlock(ctx))
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		want := make([]int, waiters)
		for i := range want {
			want[i] = i
		}
		require.Equal(t, want, order, "acquisition order")
		require.Greater(t, tokens[0], first)
		require.True(t, slices.IsSorted(tokens), "tokens %v", tokens)
		require.Len(t, slices.Compact(slices.Clone(tokens)), waiters, "a new token per owner")
		requireNoFairKeys(t, b, name)
	})
}

// TestFairReentrant: holds are counted per owner, the token is kept across
// re-entries, handles with one WithOwner id share the holds, and the owner
// re-enters at once even while others wait.
func TestFairReentrant(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		m := c.FairMutex(name)
		for i := 1; i <= 3; i++ {
			require.NoError(t, m.Lock(ctx))
			n, err := m.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, i, n)
		}
		tok := m.Token()
		require.Positive(t, tok)

		// A waiter queues; the owner still re-enters at once.
		other := c.FairMutex(name)
		got := make(chan error, 1)
		go func() { got <- other.Lock(ctx) }()
		waitQueued(t, b.Client(t), name, 1)
		ok, err := m.TryLock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, tok, m.Token(), "re-entry keeps the token")
		n, err := other.HoldCount(ctx)
		require.NoError(t, err)
		require.Zero(t, n)

		for i := 4; i >= 1; i-- {
			require.NoError(t, m.Unlock(ctx))
			n, err := m.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, i-1, n)
		}
		require.Zero(t, m.Token())
		require.ErrorIs(t, m.Unlock(ctx), redlatch.ErrNotHeld)
		require.NoError(t, <-got)
		require.Greater(t, other.Token(), tok)
		locked, err := m.IsLocked(ctx)
		require.NoError(t, err)
		require.True(t, locked)
		ttl, err := m.TTL(ctx)
		require.NoError(t, err)
		require.Positive(t, ttl)
		require.NoError(t, other.Unlock(ctx))

		// Handles sharing an owner id share the holds.
		a := c.FairMutex(name, redlatch.WithOwner("worker-7"))
		bb := c.FairMutex(name, redlatch.WithOwner("worker-7"))
		require.NoError(t, a.Lock(ctx))
		require.NoError(t, bb.Lock(ctx))
		require.Equal(t, a.Token(), bb.Token())
		n, err = a.HoldCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 2, n)
		require.NoError(t, bb.Unlock(ctx))
		require.NoError(t, bb.Unlock(ctx), "a shared owner releases what the other handle took")
		locked, err = a.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
		ttl, err = a.TTL(ctx)
		require.NoError(t, err)
		require.Zero(t, ttl)
		requireNoFairKeys(t, b, name)
	})
}

// TestFairCancelledWaiter: a waiter whose ctx ends leaves the queue at once,
// and the waiter behind it gets the lock at the holder's Unlock.
func TestFairCancelledWaiter(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c1, c2 := newClient(t, b), newClient(t, b)
		rdb := b.Client(t)
		holder := c1.FairMutex(name)
		require.NoError(t, holder.Lock(ctx))

		cctx, cancel := context.WithCancel(ctx)
		gone := make(chan error, 1)
		go func() { gone <- c2.FairMutex(name).Lock(cctx) }()
		waitQueued(t, rdb, name, 1)
		behind := c1.FairMutex(name)
		got := make(chan error, 1)
		go func() { got <- behind.Lock(ctx) }()
		waitQueued(t, rdb, name, 2)

		cancel()
		requireWaitErr(t, <-gone, cctx)
		n, err := rdb.ZCard(ctx, fairQueue(name)).Result()
		require.NoError(t, err)
		require.EqualValues(t, 1, n, "the cancelled waiter left the queue at once")

		released := time.Now()
		require.NoError(t, holder.Unlock(ctx))
		select {
		case err := <-got:
			require.NoError(t, err)
		case <-time.After(5 * time.Second):
			t.Fatal("the waiter behind a cancelled one was stalled")
		}
		t.Logf("handoff past a cancelled waiter: %v", time.Since(released))
		require.NoError(t, behind.Unlock(ctx))
		requireNoFairKeys(t, b, name)
	})
}

// TestFairCancelledAfterHandoff: a waiter whose ctx ends just as the lock is
// handed to it releases the lock, so the next waiter gets it.
func TestFairCancelledAfterHandoff(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		rdb := b.Client(t)
		holder := c.FairMutex(name)
		require.NoError(t, holder.Lock(ctx))

		cctx, cancel := context.WithCancel(ctx)
		first := c.FairMutex(name)
		firstErr := make(chan error, 1)
		go func() { firstErr <- first.Lock(cctx) }()
		waitQueued(t, rdb, name, 1)
		behind := c.FairMutex(name)
		got := make(chan error, 1)
		go func() { got <- behind.Lock(ctx) }()
		waitQueued(t, rdb, name, 2)

		// Release and cancel at once: whichever wins, the first waiter ends
		// up without the lock or with it, and the one behind is not stalled.
		require.NoError(t, holder.Unlock(ctx))
		cancel()
		err := <-firstErr
		if err == nil {
			require.NoError(t, first.Unlock(ctx))
		} else {
			requireWaitErr(t, err, cctx)
		}
		select {
		case err := <-got:
			require.NoError(t, err)
		case <-time.After(5 * time.Second):
			t.Fatal("the waiter behind was stalled")
		}
		require.NoError(t, behind.Unlock(ctx))
		requireNoFairKeys(t, b, name)
	})
}

// TestFairDeadWaiter: a waiter whose connection died while queued (its
// Client has a 600ms watchdog timeout) delays the waiter behind it by at
// most that timeout, whether the lock is handed to it (released after that
// timeout, unclaimed) or its place expires first (evicted); the waiter behind
// has the default 30s timeout, so its own 10s check period does not save it.
func TestFairDeadWaiter(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		const deadTimeout = 600 * time.Millisecond
		for _, tc := range []struct {
			name  string
			delay time.Duration
		}{{"HandedOff", 0}, {"Evicted", 3 * deadTimeout}} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := ctxT(t, 30*time.Second)
				name := redistest.UniqueName(t)
				c := newClient(t, b)
				rdb := b.Client(t)
				deadRdb := b.Client(t)
				dead := redlatch.New(deadRdb, redlatch.WithWatchdogTimeout(deadTimeout))
				t.Cleanup(func() { _ = dead.Close() })

				holder := c.FairMutex(name)
				require.NoError(t, holder.Lock(ctx))
				deadErr := make(chan error, 1)
				go func() { deadErr <- dead.FairMutex(name).Lock(ctx) }()
				waitQueued(t, rdb, name, 1)
				behind := c.FairMutex(name)
				got := make(chan error, 1)
				go func() { got <- behind.Lock(ctx) }()
				waitQueued(t, rdb, name, 2)

				// The connection dies: no renewal, no withdrawal, no claim.
				require.NoError(t, deadRdb.Close())
				time.Sleep(tc.delay)
				released := time.Now()
				require.NoError(t, holder.Unlock(ctx))
				select {
				case err := <-got:
					require.NoError(t, err)
				case <-time.After(deadTimeout + 5*time.Second):
					t.Fatal("the waiter behind a dead one was stalled")
				}
				t.Logf("handoff past a dead waiter: %v (bound %v)", time.Since(released), deadTimeout)
				require.Error(t, <-deadErr)
				require.NoError(t, behind.Unlock(ctx))
				requireNoFairKeys(t, b, name)
			})
		}
	})
}

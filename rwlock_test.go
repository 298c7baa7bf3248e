package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// rwKeys returns the keys of the lock name present on any node, sorted.
func rwKeys(t *testing.T, b redistest.Backend, name string) []string {
	t.Helper()
	var out []string
	for _, r := range b.NodeClients(t) {
		ks, err := r.Keys(context.Background(), "{"+name+"}*").Result()
		require.NoError(t, err)
		out = append(out, ks...)
	}
	sort.Strings(out)
	return out
}

// requireIdle checks that nothing but the fence key is left of the lock.
func requireIdle(t *testing.T, b redistest.Backend, name string) {
	t.Helper()
	require.Equal(t, []string{"{" + name + "}:fence"}, rwKeys(t, b, name))
}

func tryR(t *testing.T, ctx context.Context, m *redlatch.RWMutex) bool {
	t.Helper()
	ok, err := m.TryRLock(ctx)
	require.NoError(t, err)
	return ok
}

func tryW(t *testing.T, ctx context.Context, m *redlatch.RWMutex) bool {
	t.Helper()
	ok, err := m.TryLock(ctx)
	require.NoError(t, err)
	return ok
}

// TestRWSharedReaders: 5 readers hold at once and keep a writer out; the
// writer then keeps readers out; an idle lock leaves only its fence key.
func TestRWSharedReaders(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c1, c2 := newClient(t, b), newClient(t, b)
		name := redistest.UniqueName(t)
		var readers []*redlatch.RWMutex
		for i := 0; i < 5; i++ {
			r := []*redlatch.Client{c1, c2}[i%2].RWMutex(name)
			require.True(t, tryR(t, ctx, r), "reader %d", i)
			readers = append(readers, r)
		}
		w := c2.RWMutex(name)
		require.False(t, tryW(t, ctx, w), "a writer while readers hold")
		require.Zero(t, w.Token())
		locked, err := w.IsLocked(ctx)
		require.NoError(t, err)
		require.True(t, locked)
		ttl, err := w.TTL(ctx)
		require.NoError(t, err)
		require.Greater(t, ttl, 20*time.Second)

		// A writer that gave up waiting does not keep readers out.
		wctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
		err = w.Lock(wctx)
		cancel()
		requireWaitErr(t, err, wctx)
		extra := c1.RWMutex(name)
		require.True(t, tryR(t, ctx, extra))
		require.NoError(t, extra.RUnlock(ctx))

		for i, r := range readers {
			require.False(t, tryW(t, ctx, w), "writer with %d readers left", 5-i)
			require.NoError(t, r.RUnlock(ctx))
			require.ErrorIs(t, r.RUnlock(ctx), redlatch.ErrNotHeld)
		}
		require.True(t, tryW(t, ctx, w))
		require.Positive(t, w.Token())
		for _, r := range readers {
			require.False(t, tryR(t, ctx, r), "a reader while the writer holds")
		}
		require.False(t, tryW(t, ctx, c1.RWMutex(name)), "a second writer")
		require.ErrorIs(t, readers[0].Unlock(ctx), redlatch.ErrNotHeld)
		require.NoError(t, w.Unlock(ctx))
		require.Zero(t, w.Token())
		require.ErrorIs(t, w.Unlock(ctx), redlatch.ErrNotHeld)
		locked, err = w.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
		ttl, err = w.TTL(ctx)
		require.NoError(t, err)
		require.Zero(t, ttl)
		requireIdle(t, b, name)
	})
}

// TestRWReentrantDowngrade: both sides re-enter; a writer that also reads
// keeps reading after its write Unlock, and other readers may join then.
func TestRWReentrantDowngrade(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		m := c.RWMutex(name)
		require.NoError(t, m.Lock(ctx))
		tok := m.Token()
		require.NoError(t, m.Lock(ctx))
		require.Equal(t, tok, m.Token(), "re-entry keeps the token")
		require.NoError(t, m.RLock(ctx), "downgrade: the writer reads")
		require.NoError(t, m.RLock(ctx))

		other := c.RWMutex(name)
		require.False(t, tryR(t, ctx, other))
		require.NoError(t, m.Unlock(ctx))
		require.False(t, tryR(t, ctx, other), "still written once")
		require.NoError(t, m.Unlock(ctx))
		require.Zero(t, m.Token())
		require.Nil(t, m.Lost())
		require.NotNil(t, m.RLost())

		// Downgraded: still read-held by m, other readers join, writers wait.
		require.True(t, tryR(t, ctx, other))
		require.False(t, tryW(t, ctx, c.RWMutex(name)))
		require.NoError(t, other.RUnlock(ctx))
		require.NoError(t, m.RUnlock(ctx))
		require.False(t, tryW(t, ctx, c.RWMutex(name)), "m still reads once")
		require.NoError(t, m.RUnlock(ctx))
		require.ErrorIs(t, m.RUnlock(ctx), redlatch.ErrNotHeld)

		// Handles sharing an owner share the holds.
		a := c.RWMutex(name, redlatch.WithOwner("svc-1"))
		a2 := c.RWMutex(name, redlatch.WithOwner("svc-1"))
		require.NoError(t, a.RLock(ctx))
		require.True(t, tryR(t, ctx, a2))
		require.NoError(t, a2.RUnlock(ctx))
		require.NoError(t, a2.RUnlock(ctx), "a shared owner releases what the other handle took")
		locked, err := a.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
		requireIdle(t, b, name)
	})
}

// TestRWUpgrade: a reader asking for the write lock gets ErrUpgrade at
// once, and its read hold is untouched.
func TestRWUpgrade(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		m := c.RWMutex(name, redlatch.WithOwner("reader"))
		require.NoError(t, m.RLock(ctx))
		start := time.Now()
		require.ErrorIs(t, m.Lock(ctx), redlatch.ErrUpgrade)
		ok, err := m.TryLock(ctx)
		require.ErrorIs(t, err, redlatch.ErrUpgrade)
		require.False(t, ok)
		same := c.RWMutex(name, redlatch.WithOwner("reader"))
		require.ErrorIs(t, same.Lock(ctx), redlatch.ErrUpgrade, "another handle of the owner")
		require.Less(t, time.Since(start), 5*time.Second, "no wait")
		require.Zero(t, m.Token())

		// The failed upgrade left no waiting place: readers still get in.
		r := c.RWMutex(name)
		require.True(t, tryR(t, ctx, r))
		require.NoError(t, r.RUnlock(ctx))
		require.NoError(t, m.RUnlock(ctx))
		require.NoError(t, m.Lock(ctx), "without the read hold, the owner may write")
		require.NoError(t, m.Unlock(ctx))
		requireIdle(t, b, name)
	})
}

// TestRWWriterNotStarved: 4 goroutines take overlapping 30ms read holds in
// a loop; a writer still gets in within about one read hold.
func TestRWWriterNotStarved(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		clients := []*redlatch.Client{newClient(t, b), newClient(t, b)}
		name := redistest.UniqueName(t)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var reads atomic.Int64
		var writing atomic.Bool
		errs := make(chan error, 8)
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := clients[g%2].RWMutex(name)
				time.Sleep(time.Duration(g) * 8 * time.Millisecond) // overlap the holds
				for {
					select {
					case <-stop:
						return
					default:
					}
					if err := r.RLock(ctx); err != nil {
						errs <- err
						return
					}
					if writing.Load() {
						errs <- errors.New("a reader inside with the writer")
					}
					reads.Add(1)
					time.Sleep(30 * time.Millisecond)
					if err := r.RUnlock(ctx); err != nil {
						errs <- err
						return
					}
				}
			}(g)
		}
		time.Sleep(200 * time.Millisecond)
		w := clients[0].RWMutex(name)
		for i := 0; i < 3; i++ {
			start := time.Now()
			require.NoError(t, w.Lock(ctx))
			waited := time.Since(start)
			writing.Store(true)
			t.Logf("writer waited %v", waited)
			require.Less(t, waited, 700*time.Millisecond)
			time.Sleep(10 * time.Millisecond)
			writing.Store(false)
			require.NoError(t, w.Unlock(ctx))
			time.Sleep(100 * time.Millisecond)
		}
		close(stop)
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Greater(t, reads.Load(), int64(8), "readers made progress")
		requireIdle(t, b, name)
	})
}

// TestRWReaderLease: a reader with a 300ms lease that never unlocks stops
// blocking a writer after its lease, while another reader keeps renewing
// its own read hold meanwhile.
func TestRWReaderLease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		crashed := c.RWMutex(name, redlatch.WithLease(300*time.Millisecond))
		require.NoError(t, crashed.RLock(ctx))
		// Renewed every 300ms, on a 900ms lease: it must be renewed by the
		// end of the sleep.
		live := newClient(t, b, redlatch.WithWatchdogTimeout(900*time.Millisecond)).RWMutex(name)
		require.NoError(t, live.RLock(ctx))

		time.Sleep(time.Second)
		select {
		case <-crashed.RLost():
		default:
			t.Fatal("RLost of the expired read hold is not closed")
		}
		select {
		case <-live.RLost():
			t.Fatal("the renewed read hold was lost")
		default:
		}
		w := c.RWMutex(name)
		require.False(t, tryW(t, ctx, w), "the live reader still holds")
		require.NoError(t, live.RUnlock(ctx))
		require.True(t, tryW(t, ctx, w), "the expired reader no longer counts")
		require.NoError(t, w.Unlock(ctx))
		require.ErrorIs(t, crashed.RUnlock(ctx), redlatch.ErrNotHeld)

		// Alone: a writer waiting on a never-released 300ms read hold gets in
		// after the lease.
		require.NoError(t, crashed.RLock(ctx))
		start := time.Now()
		require.NoError(t, w.Lock(ctx))
		waited := time.Since(start)
		t.Logf("writer waited %v", waited)
		require.Less(t, waited, 5*time.Second)
		require.NoError(t, w.Unlock(ctx))
		requireIdle(t, b, name)
	})
}

// TestRWWakeups: a read unlock that frees the lock wakes a waiting writer,
// and a write unlock wakes every waiting reader, by pub/sub (well before
// the 30s leases would end the waits).
func TestRWWakeups(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c1, c2 := newClient(t, b), newClient(t, b)
		name := redistest.UniqueName(t)
		r := c1.RWMutex(name)
		require.NoError(t, r.RLock(ctx))
		w := c2.RWMutex(name)
		got := make(chan error, 1)
		go func() { got <- w.Lock(ctx) }()
		time.Sleep(200 * time.Millisecond)
		// The waiting writer keeps new readers out.
		require.False(t, tryR(t, ctx, c1.RWMutex(name)))
		released := time.Now()
		require.NoError(t, r.RUnlock(ctx))
		requireNoErrWithin(t, got, 5*time.Second, "the writer was not woken")
		t.Logf("writer woken after %v", time.Since(released))

		var wg sync.WaitGroup
		readers := make(chan error, 4)
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func(c *redlatch.Client) {
				defer wg.Done()
				rr := c.RWMutex(name)
				if err := rr.RLock(ctx); err != nil {
					readers <- err
					return
				}
				readers <- rr.RUnlock(ctx)
			}([]*redlatch.Client{c1, c2}[i%2])
		}
		time.Sleep(200 * time.Millisecond)
		require.Len(t, readers, 0, "readers got in while the writer holds")
		released = time.Now()
		require.NoError(t, w.Unlock(ctx))
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the readers were not woken")
		}
		t.Logf("readers woken after %v", time.Since(released))
		close(readers)
		for err := range readers {
			require.NoError(t, err)
		}
		requireIdle(t, b, name)
	})
}

// TestRWTokens: every new writer gets a higher token.
func TestRWTokens(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		last := int64(0)
		for i := 0; i < 5; i++ {
			w := c.RWMutex(name)
			require.NoError(t, w.Lock(ctx))
			require.Greater(t, w.Token(), last)
			last = w.Token()
			// Readers in between do not matter.
			require.NoError(t, w.Unlock(ctx))
			r := c.RWMutex(name)
			require.NoError(t, r.RLock(ctx))
			require.Zero(t, r.Token())
			require.NoError(t, r.RUnlock(ctx))
		}
		// The Mutex of the same name shares the fence: its tokens go on
		// increasing.
		m := c.Mutex(name)
		require.NoError(t, m.Lock(ctx))
		require.Greater(t, m.Token(), last)
		require.NoError(t, m.Unlock(ctx))
	})
}

// TestRWLostAndForceUnlock: ForceUnlock releases the writer and the
// readers, whose Lost and RLost close at the next renewal.
func TestRWLostAndForceUnlock(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(900*time.Millisecond))
		name := redistest.UniqueName(t)
		w := c.RWMutex(name)
		require.NoError(t, w.Lock(ctx))
		require.NoError(t, w.RLock(ctx))
		time.Sleep(time.Second) // renewed beyond the first lease
		ttl, err := w.TTL(ctx)
		require.NoError(t, err)
		require.Positive(t, ttl)
		require.LessOrEqual(t, ttl, 900*time.Millisecond)
		select {
		case <-w.Lost():
			t.Fatal("lost while renewed")
		default:
		}
		ok, err := w.ForceUnlock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		for _, ch := range []<-chan struct{}{w.Lost(), w.RLost()} {
			select {
			case <-ch:
			case <-time.After(5 * time.Second):
				t.Fatal("Lost not closed after ForceUnlock")
			}
		}
		require.ErrorIs(t, w.Unlock(ctx), redlatch.ErrNotHeld)
		require.ErrorIs(t, w.RUnlock(ctx), redlatch.ErrNotHeld)
		ok, err = w.ForceUnlock(ctx)
		require.NoError(t, err)
		require.False(t, ok)

		// Readers, and a writer waiting on them, woken by ForceUnlock.
		r := c.RWMutex(name)
		require.NoError(t, r.RLock(ctx))
		got := make(chan error, 1)
		go func() { got <- w.Lock(ctx) }()
		time.Sleep(100 * time.Millisecond)
		ok, err = r.ForceUnlock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, <-got)
		select {
		case <-r.RLost():
		case <-time.After(5 * time.Second):
			t.Fatal("RLost not closed after ForceUnlock")
		}
		require.NoError(t, w.Unlock(ctx))
		requireIdle(t, b, name)
	})
}

// TestRWDo: Do on the write side and on RLocker.
func TestRWDo(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		m := c.RWMutex(name)
		require.NoError(t, redlatch.Do(ctx, m.RLocker(), func(ctx context.Context) error {
			require.False(t, tryW(t, ctx, c.RWMutex(name)))
			return nil
		}))
		require.NoError(t, redlatch.Do(ctx, m, func(ctx context.Context) error {
			require.False(t, tryR(t, ctx, c.RWMutex(name)))
			return nil
		}))
		requireIdle(t, b, name)
	})
}

// TestRWInvalid: bad input never reaches Redis.
func TestRWInvalid(t *testing.T) {
	ctx := ctxT(t, 5*time.Second)
	b := redistest.Backends(t)[0]
	c := newClient(t, b)
	for _, m := range []*redlatch.RWMutex{
		c.RWMutex(""), c.RWMutex("x", redlatch.WithLease(0)), c.RWMutex("x", redlatch.WithOwner("")),
	} {
		require.ErrorIs(t, m.Lock(ctx), redlatch.ErrInvalidArgument)
		require.ErrorIs(t, m.RLock(ctx), redlatch.ErrInvalidArgument)
		_, err := m.TryRLock(ctx)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		require.ErrorIs(t, m.RUnlock(ctx), redlatch.ErrInvalidArgument)
		_, err = m.IsLocked(ctx)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	}
	var nilClient *redlatch.Client
	require.ErrorIs(t, nilClient.RWMutex("x").RLock(ctx), redlatch.ErrInvalidArgument)
}

func ExampleRWMutex() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	// Readers share the lock.
	a, b := client.RWMutex("catalog"), client.RWMutex("catalog")
	_ = a.RLock(ctx)
	_ = b.RLock(ctx)
	w := client.RWMutex("catalog")
	ok, _ := w.TryLock(ctx)
	fmt.Println("writer while two read:", ok)
	_ = a.RUnlock(ctx)
	_ = b.RUnlock(ctx)

	// The writer excludes everyone; it may downgrade to a read.
	_ = w.Lock(ctx)
	_ = w.RLock(ctx)
	_ = w.Unlock(ctx)
	ok, _ = a.TryRLock(ctx)
	fmt.Println("reader after the downgrade:", ok)

	// A reader cannot upgrade.
	fmt.Println(errors.Is(a.Lock(ctx), redlatch.ErrUpgrade))
	// Output:
	// writer while two read: false
	// reader after the downgrade: true
	// true
}

// TestRWMixedProgress: readers and writers sharing one Client all make
// progress, each wait ending by a wake-up (a missed one would cost the
// waiter 10s, a third of the watchdog timeout).
func TestRWMixedProgress(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		deadline := time.Now().Add(500 * time.Millisecond)
		var wg sync.WaitGroup
		var writers, readers atomic.Int32
		errs := make(chan error, 8)
		var ops atomic.Int64
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				m := c.RWMutex(name)
				for i := 0; time.Now().Before(deadline); i++ {
					t0 := time.Now()
					write := (i+g)%5 == 0
					var err error
					if write {
						err = m.Lock(ctx)
					} else {
						err = m.RLock(ctx)
					}
					if err != nil {
						errs <- err
						return
					}
					if d := time.Since(t0); d > 3*time.Second {
						errs <- fmt.Errorf("waited %v (write %v)", d, write)
					}
					if write {
						if writers.Add(1) != 1 || readers.Load() != 0 {
							errs <- errors.New("a writer not alone")
						}
						writers.Add(-1)
						err = m.Unlock(ctx)
					} else {
						readers.Add(1)
						if writers.Load() != 0 {
							errs <- errors.New("a reader with a writer")
						}
						readers.Add(-1)
						err = m.RUnlock(ctx)
					}
					if err != nil {
						errs <- err
						return
					}
					ops.Add(1)
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		t.Logf("%d operations", ops.Load())
		requireIdle(t, b, name)
	})
}

// TestRWWaitingPlaceRenewed: a writer waiting longer than the watchdog
// timeout keeps its place, so new readers still queue behind it.
func TestRWWaitingPlaceRenewed(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(600*time.Millisecond))
		name := redistest.UniqueName(t)
		r := c.RWMutex(name)
		require.NoError(t, r.RLock(ctx))
		w := c.RWMutex(name)
		got := make(chan error, 1)
		go func() { got <- w.Lock(ctx) }()
		time.Sleep(1500 * time.Millisecond)
		require.False(t, tryR(t, ctx, c.RWMutex(name)), "a new reader passed the waiting writer")
		require.True(t, tryR(t, ctx, r), "the reader already in re-enters")
		require.NoError(t, r.RUnlock(ctx))
		require.NoError(t, r.RUnlock(ctx))
		requireNoErrWithin(t, got, 5*time.Second, "the writer was not woken")
		require.NoError(t, w.Unlock(ctx))
		requireIdle(t, b, name)
	})
}

// TestRWLateAttemptAfterUndo: a write or read attempt stuck in a slow link,
// whose caller timed out and undid it before it reached Redis, takes
// nothing when it arrives late: the undo left a tombstone.
func TestRWLateAttemptAfterUndo(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c, proxy := proxiedClient(t, b)

		for _, write := range []bool{true, false} {
			name := redistest.UniqueName(t)
			m := c.RWMutex(name, redlatch.WithLease(time.Minute))
			lock, unlock := m.Lock, m.Unlock
			if !write {
				lock, unlock = m.RLock, m.RUnlock
			}
			require.NoError(t, lock(ctx)) // scripts loaded, connection open
			require.NoError(t, unlock(ctx))

			lateAttempt(t, ctx, proxy, lock)
			admin := b.Client(t)
			require.Never(t, func() bool { // runs in a goroutine: no require inside
				n, err := admin.Exists(ctx, "{"+name+"}:rw").Result()
				return err != nil || n != 0
			}, 300*time.Millisecond, 10*time.Millisecond, "write=%v: the late attempt took the lock", write)
			require.NoError(t, lock(ctx))
			require.NoError(t, unlock(ctx))
		}
	})
}

// manyReaders writes n read holds of distinct owners into the lock hash of
// name, with the fields rw_rlock.lua writes for a read hold begun by one
// RLock (rc:, re:, rq:, rg:), each with a lease of its own ending in lease
// (server time). It stands for n reader handles holding at once (the
// README's advice: one handle per concurrent reader), without n round trips.
func manyReaders(t *testing.T, ctx context.Context, b redistest.Backend, name string, n int, lease time.Duration) {
	t.Helper()
	admin := b.Client(t)
	now, err := admin.Time(ctx).Result()
	require.NoError(t, err)
	exp := strconv.FormatInt(now.Add(lease).UnixMilli(), 10)
	key := "{" + name + "}:rw"
	args := make([]any, 0, 8*n)
	for i := 0; i < n; i++ {
		o := fmt.Sprintf("reader-%d", i)
		q := fmt.Sprintf("req-%d", i)
		args = append(args, "rc:"+o, "1", "re:"+o, exp, "rq:"+o, q, "rg:"+o, q)
	}
	require.NoError(t, admin.HSet(ctx, key, args...).Err())
	// The hash's TTL stays the latest lease's (as rw_commit keeps it).
	ttl, err := admin.PTTL(ctx, key).Result()
	require.NoError(t, err)
	if ttl < lease {
		require.NoError(t, admin.PExpire(ctx, key, lease).Err())
	}
}

// TestRWManyReaders: an RWMutex read by a few thousand owners at once
// (each concurrent reader with its own handle, as the README advises) still
// works when their holds end together while the hash remains (a live
// reader, a waiting writer): when the read holds of a crashed process
// (renewed in one batch, so with the same expiry) run out together, the
// next script purges them; ForceUnlock releases them all.
func TestRWManyReaders(t *testing.T) {
	const n = 2500 // 4 fields each: 10,000 fields deleted at once
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)

		name := redistest.UniqueName(t) + "-expiry"
		live := c.RWMutex(name)
		require.NoError(t, live.RLock(ctx))
		manyReaders(t, ctx, b, name, n, 300*time.Millisecond)
		time.Sleep(400 * time.Millisecond) // the crashed readers' leases run out
		w := c.RWMutex(name)
		ok, err := w.TryLock(ctx)
		require.NoError(t, err, "TryLock once %d read holds ran out", n)
		require.False(t, ok, "the live reader still holds")
		require.NoError(t, live.RUnlock(ctx))
		require.True(t, tryW(t, ctx, w))
		require.NoError(t, w.Unlock(ctx))
		requireIdle(t, b, name)

		name = redistest.UniqueName(t) + "-force"
		manyReaders(t, ctx, b, name, n, time.Minute)
		m := c.RWMutex(name, redlatch.WithOwner("waiting-writer"))
		got := make(chan error, 1)
		go func() { got <- m.Lock(ctx) }() // waits: its place keeps the hash
		admin := b.Client(t)
		require.Eventually(t, func() bool {
			queued, err := admin.HExists(ctx, "{"+name+"}:rw", "ww:waiting-writer").Result()
			return err == nil && queued
		}, 5*time.Second, 10*time.Millisecond)
		ok, err = c.RWMutex(name).ForceUnlock(ctx)
		require.NoError(t, err, "ForceUnlock with %d readers", n)
		require.True(t, ok)
		requireNoErrWithin(t, got, 5*time.Second, "the waiting writer did not get in")
		require.NoError(t, m.Unlock(ctx))
		requireIdle(t, b, name)
	})
}

// TestRWHeldAheadFenceLost: an RWMutex writer holds a token ahead of the
// server clock (as a faster clock before a failover issued, see
// TestHandoffFenceWrite "held ahead"), and the fence key is lost during
// the hold (its retention ran out under a long, renewed hold). When the
// writer's release leaves the hash (another writer waits, or the writer
// downgraded to a read hold), the next writer's token must still pass the
// released one, as a Mutex's and a FairMutex's do. It came from the clock
// alone, lower. Found by a reviewer.
func TestRWHeldAheadFenceLost(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, tc := range []string{"writer waits", "downgrade"} {
			t.Run(tc, func(t *testing.T) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				rdb := b.Client(t)
				c1, c2 := newClient(t, b), newClient(t, b)
				fence := "{" + name + "}:fence"
				ahead := time.Now().Add(time.Hour).UnixMicro()
				require.NoError(t, rdb.Set(ctx, fence, strconv.FormatInt(ahead, 10), time.Minute).Err())
				holder := c1.RWMutex(name)
				require.NoError(t, holder.Lock(ctx))
				held := holder.Token()
				require.Greater(t, held, ahead)
				next := c2.RWMutex(name)
				got := make(chan error, 1)
				if tc == "writer waits" {
					go func() { got <- next.Lock(ctx) }()
					require.Eventually(t, func() bool {
						n, err := rdb.HLen(ctx, "{"+name+"}:rw").Result()
						return err == nil && n > 5 // the ww: field of the waiting writer
					}, 5*time.Second, 10*time.Millisecond, "the writer never waited")
				} else {
					require.NoError(t, holder.RLock(ctx))
				}
				require.NoError(t, rdb.Del(ctx, fence).Err()) // lost during the hold
				require.NoError(t, holder.Unlock(ctx))
				if tc == "downgrade" {
					require.NoError(t, holder.RUnlock(ctx))
					go func() { got <- next.Lock(ctx) }()
				}
				requireNoErrWithin(t, got, 5*time.Second, "the next writer takes the lock")
				require.Greater(t, next.Token(), held, "the next writer's token went backwards")
				require.NoError(t, next.Unlock(ctx))
				m := c1.Mutex(name)
				require.NoError(t, m.Lock(ctx))
				require.Greater(t, m.Token(), held, "a Mutex of the name after the writer")
				require.NoError(t, m.Unlock(ctx))
			})
		}
	})
}

// TestRWReleaseResentAfterHashDeleted: readers a and b hold the read
// lock. a's RUnlock runs in Redis (b still holds: the hash stays, and
// remembers a's release in rr), its reply is lost and go-redis resends it;
// meanwhile b's RUnlock released the last hold and deleted the hash, and
// with it rr, recording only b's release in the fence key. The resend must
// be recognised as the release that ran, not reported as ErrNotHeld ("not
// held, lease ran out, or lost"): two readers releasing at about the same
// time is all it takes, no other owner's new hold. The same for a writer
// that downgraded: its Unlock leaves its read hold (the hash stays), its
// RUnlock then deletes the hash. Releases that delete the hash now carry
// the releases it remembered to the fence key. Found by a reviewer.
func TestRWReleaseResentAfterHashDeleted(t *testing.T) {
	// Each case: what the handle a holds before its release (its reply
	// lost, then resent), what happens between the release's run and its
	// resend, and the release itself.
	cases := []struct {
		name    string
		hold    func(ctx context.Context, a, other *redlatch.RWMutex) error
		between func(ctx context.Context, a, other *redlatch.RWMutex) error
		release func(a *redlatch.RWMutex, ctx context.Context) error
	}{
		{"readers", // the other reader's release deletes the hash
			func(ctx context.Context, a, other *redlatch.RWMutex) error {
				return errors.Join(a.RLock(ctx), other.RLock(ctx))
			},
			func(ctx context.Context, _, other *redlatch.RWMutex) error { return other.RUnlock(ctx) },
			(*redlatch.RWMutex).RUnlock},
		{"reader between", // a's release deletes the hash; another reader comes and goes
			func(ctx context.Context, a, _ *redlatch.RWMutex) error { return a.RLock(ctx) },
			func(ctx context.Context, _, other *redlatch.RWMutex) error {
				return errors.Join(other.RLock(ctx), other.RUnlock(ctx))
			},
			(*redlatch.RWMutex).RUnlock},
		{"ForceUnlock", // an operator's ForceUnlock deletes the hash (found by the reread of the fix)
			func(ctx context.Context, a, other *redlatch.RWMutex) error {
				return errors.Join(a.RLock(ctx), other.RLock(ctx))
			},
			func(ctx context.Context, _, other *redlatch.RWMutex) error {
				held, err := other.ForceUnlock(ctx)
				if err == nil && !held {
					err = errors.New("ForceUnlock found nothing held")
				}
				return err
			},
			(*redlatch.RWMutex).RUnlock},
		{"downgrade", // the writer's own RUnlock deletes the hash
			func(ctx context.Context, a, _ *redlatch.RWMutex) error { return errors.Join(a.Lock(ctx), a.RLock(ctx)) },
			func(ctx context.Context, a, _ *redlatch.RWMutex) error { return a.RUnlock(ctx) },
			(*redlatch.RWMutex).Unlock},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				name := redistest.UniqueName(t)
				c, hook := lossyClient(t, b, scriptWith(writersWakeKey(name)), true)
				a, other := c.RWMutex(name), c.RWMutex(name)
				// Load the scripts: a NOSCRIPT reply would disarm the hook.
				require.NoError(t, errors.Join(a.Lock(ctx), a.RLock(ctx), a.RUnlock(ctx), a.Unlock(ctx)))

				require.NoError(t, tc.hold(ctx, a, other))
				hook.between = func() { require.NoError(t, tc.between(ctx, a, other)) }
				hook.armed.Store(true)
				require.NoError(t, tc.release(a, ctx), "the release ran, but its resend was not recognised")
				requireIdle(t, b, name)
			})
		}
	})
}

// TestRWReleaseResentAfterHashExpired: a release whose reply was lost, and
// which left the hash to another hold (so it recorded itself in the hash's
// rr field only), is resent after that other hold's lease ran out and Redis
// expired the hash with rr in it (the other holder crashed). The first run
// released the caller's hold: the resend must report that, not ErrNotHeld,
// and change nothing. It reported ErrNotHeld: nothing recorded the release
// outside the hash.
func TestRWReleaseResentAfterHashExpired(t *testing.T) {
	const lease = 300 * time.Millisecond
	cases := []struct {
		name    string
		hold    func(ctx context.Context, a, other *redlatch.RWMutex) error
		release func(a *redlatch.RWMutex, ctx context.Context) error
	}{
		{"reader", // another reader, on a fixed lease, keeps the hash
			func(ctx context.Context, a, other *redlatch.RWMutex) error {
				return errors.Join(a.RLock(ctx), other.RLock(ctx))
			},
			(*redlatch.RWMutex).RUnlock},
		{"writer", // a read hold of the writer's owner id, on a fixed lease, keeps the hash
			func(ctx context.Context, a, other *redlatch.RWMutex) error {
				return errors.Join(a.Lock(ctx), other.RLock(ctx))
			},
			(*redlatch.RWMutex).Unlock},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		admin := b.Client(t)
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				name := redistest.UniqueName(t)
				c, hook := lossyClient(t, b, scriptWith(writersWakeKey(name)), true)
				owner := "owner-" + name
				a := c.RWMutex(name, redlatch.WithOwner(owner))
				other := c.RWMutex(name, redlatch.WithLease(lease))
				if tc.name == "writer" {
					other = c.RWMutex(name, redlatch.WithOwner(owner), redlatch.WithLease(lease))
				}
				// Load the scripts: a NOSCRIPT reply would disarm the hook.
				require.NoError(t, errors.Join(a.Lock(ctx), a.RLock(ctx), a.RUnlock(ctx), a.Unlock(ctx)))

				require.NoError(t, tc.hold(ctx, a, other))
				hook.between = func() {
					// The other hold's lease runs out: Redis expires the hash.
					require.Eventually(t, func() bool {
						n, err := admin.Exists(ctx, "{"+name+"}:rw").Result()
						return err == nil && n == 0
					}, 5*lease, 10*time.Millisecond, "the hash did not expire")
				}
				hook.armed.Store(true)
				require.NoError(t, tc.release(a, ctx), "the release ran, but its resend was not recognised")
				requireIdle(t, b, name)
			})
		}
	})
}

// TestRWWriterRequeuedAfterFlush: the data vanishes (FLUSHALL) while a
// writer waits behind a reader with a long fixed lease. A reader that comes
// and goes afterwards frees the lock: the waiting writer must learn it then
// (its place is renewed by the watchdog, which finds it gone and has the
// writer queue again, so that the read release wakes it), not sleep on until
// the vanished reader's 20s lease bound while readers pass it.
func TestRWWriterRequeuedAfterFlush(t *testing.T) {
	srv := redistest.NewServer(t)
	b := serverBackend(srv)
	ctx := ctxT(t, 10*time.Second)
	timeout := 600 * time.Millisecond
	ca := newClient(t, b, redlatch.WithWatchdogTimeout(timeout))
	cb := newClient(t, b, redlatch.WithWatchdogTimeout(timeout))
	name := redistest.UniqueName(t)

	require.NoError(t, ca.RWMutex(name, redlatch.WithLease(20*time.Second)).RLock(ctx))
	writer := cb.RWMutex(name, redlatch.WithOwner("writer"))
	got := make(chan error, 1)
	go func() { got <- writer.Lock(ctx) }()
	rdb := b.Client(t)
	require.Eventually(t, func() bool {
		n, err := rdb.HExists(ctx, "{"+name+"}:rw", "ww:writer").Result()
		return err == nil && n
	}, 2*time.Second, 5*time.Millisecond, "the writer never queued")

	b.FlushAll(t)
	// A reader takes the lock the flush freed and holds it past a renewal
	// of the writer's place; unless the watchdog found the place gone
	// first, and the writer, queued again, took the lock (then the reader
	// is refused, and the writer is in already).
	reader := ca.RWMutex(name, redlatch.WithLease(20*time.Second))
	ok, err := reader.TryRLock(ctx)
	require.NoError(t, err)
	if ok {
		time.Sleep(2 * timeout)
		require.NoError(t, reader.RUnlock(ctx))
	}
	requireNoErrWithin(t, got, time.Second, "the writer slept through the read release that freed the lock")
	require.NoError(t, writer.Unlock(ctx))
}

// TestReleaseOfVanishedHoldWakesLocalWaiters: the data vanishes (FLUSHALL)
// under a fixed-lease hold with a waiter of the same Client, then the
// hold's release finds it gone (ErrNotHeld). The lock (or the permits) is
// free and the Client knows it: its waiter must try again now, not sleep
// until the vanished 20s lease's bound. Mutex did; an RWMutex writer's
// waiting reader and a Semaphore's waiter slept on.
func TestReleaseOfVanishedHoldWakesLocalWaiters(t *testing.T) {
	lease := redlatch.WithLease(20 * time.Second)
	kinds := []struct {
		name         string
		held, waiter func(c *redlatch.Client, n string) holdPair
	}{
		{"Mutex", func(c *redlatch.Client, n string) holdPair {
			m := c.Mutex(n, lease)
			return holdPair{m.Lock, m.Unlock, nil}
		},
			func(c *redlatch.Client, n string) holdPair { m := c.Mutex(n); return holdPair{m.Lock, m.Unlock, nil} }},
		{"RWMutex", func(c *redlatch.Client, n string) holdPair {
			m := c.RWMutex(n, lease)
			return holdPair{m.Lock, m.Unlock, nil}
		},
			func(c *redlatch.Client, n string) holdPair {
				m := c.RWMutex(n)
				return holdPair{m.RLock, m.RUnlock, nil}
			}},
		{"Semaphore", func(c *redlatch.Client, n string) holdPair {
			s := c.Semaphore(n, 1, lease)
			return holdPair{func(ctx context.Context) error { return s.Acquire(ctx, 1) }, func(ctx context.Context) error { return s.Release(ctx, 1) }, nil}
		}, func(c *redlatch.Client, n string) holdPair {
			s := c.Semaphore(n, 1)
			return holdPair{func(ctx context.Context) error { return s.Acquire(ctx, 1) }, func(ctx context.Context) error { return s.Release(ctx, 1) }, nil}
		}},
	}
	// A private server: the test flushes it.
	b := serverBackend(redistest.NewServer(t))
	c := newClient(t, b, redlatch.WithWatchdogTimeout(600*time.Millisecond))
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := ctxT(t, 10*time.Second)
			name := redistest.UniqueName(t)
			held, waiter := k.held(c, name), k.waiter(c, name)
			require.NoError(t, held.acquire(ctx))
			got := make(chan error, 1)
			go func() { got <- waiter.acquire(ctx) }()
			time.Sleep(300 * time.Millisecond) // it waits
			b.FlushAll(t)
			require.ErrorIs(t, held.release(ctx), redlatch.ErrNotHeld)
			requireNoErrWithin(t, got, time.Second, "the local waiter slept on after the release found the hold gone")
			require.NoError(t, waiter.release(ctx))
		})
	}
}

// TestRWFailedRUnlockThenReentry: an RUnlock fails before its outcome is
// known (it never reached Redis, and every retry of go-redis failed), so
// the handle stops renewing the read hold, which frees at the end of its
// lease (see the README). The reader goes on reading meanwhile (RLock,
// RUnlock): each RLock re-entered the hold still counted in Redis, past the
// waiting writer (the owner reads already), and renewed it, and the writer
// never got in.
func TestRWFailedRUnlockThenReentry(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		name := redistest.UniqueName(t)
		requireFailedReleaseResent(t, b, name, scriptWith(writersWakeKey(name)),
			func(c *redlatch.Client) lockFns {
				m := c.RWMutex(name)
				return lockFns{m.RLock, m.TryRLock, m.RUnlock}
			},
			func(c *redlatch.Client) lockFns {
				m := c.RWMutex(name)
				return lockFns{m.Lock, m.TryLock, m.Unlock}
			})
	})
}

// TestAcquireRunThenRefusedBusyIsUndone: an acquisition attempt runs in
// Redis, its reply is lost, and go-redis's resend of it is refused with
// BUSY (another client's script runs past busy-reply-threshold; go-redis
// does not retry BUSY). The refusal is a reply from Redis, so the attempt
// counted as one that did not run: it was neither undone nor did its Lock
// leave the writers' queue. A Mutex.Lock returned BUSY while its first run
// had taken the lock, held by nobody, unrenewed, for its whole lease; an
// RWMutex.Lock returned BUSY while its first run had queued the writer,
// whose place kept every new reader out for its whole lease (the watchdog
// timeout). As TestLatchLostReplyRetryRefusedBusy for the latch. (Found by
// a reviewer. A FairMutex's withdrawal, which names its waiter id, gave
// the lock back already: its case guards it.)
func TestAcquireRunThenRefusedBusyIsUndone(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	b := serverBackend(srv)
	ctx := ctxT(t, 20*time.Second)

	// An exclusive lock's attempt took the lock: it is given back.
	for _, k := range []struct {
		kind, key string
		make      func(*redlatch.Client, string) tryLocker
	}{
		{"Mutex", "lock", func(c *redlatch.Client, n string) tryLocker { return c.Mutex(n) }},
		{"FairMutex", "fair", func(c *redlatch.Client, n string) tryLocker { return c.FairMutex(n) }},
	} {
		t.Run(k.kind, func(t *testing.T) {
			name := redistest.UniqueName(t)
			c, hook := lossyClient(t, b, scriptWith("{"+name+"}:"+k.key), true)
			m := k.make(c, name)
			require.NoError(t, m.Lock(ctx)) // loads the scripts
			require.NoError(t, m.Unlock(ctx))

			var busy <-chan error
			hook.between = func() { busy = srv.BusyFor(t, 300*time.Millisecond) }
			hook.armed.Store(true) // the attempt runs; go-redis's resend is refused
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			err := m.Lock(lctx)
			require.NoError(t, <-busy)
			require.Error(t, err)
			requireTakes(t, ctx, k.make(newClient(t, b), name), 3*time.Second, "the lock the refused Lock took is held by nobody")
		})
	}

	t.Run("RWMutex", func(t *testing.T) {
		name := redistest.UniqueName(t)
		rwKey := "{" + name + "}:rw"
		c, hook := lossyClient(t, b, scriptWith(rwKey), true)
		writer := c.RWMutex(name, redlatch.WithOwner("writer"))
		require.NoError(t, writer.Lock(ctx)) // loads the scripts
		require.NoError(t, writer.Unlock(ctx))
		other := newClient(t, b)
		holder := other.RWMutex(name, redlatch.WithOwner("holder"))
		require.NoError(t, holder.RLock(ctx))

		var busy <-chan error
		hook.between = func() { busy = srv.BusyFor(t, 300*time.Millisecond) }
		hook.armed.Store(true) // the attempt queues the writer; the resend is refused
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		err := writer.Lock(lctx)
		require.NoError(t, <-busy)
		require.Error(t, err)
		requireTakes(t, ctx, readLocker{other.RWMutex(name, redlatch.WithOwner("reader"))}, 3*time.Second,
			"the waiting place of the refused Lock keeps the readers out")
		require.NoError(t, holder.RUnlock(ctx))
	})
}

// busyBeforeHook makes the server busy (another client's script running
// past busy-reply-threshold) just before the first matching call it sees
// once armed is sent: Redis refuses that call with BUSY, which go-redis does
// not retry. busy delivers the busy script's end.
type busyBeforeHook struct {
	passHook
	srv   *redistest.Server
	t     testing.TB
	match func(redis.Cmder) bool
	armed atomic.Bool
	busy  chan (<-chan error)
}

func (h *busyBeforeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.match(cmd) && h.armed.CompareAndSwap(true, false) {
			h.busy <- h.srv.BusyFor(h.t, 300*time.Millisecond)
		}
		return next(ctx, cmd)
	}
}

// TestRWUnqueueRefusedBusyResent: a writer's Lock gives up (its ctx ends
// while it waits behind a reader) and leaves the writers' queue; Redis
// refuses that unqueue with BUSY (another client's script runs past
// busy-reply-threshold): the script did not run. The unqueue was not sent
// again (only logged): the dead writer's place stayed until its lease ran
// out (the watchdog timeout, 30s by default), keeping every new reader
// out meanwhile, though no writer waited. A FairMutex's withdrawal is
// resent so (resendRelease), and since rw_unqueue names the Lock call that
// gave up, a late resend leaves the owner's next Lock's place alone.
// (Found by a reviewer.)
func TestRWUnqueueRefusedBusyResent(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	b := serverBackend(srv)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)

	rdb := b.Client(t)
	hook := &busyBeforeHook{srv: srv, t: t, busy: make(chan (<-chan error), 1),
		match: scriptWith("{" + name + "}:rwake")} // rw_unqueue (and rw_unlock)
	rdb.AddHook(hook)
	c := newClientOn(t, rdb)
	writer := c.RWMutex(name, redlatch.WithOwner("writer"))
	other := newClient(t, b)
	holder := other.RWMutex(name, redlatch.WithOwner("holder"))
	require.NoError(t, holder.RLock(ctx))

	hook.armed.Store(true)
	lctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, writer.Lock(lctx), redlatch.ErrNotObtained)
	require.NoError(t, <-<-hook.busy, "the unqueue was refused")

	requireTakes(t, ctx, readLocker{other.RWMutex(name, redlatch.WithOwner("reader"))}, 3*time.Second,
		"the place of a writer that gave up keeps the readers out")
	require.NoError(t, holder.RUnlock(ctx))
}

// tryLocker is an exclusive lock a test takes, tries and releases.
type tryLocker interface {
	Lock(context.Context) error
	TryLock(context.Context) (bool, error)
	Unlock(context.Context) error
}

// readLocker is an RWMutex's read side as a tryLocker.
type readLocker struct{ *redlatch.RWMutex }

func (r readLocker) Lock(ctx context.Context) error            { return r.RLock(ctx) }
func (r readLocker) TryLock(ctx context.Context) (bool, error) { return r.TryRLock(ctx) }
func (r readLocker) Unlock(ctx context.Context) error          { return r.RUnlock(ctx) }

// requireTakes requires l to take its lock within d (its TryLock polled),
// then releases it: what a failed or given-up call left behind is not held
// by nobody for a lease.
func requireTakes(t *testing.T, ctx context.Context, l tryLocker, d time.Duration, why string) {
	t.Helper()
	require.Eventually(t, func() bool {
		ok, err := l.TryLock(ctx)
		return err == nil && ok
	}, d, 20*time.Millisecond, why)
	require.NoError(t, l.Unlock(ctx))
}

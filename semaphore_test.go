package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// semKey is the documented permit set of a semaphore.
func semKey(name string) string { return "{" + name + "}:sem" }

// requireAvailable checks the free permits seen by s.
func requireAvailable(t *testing.T, ctx context.Context, s *redlatch.Semaphore, want int64) {
	t.Helper()
	n, err := s.Available(ctx)
	require.NoError(t, err)
	require.Equal(t, want, n)
}

// requireNoKey checks that key does not exist.
func requireNoKey(t *testing.T, ctx context.Context, b redistest.Backend, key string) {
	t.Helper()
	n, err := b.Client(t).Exists(ctx, key).Result()
	require.NoError(t, err)
	require.Zero(t, n, "key %s left behind", key)
}

// requireSemIdle checks that the permit set of the semaphore name holds no
// permit: it is gone, or it holds only remembered releases and expires with
// them, within a minute (how long a release is remembered).
func requireSemIdle(t *testing.T, ctx context.Context, b redistest.Backend, name string) {
	t.Helper()
	rdb := b.Client(t)
	ms, err := rdb.ZRangeWithScores(ctx, semKey(name), 0, -1).Result()
	require.NoError(t, err)
	for _, m := range ms {
		member := m.Member.(string)
		switch {
		case member == "#":
			require.Zero(t, m.Score, "permits in use")
		case !strings.HasPrefix(member, "~"):
			require.Failf(t, "permit record left behind", "%s", member)
		}
	}
	if len(ms) > 0 {
		ttl, err := rdb.PTTL(ctx, semKey(name)).Result()
		require.NoError(t, err)
		require.Greater(t, ttl, time.Duration(0))
		require.LessOrEqual(t, ttl, time.Minute)
	}
}

// TestSemaphoreBound: 12 goroutines over 2 Clients take 1 or 2 permits of a
// semaphore of size 3, many times: never more than 3 are held at once, 3 are
// held at some point, and no permit is left in Redis afterwards.
func TestSemaphoreBound(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 90*time.Second)
		name := redistest.UniqueName(t)
		clients := []*redlatch.Client{newClient(t, b), newClient(t, b)}
		const goroutines, rounds, size = 12, 8, 3
		var inside, most atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, goroutines*rounds)
		for g := 0; g < goroutines; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				s := clients[g%2].Semaphore(name, size)
				n := int64(1 + g%2)
				for i := 0; i < rounds; i++ {
					if err := s.Acquire(ctx, n); err != nil {
						errs <- err
						return
					}
					now := inside.Add(n)
					if now > size {
						errs <- errors.New("more permits held than the size")
					}
					for {
						m := most.Load()
						if now <= m || most.CompareAndSwap(m, now) {
							break
						}
					}
					time.Sleep(2 * time.Millisecond)
					inside.Add(-n)
					if err := s.Release(ctx, n); err != nil {
						errs <- err
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Equal(t, int64(size), most.Load(), "the semaphore never filled")
		requireAvailable(t, ctx, clients[0].Semaphore(name, size), size)
		requireSemIdle(t, ctx, b, name)
	})
}

// TestSemaphoreCounts: permits taken, shrunk and returned are counted
// exactly, per handle.
func TestSemaphoreCounts(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		a, o := c.Semaphore(name, 5), c.Semaphore(name, 5)
		requireAvailable(t, ctx, a, 5)

		ok, err := a.TryAcquire(ctx, 2)
		require.NoError(t, err)
		require.True(t, ok)
		requireAvailable(t, ctx, o, 3)
		ok, err = o.TryAcquire(ctx, 4)
		require.NoError(t, err)
		require.False(t, ok, "4 of 3 free permits")
		require.NoError(t, o.Acquire(ctx, 3))
		requireAvailable(t, ctx, a, 0)
		ok, err = a.TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.False(t, ok)

		// o holds 3 in one record: return them one by one (shrinking it).
		require.NoError(t, o.Release(ctx, 1))
		requireAvailable(t, ctx, a, 1)
		require.ErrorIs(t, o.Release(ctx, 3), redlatch.ErrNotHeld, "o holds 2")
		requireAvailable(t, ctx, a, 1)
		require.NoError(t, o.Release(ctx, 2))
		requireAvailable(t, ctx, a, 3)
		require.ErrorIs(t, o.Release(ctx, 1), redlatch.ErrNotHeld)

		// a holds 2 + 1 + 1 in three records: return 3 across them.
		require.NoError(t, a.Acquire(ctx, 1))
		require.NoError(t, a.Acquire(ctx, 1))
		requireAvailable(t, ctx, o, 1)
		require.NoError(t, a.Release(ctx, 3))
		requireAvailable(t, ctx, o, 4)
		require.NoError(t, a.Release(ctx, 1))
		requireAvailable(t, ctx, o, 5)
		requireSemIdle(t, ctx, b, name)

		// A failed wait takes nothing.
		require.NoError(t, a.Acquire(ctx, 5))
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		requireWaitErr(t, o.Acquire(wctx, 1), wctx)
		requireAvailable(t, ctx, o, 0)
		require.NoError(t, a.Release(ctx, 5))
		requireAvailable(t, ctx, o, 5)

		// Handles with a larger size see more room.
		big := c.Semaphore(name, 8)
		require.NoError(t, a.Acquire(ctx, 5))
		requireAvailable(t, ctx, a, 0)
		requireAvailable(t, ctx, big, 3)
		ok, err = big.TryAcquire(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok)
		requireAvailable(t, ctx, a, 0)
		require.NoError(t, big.Release(ctx, 3))
		require.NoError(t, a.Release(ctx, 5))
		requireSemIdle(t, ctx, b, name)
	})
}

// TestSemaphoreErrors: bad input is ErrInvalidArgument and never reaches
// Redis; a closed Client is ErrClosed.
func TestSemaphoreErrors(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		for _, s := range []*redlatch.Semaphore{
			c.Semaphore("", 3),
			c.Semaphore(name, 0),
			c.Semaphore(name, -1),
			c.Semaphore(name, 3, redlatch.WithLease(0)),
			c.Semaphore(name, 3, redlatch.WithOwner("")),
		} {
			require.ErrorIs(t, s.Acquire(ctx, 1), redlatch.ErrInvalidArgument)
			_, err := s.TryAcquire(ctx, 1)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
			require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrInvalidArgument)
			_, err = s.Available(ctx)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		}
		s := c.Semaphore(name, 3)
		for _, n := range []int64{0, -1, 4} {
			err := s.Acquire(ctx, n)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
			require.ErrorContains(t, err, "n ")
			_, err = s.TryAcquire(ctx, n)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
			if n <= 0 {
				require.ErrorIs(t, s.Release(ctx, n), redlatch.ErrInvalidArgument)
			}
		}
		// More than the size: the handle holds fewer (API.md: ErrNotHeld).
		require.ErrorIs(t, s.Release(ctx, 4), redlatch.ErrNotHeld)
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)
		requireSemIdle(t, ctx, b, name)

		// Another type under the key.
		require.NoError(t, b.Client(t).Set(ctx, semKey(name), "x", time.Minute).Err())
		_, err := s.TryAcquire(ctx, 1)
		require.ErrorIs(t, err, redlatch.ErrWrongType)
		require.NoError(t, b.Client(t).Del(ctx, semKey(name)).Err())

		closed := newClient(t, b)
		cs := closed.Semaphore(name, 3)
		require.NoError(t, closed.Close())
		require.ErrorIs(t, cs.Acquire(ctx, 1), redlatch.ErrClosed)
		_, err = cs.Available(ctx)
		require.ErrorIs(t, err, redlatch.ErrClosed)
	})
}

// TestSemaphoreWakeup: a waiter is woken by the release, long before the
// holder's lease would have ended.
func TestSemaphoreWakeup(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b).Semaphore(name, 2)
		waiter := newClient(t, b).Semaphore(name, 2)
		require.NoError(t, holder.Acquire(ctx, 2))
		got := make(chan time.Time, 1)
		go func() {
			if err := waiter.Acquire(ctx, 2); err != nil {
				t.Error(err)
			}
			got <- time.Now()
		}()
		time.Sleep(200 * time.Millisecond)
		released := time.Now()
		require.NoError(t, holder.Release(ctx, 1))
		require.NoError(t, holder.Release(ctx, 1))
		select {
		case at := <-got:
			require.Less(t, at.Sub(released), 5*time.Second)
		case <-time.After(10 * time.Second):
			t.Fatal("the waiter was not woken by the release")
		}
		require.NoError(t, waiter.Release(ctx, 2))
		requireSemIdle(t, ctx, b, name)
	})
}

// TestSemaphoreRenewed: the watchdog keeps a live holder's permits past
// several leases.
func TestSemaphoreRenewed(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		const lease = 600 * time.Millisecond
		holder := newClient(t, b, redlatch.WithWatchdogTimeout(lease)).Semaphore(name, 3)
		other := newClient(t, b).Semaphore(name, 3)
		require.NoError(t, holder.Acquire(ctx, 2))
		require.NoError(t, holder.Acquire(ctx, 1))
		time.Sleep(4 * lease)
		requireAvailable(t, ctx, other, 0)
		ok, err := other.TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.False(t, ok)
		ttl, err := b.Client(t).PTTL(ctx, semKey(name)).Result()
		require.NoError(t, err)
		require.Positive(t, ttl)
		require.LessOrEqual(t, ttl, lease)
		require.NoError(t, holder.Release(ctx, 3))
		requireAvailable(t, ctx, other, 3)
		requireSemIdle(t, ctx, b, name)
	})
}

// TestSemaphoreDeadHolder: the permits of a holder that stops renewing (its
// Client closed without Release) or of a fixed lease come back within about
// one lease, and wake a waiter.
func TestSemaphoreDeadHolder(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		const lease = 300 * time.Millisecond
		for _, tc := range []struct {
			name string
			take func(t *testing.T, ctx context.Context, name string) *redlatch.Semaphore
		}{
			{"closed", func(t *testing.T, ctx context.Context, name string) *redlatch.Semaphore {
				c := redlatch.New(b.Client(t), redlatch.WithWatchdogTimeout(lease))
				s := c.Semaphore(name, 2)
				require.NoError(t, s.Acquire(ctx, 2))
				require.NoError(t, c.Close())
				return nil
			}},
			{"lease", func(t *testing.T, ctx context.Context, name string) *redlatch.Semaphore {
				s := newClient(t, b).Semaphore(name, 2, redlatch.WithLease(lease))
				require.NoError(t, s.Acquire(ctx, 1))
				require.NoError(t, s.Acquire(ctx, 1))
				return s
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := ctxT(t, 30*time.Second)
				name := redistest.UniqueName(t)
				start := time.Now()
				dead := tc.take(t, ctx, name)
				other := newClient(t, b).Semaphore(name, 2)
				require.NoError(t, other.Acquire(ctx, 2))
				took := time.Since(start)
				require.GreaterOrEqual(t, took, lease-50*time.Millisecond, "taken before the lease ran out")
				require.Less(t, took, lease+5*time.Second)
				if dead != nil {
					require.ErrorIs(t, dead.Release(ctx, 1), redlatch.ErrNotHeld)
				}
				require.NoError(t, other.Release(ctx, 2))
				requireSemIdle(t, ctx, b, name)
			})
		}
	})
}

// TestSemaphoreExpiredNotReleased: a record that expired in Redis is not
// returned by its handle's Release, and the key is cleaned up by the next
// script.
func TestSemaphoreExpiredNotReleased(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		s := c.Semaphore(name, 3, redlatch.WithLease(2*time.Second))
		other := c.Semaphore(name, 3)
		require.NoError(t, s.Acquire(ctx, 2))
		require.NoError(t, other.Acquire(ctx, 1))
		// Expire s's record in Redis (as after a crash and a clock jump).
		rdb := b.Client(t)
		ms, err := rdb.ZRangeByScore(ctx, semKey(name), &redis.ZRangeBy{Min: "(0", Max: "+inf"}).Result()
		require.NoError(t, err)
		require.Len(t, ms, 2)
		for _, m := range ms {
			if m[len(m)-1] == '2' {
				require.NoError(t, rdb.ZAdd(ctx, semKey(name), redis.Z{Score: 1, Member: m}).Err())
			}
		}
		requireAvailable(t, ctx, other, 2)
		require.ErrorIs(t, s.Release(ctx, 2), redlatch.ErrNotHeld)
		require.NoError(t, other.Release(ctx, 1))
		requireSemIdle(t, ctx, b, name)
	})
}

func ExampleSemaphore() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	sem := client.Semaphore("partner-api", 3)
	if err := sem.Acquire(ctx, 2); err != nil {
		fmt.Println(err)
		return
	}
	free, _ := sem.Available(ctx)
	fmt.Println("free:", free)

	// Another handle (another process) cannot take 2 more.
	ok, _ := client.Semaphore("partner-api", 3).TryAcquire(ctx, 2)
	fmt.Println("other got 2:", ok)

	fmt.Println(sem.Release(ctx, 2))
	fmt.Println(sem.Release(ctx, 1))
	// Output:
	// free: 1
	// other got 2: false
	// <nil>
	// redlatch: not held
}

// TestSemaphoreLostReplies: a retried acquire or release whose first reply
// was lost counts once, and an acquire whose reply never arrived takes no
// permit.
func TestSemaphoreLostReplies(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith(semKey(name)), true)
		s, other := c.Semaphore(name, 6), c.Semaphore(name, 6)
		require.NoError(t, other.Acquire(ctx, 1))

		hook.armed.Store(true) // the acquire runs twice on the server
		require.NoError(t, s.Acquire(ctx, 3))
		requireAvailable(t, ctx, other, 2)
		hook.armed.Store(true)
		ok, err := s.TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)
		requireAvailable(t, ctx, other, 1)

		hook.armed.Store(true) // a whole-record release runs twice
		require.NoError(t, s.Release(ctx, 1))
		requireAvailable(t, ctx, other, 2)
		hook.armed.Store(true) // a shrinking release runs twice
		require.NoError(t, s.Release(ctx, 2))
		requireAvailable(t, ctx, other, 4)
		require.NoError(t, other.Release(ctx, 1))
		hook.armed.Store(true) // the final release runs twice
		require.NoError(t, s.Release(ctx, 1))
		requireAvailable(t, ctx, other, 6)
		requireSemIdle(t, ctx, b, name)

		// The reply never arrives: the caller gets an error, and the permits
		// the server granted are returned.
		hook.retry = false
		hook.armed.Store(true)
		ok, err = s.TryAcquire(ctx, 2)
		require.Error(t, err)
		require.False(t, ok)
		requireAvailable(t, ctx, other, 6)
		hook.armed.Store(true)
		require.Error(t, s.Acquire(ctx, 2))
		requireAvailable(t, ctx, other, 6)
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)
		requireSemIdle(t, ctx, b, name)
	})
}

// TestSemaphoreFinalReleaseRetried: a Release whose reply was lost is still
// recognised when its resend comes after another handle's acquisition (it
// had returned the last permits) or after another handle's Release of the
// last permits; and a Release of permits whose set was lost (a failover to
// a replica that missed it) reports ErrNotHeld.
func TestSemaphoreFinalReleaseRetried(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith(semKey(name)), true)
		s, other := c.Semaphore(name, 2), newClient(t, b).Semaphore(name, 2)
		require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded
		require.NoError(t, s.Release(ctx, 1))
		require.NoError(t, s.Acquire(ctx, 1))
		hook.between = func() { require.NoError(t, other.Acquire(ctx, 1)) }
		hook.armed.Store(true)
		require.NoError(t, s.Release(ctx, 1))
		requireAvailable(t, ctx, other, 1)
		require.NoError(t, other.Release(ctx, 1))
		requireSemIdle(t, ctx, b, name)

		// The resend comes after another handle returned the last permits.
		require.NoError(t, s.Acquire(ctx, 1))
		require.NoError(t, other.Acquire(ctx, 1))
		hook.between = func() { require.NoError(t, other.Release(ctx, 1)) }
		hook.armed.Store(true)
		require.NoError(t, s.Release(ctx, 1))
		requireSemIdle(t, ctx, b, name)

		require.NoError(t, s.Acquire(ctx, 2))
		require.NoError(t, b.Client(t).Del(ctx, semKey(name)).Err())
		require.ErrorIs(t, s.Release(ctx, 2), redlatch.ErrNotHeld)
	})
}

// TestSemaphoreLost: Lost is nil while the handle holds no permits, open
// while they are held, and closed when the watchdog finds them gone or a
// fixed lease runs out; Release then reports ErrNotHeld, and the next
// acquisition starts a new channel (also after a release of every permit).
func TestSemaphoreLost(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		const wd = 300 * time.Millisecond
		c := newClient(t, b, redlatch.WithWatchdogTimeout(wd))
		s := c.Semaphore(name, 3)
		require.Nil(t, s.Lost())
		require.NoError(t, s.Acquire(ctx, 1))
		lost := s.Lost()
		require.NotNil(t, lost)
		require.NoError(t, s.Acquire(ctx, 1))
		require.Equal(t, lost, s.Lost(), "one channel while permits are held")
		time.Sleep(2 * wd)
		requireOpen(t, lost, "renewed permits reported lost")
		require.NoError(t, s.Release(ctx, 1))
		require.Equal(t, lost, s.Lost(), "a release is no loss")
		requireOpen(t, lost, "a release is no loss")

		// The permit set vanishes: the next renewal finds the last permit
		// gone. (With two records, the second might not be marked lost yet
		// when Release runs, and a release on a vanished set reports
		// success: see the README's known gaps.)
		require.NoError(t, b.Client(t).Del(ctx, semKey(name)).Err())
		requireClosedWithin(t, lost, 3*wd, "Lost after the permit set was deleted")
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)
		require.Nil(t, s.Lost(), "no permits held")

		// The next acquisition starts a new channel; a release leaves it open.
		require.NoError(t, s.Acquire(ctx, 2))
		again := s.Lost()
		require.NotNil(t, again)
		requireOpen(t, again, "a new channel")
		require.NoError(t, s.Release(ctx, 1))
		requireOpen(t, again, "a release is no loss")
		require.NoError(t, s.Release(ctx, 1))
		require.Nil(t, s.Lost())

		// Returned in full, permits keep their channel: later permits get a
		// new one, whose loss leaves it open (it was reused; found by a
		// reviewer).
		require.NoError(t, s.Acquire(ctx, 1))
		third := s.Lost()
		require.NoError(t, b.Client(t).Del(ctx, semKey(name)).Err())
		requireClosedWithin(t, third, 3*wd, "Lost after the permit set was deleted")
		requireOpen(t, again, "the Lost of permits returned in full closed at the loss of later ones")
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)

		// A fixed lease runs out.
		fixed := c.Semaphore(name, 3, redlatch.WithLease(200*time.Millisecond))
		require.NoError(t, fixed.Acquire(ctx, 1))
		requireClosedWithin(t, fixed.Lost(), 2*time.Second, "Lost after a fixed lease ran out")
		require.ErrorIs(t, fixed.Release(ctx, 1), redlatch.ErrNotHeld)
	})
}

// TestSemaphoreLateAcquireAfterUndo: an acquisition stuck in a slow link,
// whose caller timed out and undid it before it reached Redis, takes no
// permits when it arrives late: the undo left a tombstone. Both with the
// semaphore idle (no permit set) and with other permits held.
func TestSemaphoreLateAcquireAfterUndo(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c, proxy := proxiedClient(t, b)
		other := newClient(t, b)

		for _, busy := range []bool{false, true} {
			name := redistest.UniqueName(t)
			s := c.Semaphore(name, 3, redlatch.WithLease(time.Minute))
			require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded, connection open
			require.NoError(t, s.Release(ctx, 1))
			held := other.Semaphore(name, 3)
			free := int64(3)
			if busy {
				require.NoError(t, held.Acquire(ctx, 1))
				free = 2
			}

			lateAttempt(t, ctx, proxy, func(ctx context.Context) error { return s.Acquire(ctx, 2) })
			require.Never(t, func() bool {
				n, err := held.Available(ctx)
				return err != nil || n != free
			}, 300*time.Millisecond, 10*time.Millisecond, "busy=%v: the late acquisition took permits", busy)
			if busy {
				require.NoError(t, held.Release(ctx, 1))
			}
			requireSemIdle(t, ctx, b, name)
			require.NoError(t, s.Acquire(ctx, 3))
			require.NoError(t, s.Release(ctx, 3))
		}
	})
}

// TestSemaphoreSizeExactInRedis: the scripts count permits in Lua numbers
// and sorted-set scores, doubles, exact for integers up to 2^53 only. A
// size of 2^53 or more, with which the permits in use plus a request may
// round down to the size, is refused with ErrInvalidArgument rather than
// let a second holder in beside one holding every permit; a size of
// 2^53-1 counts exactly.
func TestSemaphoreSizeExactInRedis(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		for _, size := range []int64{1 << 53, math.MaxInt64} {
			name := redistest.UniqueName(t)
			s := c.Semaphore(name, size)
			err := s.Acquire(ctx, size)
			if err == nil {
				ok, err := c.Semaphore(name, size).TryAcquire(ctx, 1)
				require.NoError(t, err)
				require.False(t, ok, "size %d: a permit taken beside all %d permits held", size, size)
				require.NoError(t, s.Release(ctx, size))
				continue
			}
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument, "size %d", size)
			requireNoKey(t, ctx, b, semKey(name))
		}
		const size = 1<<53 - 1
		name := redistest.UniqueName(t)
		s := c.Semaphore(name, size)
		require.NoError(t, s.Acquire(ctx, size))
		ok, err := c.Semaphore(name, size).TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.False(t, ok)
		requireAvailable(t, ctx, s, 0)
		require.NoError(t, s.Release(ctx, size-1))
		requireAvailable(t, ctx, s, size-1)
		require.NoError(t, s.Release(ctx, 1))
		requireAvailable(t, ctx, s, size)
		requireSemIdle(t, ctx, b, name)
	})
}

// captureHook lets every command through and keeps the arguments of the
// first one match accepts once armed.
type captureHook struct {
	passHook
	match func(redis.Cmder) bool
	mu    sync.Mutex
	armed bool
	args  []any
	got   chan struct{}
}

func (h *captureHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.match(cmd) {
			h.mu.Lock()
			if h.armed {
				h.armed = false
				h.args = append([]any(nil), cmd.Args()...)
				close(h.got)
			}
			h.mu.Unlock()
		}
		return next(ctx, cmd)
	}
}

// TestSemAcquireFoundRecordRestartsLease: an Acquire's attempts share one
// request id, so a later attempt finds the record that a late copy of an
// earlier one took (its first copy stuck in a slow link while go-redis's
// resend was answered "no permit free"), and reports success. The caller
// counts its lease from the send of that later attempt, but the script left
// the record's expiry where the late copy had put it, up to a whole sleep
// earlier: Redis freed the permit while the holder's Lost was still open
// and its local deadline ahead, and another handle took it, two holders on
// a semaphore of size 1. (A Mutex's retry restarts its lease, see
// lock.lua.) Here the permit set is lost (a flush) while the waiter sleeps
// to its bound, and the late copy then lands on the free semaphore. (Found
// by a reviewer.)
func TestSemAcquireFoundRecordRestartsLease(t *testing.T) {
	srv := redistest.NewServer(t)
	b := serverBackend(srv)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	const lease = 4 * time.Second

	rdb := b.Client(t)
	hook := &captureHook{match: scriptWith(semKey(name)), got: make(chan struct{})}
	rdb.AddHook(hook)
	w := newClientOn(t, rdb).Semaphore(name, 1, redlatch.WithLease(lease))
	require.NoError(t, w.Acquire(ctx, 1)) // scripts loaded: EVALSHA from now on
	require.NoError(t, w.Release(ctx, 1))

	holder := newClient(t, b, redlatch.WithWatchdogTimeout(3*time.Second)).Semaphore(name, 1)
	require.NoError(t, holder.Acquire(ctx, 1))

	hook.mu.Lock()
	hook.armed = true
	hook.mu.Unlock()
	got := make(chan error, 1)
	go func() { got <- w.Acquire(ctx, 1) }()
	<-hook.got                         // the first attempt (its resend, answered "no permit")
	time.Sleep(200 * time.Millisecond) // the waiter sleeps to the holder's lease bound (~3s)

	raw := b.Client(t)
	require.NoError(t, raw.Del(ctx, semKey(name)).Err()) // the permit set is lost
	res, err := raw.Do(ctx, hook.args...).Int64Slice()   // the late first copy lands
	require.NoError(t, err)
	require.Equal(t, int64(1), res[0], "the late copy took the permit")
	landed := time.Now()

	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter never returned")
	}
	lost := w.Lost()
	require.NotNil(t, lost)
	t.Logf("the waiter got the permit %v after the late copy landed", time.Since(landed))

	// Past the lease from the late copy's run: Redis no longer counts the
	// waiter's permit unless the attempt that found it restarted its lease.
	time.Sleep(time.Until(landed.Add(lease + 500*time.Millisecond)))
	other := newClient(t, b).Semaphore(name, 1)
	ok, err := other.TryAcquire(ctx, 1)
	require.NoError(t, err)
	if ok {
		select {
		case <-lost:
		default:
			t.Fatal("another handle took the permit while the waiter still held it (Lost open): two holders on a semaphore of size 1")
		}
		require.NoError(t, other.Release(ctx, 1))
	}
}

// TestSemAcquireResendRefusedOOMKeepsNoStrayPermits: an Acquire whose
// script ran (taking the permits) but whose reply was lost is resent by
// go-redis. Meanwhile Redis reached maxmemory (noeviction; the
// acquisition's own record may be what pushed it there). The resend finds
// its record and restarts its lease with ZADD: at maxmemory Redis refuses
// a ZADD that is a script's first write, so the resend failed with OOM, a
// reply error: Acquire returned it and undid nothing, and the permits the
// first run took stayed taken by nobody for their whole lease. The resend
// must report the permits it finds (or the caller must give them back).
// (Found by a reviewer.)
func TestSemAcquireResendRefusedOOMKeepsNoStrayPermits(t *testing.T) {
	srv := redistest.NewServer(t)
	b := serverBackend(srv)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	admin := srv.Client(t)
	c, hook := lossyClient(t, b, scriptWith(semKey(name)), true)
	s := c.Semaphore(name, 3, redlatch.WithLease(time.Minute))
	other := newClient(t, b).Semaphore(name, 3)
	require.NoError(t, s.Acquire(ctx, 1)) // loads the scripts
	require.NoError(t, s.Release(ctx, 1))
	requireAvailable(t, ctx, other, 3)

	require.NoError(t, admin.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err())
	t.Cleanup(func() { _ = admin.ConfigSet(ctx, "maxmemory", "0").Err() })
	hook.between = func() {
		// The first run took the permits; Redis is at maxmemory by the resend.
		require.NoError(t, admin.ConfigSet(ctx, "maxmemory", "1").Err())
	}
	hook.armed.Store(true)
	err := s.Acquire(ctx, 2)
	require.NoError(t, admin.ConfigSet(ctx, "maxmemory", "0").Err())
	if err != nil {
		requireAvailable(t, ctx, other, 3) // nothing held by the failed Acquire
	} else {
		requireAvailable(t, ctx, other, 1)
		require.NoError(t, s.Release(ctx, 2))
		requireAvailable(t, ctx, other, 3)
	}
	require.NoError(t, err, "the resend found the permits its first run took")
}

package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strconv"
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

// locker is what the lock types share.
type locker interface {
	Lock(context.Context) error
	TryLock(context.Context) (bool, error)
	Unlock(context.Context) error
	Token() int64
	Lost() <-chan struct{}
	TTL(context.Context) (time.Duration, error)
	IsLocked(context.Context) (bool, error)
	ForceUnlock(context.Context) (bool, error)
}

var kinds = []struct {
	name string
	make func(c *redlatch.Client, name string, opts ...redlatch.LockOption) locker
}{
	{"Mutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) locker { return c.Mutex(n, o...) }},
	{"ReentrantMutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) locker { return c.ReentrantMutex(n, o...) }},
}

// TestMutualExclusion: 16 goroutines over 2 Clients each do a non-atomic
// read-modify-write of a Redis key under the lock; no increment is lost.
func TestMutualExclusion(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 60*time.Second)
				name := redistest.UniqueName(t)
				counter := "{" + name + "}:counter"
				clients := []*redlatch.Client{newClient(t, b), newClient(t, b)}
				rdb := b.Client(t)
				const goroutines, rounds = 16, 20
				var wg sync.WaitGroup
				var inside atomic.Int32
				errs := make(chan error, goroutines)
				for g := 0; g < goroutines; g++ {
					wg.Add(1)
					go func(c *redlatch.Client) {
						defer wg.Done()
						l := k.make(c, name)
						for i := 0; i < rounds; i++ {
							if err := l.Lock(ctx); err != nil {
								errs <- err
								return
							}
							if inside.Add(1) != 1 {
								errs <- errors.New("two holders at once")
							}
							v, err := rdb.Get(ctx, counter).Int()
							if err != nil && !errors.Is(err, redis.Nil) {
								errs <- err
							}
							if err := rdb.Set(ctx, counter, v+1, 0).Err(); err != nil {
								errs <- err
							}
							inside.Add(-1)
							if err := l.Unlock(ctx); err != nil {
								errs <- err
								return
							}
						}
					}(clients[g%2])
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					require.NoError(t, err)
				}
				n, err := rdb.Get(ctx, counter).Int()
				require.NoError(t, err)
				require.Equal(t, goroutines*rounds, n)
			})
		}
	})
}

func TestReentrantCounts(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		m := c.ReentrantMutex(name)
		for i := 1; i <= 3; i++ {
			require.NoError(t, m.Lock(ctx))
			n, err := m.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, i, n)
		}
		tok := m.Token()
		require.Positive(t, tok)
		ok, err := m.TryLock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, tok, m.Token(), "re-entry keeps the token")

		other := c.ReentrantMutex(name)
		ok, err = other.TryLock(ctx)
		require.NoError(t, err)
		require.False(t, ok)
		n, err := other.HoldCount(ctx)
		require.NoError(t, err)
		require.Zero(t, n)

		for i := 4; i >= 1; i-- {
			require.NoError(t, m.Unlock(ctx))
			n, err := m.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, i-1, n)
			locked, err := m.IsLocked(ctx)
			require.NoError(t, err)
			require.Equal(t, i > 1, locked)
		}
		require.Zero(t, m.Token())
		require.ErrorIs(t, m.Unlock(ctx), redlatch.ErrNotHeld)

		// Handles sharing an owner id share the holds.
		a := c.ReentrantMutex(name, redlatch.WithOwner("worker-7"))
		bb := c.ReentrantMutex(name, redlatch.WithOwner("worker-7"))
		require.NoError(t, a.Lock(ctx))
		require.NoError(t, bb.Lock(ctx))
		require.Equal(t, a.Token(), bb.Token())
		n, err = a.HoldCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 2, n)
		require.NoError(t, bb.Unlock(ctx))
		require.NoError(t, bb.Unlock(ctx), "a shared owner releases what the other handle took")
		locked, err := a.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
	})
}

// TestUnlockByOtherOwner: a non-holder's Unlock is refused and changes nothing.
func TestUnlockByOtherOwner(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				c := newClient(t, b)
				name := redistest.UniqueName(t)
				holder, intruder := k.make(c, name), k.make(c, name)
				require.NoError(t, holder.Lock(ctx))
				before, err := b.Client(t).HGetAll(ctx, lockKey(name)).Result()
				require.NoError(t, err)

				require.ErrorIs(t, intruder.Unlock(ctx), redlatch.ErrNotHeld)
				if rm, ok := intruder.(*redlatch.ReentrantMutex); ok {
					// Even a reentrant handle that never held it goes to Redis and is refused.
					n, err := rm.HoldCount(ctx)
					require.NoError(t, err)
					require.Zero(t, n)
				}
				after, err := b.Client(t).HGetAll(ctx, lockKey(name)).Result()
				require.NoError(t, err)
				require.Equal(t, before, after)
				locked, err := holder.IsLocked(ctx)
				require.NoError(t, err)
				require.True(t, locked)
				require.NoError(t, holder.Unlock(ctx))
				require.ErrorIs(t, holder.Unlock(ctx), redlatch.ErrNotHeld)
			})
		}
	})
}

func TestTryLock(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				c1, c2 := newClient(t, b), newClient(t, b)
				name := redistest.UniqueName(t)
				a, other := k.make(c1, name), k.make(c2, name)
				ok, err := a.TryLock(ctx)
				require.NoError(t, err)
				require.True(t, ok)
				require.Positive(t, a.Token())
				ttl, err := a.TTL(ctx)
				require.NoError(t, err)
				require.Greater(t, ttl, 20*time.Second) // watchdog default 30s
				ok, err = other.TryLock(ctx)
				require.NoError(t, err)
				require.False(t, ok)
				require.Zero(t, other.Token())
				require.Nil(t, other.Lost())
				require.NoError(t, a.Unlock(ctx))
				ttl, err = a.TTL(ctx)
				require.NoError(t, err)
				require.Zero(t, ttl)
				ok, err = other.TryLock(ctx)
				require.NoError(t, err)
				require.True(t, ok)
				require.NoError(t, other.Unlock(ctx))
			})
		}
	})
}

// TestMutexHandleIsLikeSyncMutex: a second Lock on one Mutex handle waits
// for the first Unlock; TryLock on it fails meanwhile.
func TestMutexHandleIsLikeSyncMutex(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		m := newClient(t, b).Mutex(redistest.UniqueName(t))
		require.NoError(t, m.Lock(ctx))
		ok, err := m.TryLock(ctx)
		require.NoError(t, err)
		require.False(t, ok)
		got := make(chan error, 1)
		go func() { got <- m.Lock(ctx) }()
		select {
		case err := <-got:
			t.Fatalf("second Lock on the same handle returned %v while held", err)
		case <-time.After(100 * time.Millisecond):
		}
		require.NoError(t, m.Unlock(ctx))
		require.NoError(t, <-got)
		require.NoError(t, m.Unlock(ctx))
		require.ErrorIs(t, m.Unlock(ctx), redlatch.ErrNotHeld)
	})
}

func TestLockDeadline(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				c := newClient(t, b)
				name := redistest.UniqueName(t)
				require.NoError(t, k.make(c, name).Lock(ctxT(t, 5*time.Second)))
				ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
				defer cancel()
				start := time.Now()
				err := k.make(c, name).Lock(ctx)
				requireWaitErr(t, err, ctx)
				require.ErrorIs(t, err, context.DeadlineExceeded)
				require.Less(t, time.Since(start), 2*time.Second)

				cctx, ccancel := context.WithCancel(context.Background())
				time.AfterFunc(50*time.Millisecond, ccancel)
				err = k.make(c, name).Lock(cctx)
				requireWaitErr(t, err, cctx)
				require.ErrorIs(t, err, context.Canceled)
			})
		}
	})
}

// TestFencingTokens: tokens strictly increase at every change of owner, and
// keep increasing after FLUSHALL erased the counter.
func TestFencingTokens(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)
		var last int64
		for i := 0; i < 20; i++ {
			m := c.Mutex(name)
			if i%2 == 1 {
				m = c.Mutex(name, redlatch.WithOwner("fixed-owner"))
			}
			require.NoError(t, m.Lock(ctx))
			require.Greater(t, m.Token(), last, "round %d", i)
			last = m.Token()
			require.NoError(t, m.Unlock(ctx))
			if i == 10 {
				b.FlushAll(t)
			}
		}
		// The counter is not immortal: it carries a TTL.
		ttl, err := b.Client(t).PTTL(ctx, "{"+name+"}:fence").Result()
		require.NoError(t, err)
		require.Positive(t, ttl)

		// A counter that expires during a hold: the release records the
		// hold's token, or none, never a smaller one, for every lock that
		// issues tokens.
		type tokenLock interface {
			Lock(context.Context) error
			Unlock(context.Context) error
			Token() int64
		}
		for kind, mk := range map[string]func(string) tokenLock{
			"Mutex":     func(n string) tokenLock { return c.Mutex(n) },
			"FairMutex": func(n string) tokenLock { return c.FairMutex(n) },
			"RWMutex":   func(n string) tokenLock { return c.RWMutex(n) },
		} {
			n := name + "-" + kind
			l := mk(n)
			require.NoError(t, l.Lock(ctx))
			first := l.Token()
			require.NoError(t, b.Client(t).Del(ctx, "{"+n+"}:fence").Err())
			require.NoError(t, l.Unlock(ctx))
			require.NoError(t, l.Lock(ctx))
			require.Greater(t, l.Token(), first, kind)
			require.NoError(t, l.Unlock(ctx))
		}
		// Holds that end unreleased (their lease runs out, or ForceUnlock),
		// a local transfer's among them: still higher tokens.
		lazy, next := c.Mutex(name+"-lazy", redlatch.WithLease(50*time.Millisecond)), c.Mutex(name+"-lazy")
		// The handing holder's lease must outlast the waiter's arrival.
		handing := c.Mutex(name+"-lazy", redlatch.WithLease(10*time.Second))
		var prev int64
		for i := range 4 {
			holder := lazy
			if i == 2 {
				holder = handing
			}
			require.NoError(t, holder.Lock(ctx))
			require.Greater(t, holder.Token(), prev, "round %d", i)
			prev = holder.Token()
			switch i {
			case 0:
				_, err := next.ForceUnlock(ctx)
				require.NoError(t, err)
			case 2:
				got := make(chan error, 1)
				go func() { got <- next.Lock(ctx) }()
				require.Eventually(t, func() bool { return len(channels(t, b, "{"+name+"-lazy}:*")) == 1 },
					5*time.Second, 10*time.Millisecond, "the waiter never waited")
				time.Sleep(20 * time.Millisecond)
				require.NoError(t, handing.Unlock(ctx)) // hands the lock to next
				requireNoErrWithin(t, got, 5*time.Second, "the handoff")
				require.Greater(t, next.Token(), prev)
				prev = next.Token()
				_, err := next.ForceUnlock(ctx)
				require.NoError(t, err)
				continue
			}
			<-lazy.Lost()
			require.ErrorIs(t, lazy.Unlock(ctx), redlatch.ErrNotHeld) // the handle's own lock
		}
		// A stale counter (a restart from an older snapshot, a failover to a
		// replica that missed the last writes): still higher tokens.
		stale := c.Mutex(name + "-stale")
		require.NoError(t, stale.Lock(ctx))
		require.NoError(t, stale.Unlock(ctx))
		old, err := b.Client(t).Get(ctx, "{"+name+"-stale}:fence").Result()
		require.NoError(t, err)
		var high int64
		for range 3 {
			require.NoError(t, stale.Lock(ctx))
			high = stale.Token()
			require.NoError(t, stale.Unlock(ctx))
		}
		require.NoError(t, b.Client(t).Set(ctx, "{"+name+"-stale}:fence", old, time.Minute).Err())
		require.NoError(t, stale.Lock(ctx))
		require.Greater(t, stale.Token(), high, "after the counter went back")
		require.NoError(t, stale.Unlock(ctx))

		// An expired counter, then a reader's release (which records its
		// request id in the fence key): the writer's next token is still
		// higher.
		rw := c.RWMutex(name + "-rw")
		require.NoError(t, rw.Lock(ctx))
		first := rw.Token()
		require.NoError(t, rw.Unlock(ctx))
		require.NoError(t, b.Client(t).Del(ctx, "{"+name+"-rw}:fence").Err())
		require.NoError(t, rw.RLock(ctx))
		require.NoError(t, rw.RUnlock(ctx))
		require.NoError(t, rw.Lock(ctx))
		require.Greater(t, rw.Token(), first, "after a reader's release")
		require.NoError(t, rw.Unlock(ctx))
	})
}

// TestScriptFlush: an emptied script cache (SCRIPT FLUSH, or a restart) is
// reloaded transparently.
func TestScriptFlush(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(600*time.Millisecond))
		m := c.ReentrantMutex(redistest.UniqueName(t))
		require.NoError(t, m.Lock(ctx))
		b.ScriptFlush(t)
		require.NoError(t, m.Lock(ctx))
		b.ScriptFlush(t)
		time.Sleep(500 * time.Millisecond) // renewals run through a flushed cache too
		b.ScriptFlush(t)
		require.NoError(t, m.Unlock(ctx))
		require.NoError(t, m.Unlock(ctx))
		select {
		case <-m.Lost():
			t.Fatal("lost")
		default:
		}
	})
}

func TestCloseTwice(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		c := redlatch.New(b.Client(t))
		m := c.Mutex(redistest.UniqueName(t))
		require.NoError(t, c.Close())
		require.ErrorIs(t, c.Close(), redlatch.ErrClosed)
		require.ErrorIs(t, m.Lock(context.Background()), redlatch.ErrClosed)
		_, err := m.TryLock(context.Background())
		require.ErrorIs(t, err, redlatch.ErrClosed)
	})
}

// everyCall returns every method of every primitive that takes a ctx, on
// handles called name made by c with opts, each with a ctx from ctx (called
// per method, so that a blocking one cannot use up another's).
func everyCall(c *redlatch.Client, name string, ctx func() context.Context, opts ...redlatch.LockOption) map[string]func() error {
	calls := map[string]func() error{}
	for _, l := range []locker{c.Mutex(name, opts...), c.ReentrantMutex(name, opts...), c.FairMutex(name, opts...), c.RWMutex(name, opts...)} {
		k := fmt.Sprintf("%T.", l)
		calls[k+"Lock"] = func() error { return l.Lock(ctx()) }
		calls[k+"TryLock"] = func() error { return second(l.TryLock(ctx())) }
		calls[k+"Unlock"] = func() error { return l.Unlock(ctx()) }
		calls[k+"TTL"] = func() error { return second(l.TTL(ctx())) }
		calls[k+"IsLocked"] = func() error { return second(l.IsLocked(ctx())) }
		calls[k+"ForceUnlock"] = func() error { return second(l.ForceUnlock(ctx())) }
	}
	rm, fm, rw := c.ReentrantMutex(name, opts...), c.FairMutex(name, opts...), c.RWMutex(name, opts...)
	s, l := c.Semaphore(name, 3, opts...), c.CountDownLatch(name)
	r := redlatch.NewRedlock(name, []*redlatch.Client{c}, opts...)
	for k, f := range map[string]func() error{
		"ReentrantMutex.HoldCount": func() error { return second(rm.HoldCount(ctx())) },
		"FairMutex.HoldCount":      func() error { return second(fm.HoldCount(ctx())) },
		"RWMutex.RLock":            func() error { return rw.RLock(ctx()) },
		"RWMutex.TryRLock":         func() error { return second(rw.TryRLock(ctx())) },
		"RWMutex.RUnlock":          func() error { return rw.RUnlock(ctx()) },
		"Semaphore.Acquire":        func() error { return s.Acquire(ctx(), 1) },
		"Semaphore.TryAcquire":     func() error { return second(s.TryAcquire(ctx(), 1)) },
		"Semaphore.Release":        func() error { return s.Release(ctx(), 1) },
		"Semaphore.Available":      func() error { return second(s.Available(ctx())) },
		"Latch.TrySetCount":        func() error { return second(l.TrySetCount(ctx(), 1)) },
		"Latch.CountDown":          func() error { return l.CountDown(ctx()) },
		"Latch.Count":              func() error { return second(l.Count(ctx())) },
		"Latch.Wait":               func() error { return l.Wait(ctx()) },
		"Latch.Delete":             func() error { return second(l.Delete(ctx())) },
		"Redlock.Lock":             func() error { return r.Lock(ctx()) },
		"Redlock.TryLock":          func() error { return second(r.TryLock(ctx())) },
		"Redlock.Unlock":           func() error { return r.Unlock(ctx()) },
	} {
		calls[k] = f
	}
	return calls
}

// TestEveryMethodAfterClose: API.md, ErrClosed is returned by every method
// of every primitive of a closed Client (and by a second Close), with
// handles made before and after Close.
func TestEveryMethodAfterClose(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		c := redlatch.New(b.Client(t))
		name := redistest.UniqueName(t)
		ctx := ctxT(t, 5*time.Second)
		before := everyCall(c, name, func() context.Context { return ctx })
		require.NoError(t, c.Close())
		require.ErrorIs(t, c.Close(), redlatch.ErrClosed)
		for _, calls := range []map[string]func() error{before, everyCall(c, name, func() context.Context { return ctx })} {
			for k, f := range calls {
				require.ErrorIs(t, f(), redlatch.ErrClosed, k)
			}
		}
	})
}

// TestBadInputNamedEverywhere: TestBadInput for every primitive: each
// method returns an error wrapping ErrInvalidArgument that names the
// argument, and nothing reaches Redis.
func TestBadInputNamedEverywhere(t *testing.T) {
	c, rdb, hook := nowhereClient(t)
	ctx := func() context.Context { return context.Background() }
	badPrefix := newClientOn(t, rdb, redlatch.WithKeyPrefix("x}"))
	for k, f := range everyCall(badPrefix, "x", ctx) {
		err := f()
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument, "%s with a bad key prefix", k)
		require.ErrorContains(t, err, "key prefix", k)
	}
	for _, tc := range []struct {
		arg, name string
		opts      []redlatch.LockOption
	}{
		{"name", "", nil},
		{"name", "}x", nil},
		{"lease", "x", []redlatch.LockOption{redlatch.WithLease(0)}},
		{"lease", "x", []redlatch.LockOption{redlatch.WithLease(-time.Second)}},
		{"owner", "x", []redlatch.LockOption{redlatch.WithOwner("")}},
	} {
		for k, f := range everyCall(c, tc.name, ctx, tc.opts...) {
			if tc.arg != "name" && strings.HasPrefix(k, "Latch.") {
				continue // a latch takes no LockOption
			}
			err := f()
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument, "%s with a bad %s", k, tc.arg)
			require.ErrorContains(t, err, tc.arg, k)
		}
	}
	s := c.Semaphore("x", 2)
	for _, n := range []int64{0, -1} {
		for k, err := range map[string]error{
			"Acquire": s.Acquire(ctx(), n), "TryAcquire": second(s.TryAcquire(ctx(), n)), "Release": s.Release(ctx(), n),
		} {
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument, k)
			require.ErrorContains(t, err, "n ", k)
		}
	}
	_, err := c.CountDownLatch("x").TrySetCount(ctx(), -1)
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	require.ErrorContains(t, err, "n ")
	require.Zero(t, hook.N.Load(), "bad input reached Redis")
}

// TestReadsOfFreeNames: the read methods on names that never existed, and
// on names whose every primitive was held when FLUSHALL ran, report a free
// lock (TTL 0, not locked, Token 0, hold count 0), a full semaphore and an
// open latch: no error, redis.Nil included.
func TestReadsOfFreeNames(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		c := newClient(t, b)
		ctx := ctxT(t, 10*time.Second)
		for _, flushed := range []bool{false, true} {
			name := redistest.UniqueName(t) + strconv.FormatBool(flushed)
			if flushed {
				require.NoError(t, c.ReentrantMutex(name).Lock(ctx))
				require.NoError(t, c.FairMutex(name).Lock(ctx))
				require.NoError(t, c.RWMutex(name).RLock(ctx))
				require.NoError(t, c.Semaphore(name, 3).Acquire(ctx, 2))
				_, err := c.CountDownLatch(name).TrySetCount(ctx, 2)
				require.NoError(t, err)
				b.FlushAll(t)
			}
			for _, l := range []locker{c.Mutex(name), c.ReentrantMutex(name), c.FairMutex(name), c.RWMutex(name)} {
				d, err := l.TTL(ctx)
				require.NoError(t, err, "%T", l)
				require.Zero(t, d, "%T", l)
				locked, err := l.IsLocked(ctx)
				require.NoError(t, err, "%T", l)
				require.False(t, locked, "%T", l)
				require.Zero(t, l.Token(), "%T", l)
			}
			n, err := c.ReentrantMutex(name).HoldCount(ctx)
			require.NoError(t, err)
			require.Zero(t, n)
			n, err = c.FairMutex(name).HoldCount(ctx)
			require.NoError(t, err)
			require.Zero(t, n)
			free, err := c.Semaphore(name, 3).Available(ctx)
			require.NoError(t, err)
			require.EqualValues(t, 3, free)
			count, err := c.CountDownLatch(name).Count(ctx)
			require.NoError(t, err)
			require.Zero(t, count)
			require.NoError(t, c.CountDownLatch(name).Wait(ctx))
		}
	})
}

// TestCloseWakesWaiters: a Lock waiting when the Client closes returns ErrClosed.
func TestCloseWakesWaiters(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b).Mutex(name)
		require.NoError(t, holder.Lock(ctx))
		c := redlatch.New(b.Client(t))
		got := make(chan error, 1)
		go func() { got <- c.Mutex(name).Lock(ctx) }()
		time.Sleep(100 * time.Millisecond)
		require.NoError(t, c.Close())
		select {
		case err := <-got:
			require.ErrorIs(t, err, redlatch.ErrClosed)
		case <-time.After(3 * time.Second):
			t.Fatal("waiter not released by Close")
		}
		require.NoError(t, holder.Unlock(ctx))
	})
}

// TestCloseWithAttemptInFlight: a waiter woken by a release has its attempt
// on the way (it ran in Redis; its reply is held back) when its Client is
// closed. The wait was in progress at Close, so it returns ErrClosed, and
// what its attempt took is given back: a hold returned after Close would
// be renewed by no watchdog and released by no one (every method of the
// handle returns ErrClosed), shutting everyone else out for its lease.
// (Found by a reviewer.)
func TestCloseWithAttemptInFlight(t *testing.T) {
	type pair struct{ acquire, release func(context.Context) error }
	mutex := func(c *redlatch.Client, name string) pair { m := c.Mutex(name); return pair{m.Lock, m.Unlock} }
	sem := func(c *redlatch.Client, name string) pair {
		s := c.Semaphore(name, 1)
		return pair{func(ctx context.Context) error { return s.Acquire(ctx, 1) }, func(ctx context.Context) error { return s.Release(ctx, 1) }}
	}
	writer := func(c *redlatch.Client, name string) pair { m := c.RWMutex(name); return pair{m.Lock, m.Unlock} }
	reader := func(c *redlatch.Client, name string) pair { m := c.RWMutex(name); return pair{m.RLock, m.RUnlock} }
	// A WithLease waiter claims its handoff with an attempt.
	fair := func(c *redlatch.Client, name string) pair {
		m := c.FairMutex(name, redlatch.WithLease(20*time.Second))
		return pair{m.Lock, m.Unlock}
	}
	kinds := []struct {
		name, key  string // key: KEYS[1] of the acquisition script
		take, wait func(c *redlatch.Client, name string) pair
	}{{"Mutex", "lock", mutex, mutex}, {"Semaphore", "sem", sem, sem}, {"RWMutex reader", "rw", writer, reader}, {"FairMutex", "fair", fair, fair}}
	redistest.ForEach(t, func(t *testing.T, be redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range kinds {
				run(k.name, func(t *testing.T) {
					ctx := ctxT(t, 30*time.Second)
					name := redistest.UniqueName(t)
					a := newClient(t, be)
					rdb := be.Client(t)
					// b's next script on the primitive's key: the attempt
					hook := &gateScriptHook{match: scriptWith("{" + name + "}:" + k.key), after: true,
						entered: make(chan struct{}), proceed: make(chan struct{})}
					rdb.AddHook(hook)
					b := newClientOn(t, rdb)

					held := k.take(a, name)
					require.NoError(t, held.acquire(ctx))
					got := make(chan error, 1)
					go func() { got <- k.wait(b, name).acquire(ctx) }()
					time.Sleep(200 * time.Millisecond) // b waits
					hook.armed.Store(true)
					require.NoError(t, held.release(ctx))
					select {
					case <-hook.entered: // b's attempt ran; its reply is held
					case <-time.After(5 * time.Second):
						t.Fatal("no attempt after the wake-up")
					}
					require.NoError(t, b.Close())
					close(hook.proceed)
					require.ErrorIs(t, <-got, redlatch.ErrClosed, "a wait in progress at Close succeeded after Close")
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					defer cancel()
					require.NoError(t, k.take(a, name).acquire(cctx), "the closed Client's hold shuts others out")
				})
			}
		})
	})
}

// holdPair takes and ends one hold of a primitive; count, when not nil,
// reads the owner's hold count.
type holdPair struct {
	acquire, release func(context.Context) error
	count            func(context.Context) (int, error)
}

// releaseKinds are the primitives whose hold one call takes and one call
// releases (a Semaphore permit). reentrant: a handle's second acquisition
// is a second hold; other, when not nil, takes what the held one excludes
// (a writer, for a reader).
type releaseKind struct {
	name        string
	reentrant   bool
	take, other func(c *redlatch.Client, name string) holdPair
}

var releaseKinds = []releaseKind{
	{"Mutex", false, func(c *redlatch.Client, n string) holdPair { m := c.Mutex(n); return holdPair{m.Lock, m.Unlock, nil} }, nil},
	{"ReentrantMutex", true, func(c *redlatch.Client, n string) holdPair {
		m := c.ReentrantMutex(n)
		return holdPair{m.Lock, m.Unlock, m.HoldCount}
	}, nil},
	{"FairMutex", true, func(c *redlatch.Client, n string) holdPair {
		m := c.FairMutex(n)
		return holdPair{m.Lock, m.Unlock, m.HoldCount}
	}, nil},
	{"RWMutex", true, func(c *redlatch.Client, n string) holdPair { m := c.RWMutex(n); return holdPair{m.Lock, m.Unlock, nil} }, nil},
	{"RWMutex reader", true, func(c *redlatch.Client, n string) holdPair {
		m := c.RWMutex(n)
		return holdPair{m.RLock, m.RUnlock, nil}
	},
		func(c *redlatch.Client, n string) holdPair { m := c.RWMutex(n); return holdPair{m.Lock, m.Unlock, nil} }},
	{"Semaphore", false, func(c *redlatch.Client, n string) holdPair {
		s := c.Semaphore(n, 1)
		return holdPair{func(ctx context.Context) error { return s.Acquire(ctx, 1) }, func(ctx context.Context) error { return s.Release(ctx, 1) }, nil}
	}, nil},
}

// cutOffClient returns a Client on b and cut: cut(release) runs release
// with a 200ms ctx while the Client's next script call on the primitive
// name is held back until that ctx ends, before Redis runs it or, with
// late, after (its reply comes too late), and returns release's error.
// The scripts must be loaded already (a NOSCRIPT answer would use the
// hold-back up, and the EVAL after it would run unhindered).
func cutOffClient(t *testing.T, b redistest.Backend, name string, late bool) (*redlatch.Client, func(release func(context.Context) error) error) {
	t.Helper()
	rdb := b.Client(t)
	var armed atomic.Bool
	rdb.AddHook(delayHook{match: armedOnce(&armed, scriptOn(name)), late: late})
	c := newClientOn(t, rdb)
	return c, func(release func(context.Context) error) error {
		t.Helper()
		armed.Store(true)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		err := release(ctx)
		require.False(t, armed.Load(), "the release was not held back")
		return err
	}
}

// cutOffHold returns a Client and cut from cutOffClient, and a hold of k
// on name taken through it, with the primitive's scripts loaded (a first
// hold taken and released).
func cutOffHold(t *testing.T, ctx context.Context, b redistest.Backend, k releaseKind, name string, late bool) (*redlatch.Client, holdPair, func(func(context.Context) error) error) {
	t.Helper()
	c, cut := cutOffClient(t, b, name, late)
	held := k.take(c, name)
	require.NoError(t, held.acquire(ctx))
	require.NoError(t, held.release(ctx))
	require.NoError(t, held.acquire(ctx))
	return c, held, cut
}

// requireTakenBack: another Client takes on name what a hold of k excludes
// (k.other, else k.take) within wait, and releases it.
func requireTakenBack(t *testing.T, ctx context.Context, b redistest.Backend, k releaseKind, name string, wait time.Duration, msg string) {
	t.Helper()
	other := k.other
	if other == nil {
		other = k.take
	}
	next := other(newClient(t, b), name)
	octx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	require.NoError(t, next.acquire(octx), msg)
	require.NoError(t, next.release(ctx))
}

// TestReleaseWithEndedCtx: a release given a ctx that has ended (a
// request's ctx cancelled during the work, the usual defer m.Unlock(ctx))
// is still sent, with a fresh bounded ctx: it failed before reaching Redis
// and the lock stayed taken for its whole lease (30s). Another Client then
// takes it at once. (Found by a reviewer of the README's examples.)
func TestReleaseWithEndedCtx(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range releaseKinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				held := k.take(newClient(t, b), name)
				require.NoError(t, held.acquire(ctx))
				ended, cancel := context.WithCancel(ctx)
				cancel()
				require.NoError(t, held.release(ended))
				requireTakenBack(t, ctx, b, k, name, time.Second, "the release with an ended ctx left the lock taken")
			})
		}
	})
}

// TestCloseNotHeldUpByRenewal: Close waited for the watchdog's goroutine,
// which ran each renewal itself; a renewal in flight to a server that
// stopped answering held Close up until the read's deadline (with
// ContextTimeoutEnabled, the renewal ctx's: here 2s), as go-redis does not
// end a read when its ctx is cancelled. Close no longer waits for a
// renewal in flight, which ends on its own. (Found by a reviewer.)
func TestCloseNotHeldUpByRenewal(t *testing.T) {
	srv := redistest.NewServer(t)
	opt := srv.Options()
	opt.ContextTimeoutEnabled = true
	opt.ReadTimeout = 10 * time.Second
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(6*time.Second)) // renewals every 2s
	m := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, m.Lock(ctxT(t, 5*time.Second)))
	time.Sleep(1800 * time.Millisecond)
	srv.Stop(t)
	t.Cleanup(func() { srv.Cont(t) })
	time.Sleep(500 * time.Millisecond) // the renewal waits for its reply
	start := time.Now()
	require.NoError(t, c.Close())
	took := time.Since(start)
	srv.Cont(t)
	require.Less(t, took, time.Second, "Close waited for a renewal")
}

// nowhereClient returns a Client on an address where nothing listens, its
// go-redis client, and a hook counting the requests that client sends.
func nowhereClient(t *testing.T) (*redlatch.Client, *redis.Client, *redistest.RequestCounter) {
	t.Helper()
	hook := &redistest.RequestCounter{}
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	rdb.AddHook(hook)
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	return c, rdb, hook
}

// TestBadInput: bad arguments are reported, name the argument, never panic
// and never reach Redis.
func TestBadInput(t *testing.T) {
	c, rdb, hook := nowhereClient(t)
	ctx := context.Background()

	cases := []struct {
		arg string
		l   locker
	}{
		{"name", c.Mutex("")},
		{"name", c.ReentrantMutex("")},
		{"lease", c.Mutex("x", redlatch.WithLease(0))},
		{"lease", c.ReentrantMutex("x", redlatch.WithLease(-time.Second))},
		{"owner", c.Mutex("x", redlatch.WithOwner(""))},
		{"owner", c.ReentrantMutex("x", redlatch.WithOwner(""))},
		{"name", c.Mutex("}x")}, // an empty hash tag would scatter the keys over slots
	}
	for _, tc := range cases {
		for _, err := range []error{
			tc.l.Lock(ctx),
			second(tc.l.TryLock(ctx)),
			tc.l.Unlock(ctx),
			second(tc.l.TTL(ctx)),
			second(tc.l.IsLocked(ctx)),
			second(tc.l.ForceUnlock(ctx)),
		} {
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
			require.Contains(t, err.Error(), tc.arg)
		}
	}
	_, err := c.ReentrantMutex("").HoldCount(ctx)
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)

	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	t.Cleanup(func() { _ = ring.Close() })
	for _, bad := range []*redlatch.Client{
		redlatch.New(nil),
		redlatch.New((*redis.Client)(nil)),
		redlatch.New(ring), // shards keys over servers: see New
		redlatch.New(rdb, redlatch.WithWatchdogTimeout(0)),
		redlatch.New(rdb, redlatch.WithWatchdogTimeout(time.Nanosecond)),
		nil,
	} {
		err := bad.Mutex("x").Lock(ctx)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		if bad != nil {
			require.NoError(t, bad.Close())
		}
	}
	require.Zero(t, hook.N.Load(), "bad input reached Redis")
}

func second[T any](_ T, err error) error { return err }

// TestNilContext: a nil ctx is bad input like any other (API.md: it never
// panics and never reaches Redis): every method that takes a ctx returns
// an error wrapping ErrInvalidArgument that names it. It panicked with a
// nil pointer dereference (found by a reviewer).
func TestNilContext(t *testing.T) {
	c, _, hook := nowhereClient(t)
	var ctx context.Context // nil
	errs := map[string]func() error{}
	for _, l := range []locker{c.Mutex("x"), c.ReentrantMutex("x"), c.FairMutex("x"), c.RWMutex("x")} {
		k := fmt.Sprintf("%T.", l)
		errs[k+"Lock"] = func() error { return l.Lock(ctx) }
		errs[k+"TryLock"] = func() error { return second(l.TryLock(ctx)) }
		errs[k+"Unlock"] = func() error { return l.Unlock(ctx) }
		errs[k+"TTL"] = func() error { return second(l.TTL(ctx)) }
		errs[k+"IsLocked"] = func() error { return second(l.IsLocked(ctx)) }
		errs[k+"ForceUnlock"] = func() error { return second(l.ForceUnlock(ctx)) }
		errs[k+"Do"] = func() error { return redlatch.Do(ctx, l, func(context.Context) error { return nil }) }
	}
	rm, fm, rw := c.ReentrantMutex("x"), c.FairMutex("x"), c.RWMutex("x")
	s, l := c.Semaphore("x", 3), c.CountDownLatch("x")
	r := redlatch.NewRedlock("x", []*redlatch.Client{c})
	for k, f := range map[string]func() error{
		"ReentrantMutex.HoldCount": func() error { return second(rm.HoldCount(ctx)) },
		"FairMutex.HoldCount":      func() error { return second(fm.HoldCount(ctx)) },
		"RWMutex.RLock":            func() error { return rw.RLock(ctx) },
		"RWMutex.TryRLock":         func() error { return second(rw.TryRLock(ctx)) },
		"RWMutex.RUnlock":          func() error { return rw.RUnlock(ctx) },
		"Semaphore.Acquire":        func() error { return s.Acquire(ctx, 1) },
		"Semaphore.TryAcquire":     func() error { return second(s.TryAcquire(ctx, 1)) },
		"Semaphore.Release":        func() error { return s.Release(ctx, 1) },
		"Semaphore.Available":      func() error { return second(s.Available(ctx)) },
		"Latch.TrySetCount":        func() error { return second(l.TrySetCount(ctx, 1)) },
		"Latch.CountDown":          func() error { return l.CountDown(ctx) },
		"Latch.Count":              func() error { return second(l.Count(ctx)) },
		"Latch.Wait":               func() error { return l.Wait(ctx) },
		"Latch.Delete":             func() error { return second(l.Delete(ctx)) },
		"Redlock.Lock":             func() error { return r.Lock(ctx) },
		"Redlock.TryLock":          func() error { return second(r.TryLock(ctx)) },
		"Redlock.Unlock":           func() error { return r.Unlock(ctx) },
	} {
		errs[k] = f
	}
	for k, f := range errs {
		var err error
		require.NotPanics(t, func() { err = f() }, k)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument, k)
		require.Contains(t, err.Error(), "ctx", k)
	}
	require.Zero(t, hook.N.Load(), "a nil ctx reached Redis")
}

// TestUnreachableRedis: Lock on a Redis that does not answer returns an
// error by the context's deadline and leaks no goroutine (TestMain checks).
func TestUnreachableRedis(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Mutex("x").Lock(ctx)
	require.Error(t, err)
	require.Less(t, time.Since(start), 3*time.Second)
}

// TestUnresponsiveRedisOnDefaultOptions: on a *redis.Client with go-redis's
// default ContextTimeoutEnabled (off), a Lock whose ctx ends while Redis
// does not answer returns by its deadline plus the undo's bound (the
// cleanup timeout, 2s), and an Unlock by its deadline (its resend goes on
// in the background). They returned after the client's ReadTimeout (here
// 5s) for the call, and the Lock after another one for its undo: go-redis
// sets a read's deadline from ctx only with the option on, which redlatch
// now turns on in the clone of the client it sends its commands through.
func TestUnresponsiveRedisOnDefaultOptions(t *testing.T) {
	srv := redistest.NewServer(t)
	c := defaultOptionsClient(t, srv)
	held := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, held.Lock(ctxT(t, 5*time.Second)))
	other := c.Mutex(redistest.UniqueName(t))

	resume := freeze(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := other.Lock(ctx)
	took := time.Since(start)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, took, 300*time.Millisecond+2*time.Second+700*time.Millisecond,
		"Lock outlasted its ctx and its undo's bound")

	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	require.Error(t, held.Unlock(ctx))
	require.Less(t, time.Since(start), 300*time.Millisecond+700*time.Millisecond, "Unlock outlasted its ctx")
	resume()
}

// defaultOptionsClient returns a Client on a go-redis client of srv with
// go-redis's default options (ContextTimeoutEnabled off) but a ReadTimeout
// of 5s, which a call that does not return by its ctx overruns plainly.
func defaultOptionsClient(t *testing.T, srv *redistest.Server) *redlatch.Client {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, ReadTimeout: 5 * time.Second})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	return c
}

// freeze stops srv (SIGSTOP) and returns the function that resumes it,
// which the test's cleanup calls unless the test did.
func freeze(t *testing.T, srv *redistest.Server) (resume func()) {
	t.Helper()
	srv.Stop(t)
	var once sync.Once
	resume = func() { once.Do(func() { srv.Cont(t) }) }
	t.Cleanup(resume)
	return resume
}

// TestUserHooksSeeRoutedCalls: on a *redis.Client with ContextTimeoutEnabled
// off, redlatch's script calls go through a clone of the client (see
// TestUnresponsiveRedisOnDefaultOptions), from a hook New adds to the
// client: hooks the user added before New still see every call, alone and
// pipelined (a renewal of more than one batch), and the pipelined renewals
// still renew. A hook added after New is inside redlatch's (go-redis runs
// the hooks added later closer to the server): it sees the user's commands,
// and redlatch's script calls go round it, as the README says.
func TestUserHooksSeeRoutedCalls(t *testing.T) {
	srv := redistest.NewServer(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	before := &scriptCounter{}
	rdb.AddHook(before)
	c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(600*time.Millisecond))
	after := &scriptCounter{}
	rdb.AddHook(after)
	ctx := ctxT(t, 10*time.Second)

	// More holds than one renewal batch (100 keys): renewals are pipelined.
	var locks []*redlatch.Mutex
	for range 150 {
		m := c.Mutex(redistest.UniqueName(t))
		require.NoError(t, m.Lock(ctx))
		locks = append(locks, m)
	}
	time.Sleep(700 * time.Millisecond) // three renewals, past the first lease
	for _, m := range locks {
		requireOpen(t, m.Lost(), "a hold renewed through the clone was lost")
		require.NoError(t, m.Unlock(ctx))
	}
	require.NoError(t, rdb.Set(ctx, redistest.UniqueName(t), "x", 0).Err()) // the user's own command
	// 150 Lock and 150 Unlock, and an EVAL after each first EVALSHA
	// (NOSCRIPT: the scripts were not loaded yet).
	require.Equal(t, int64(302), before.n.Load(), "script calls seen alone")
	require.GreaterOrEqual(t, before.piped.Load(), int64(4), "script calls seen in pipelines (renewals of two batches)")
	require.Equal(t, int64(1), before.other.Load(), "the user's commands seen")
	require.Equal(t, int64(1), after.other.Load(), "the user's commands seen by a hook added after New")
	require.Zero(t, after.n.Load()+after.piped.Load(), "redlatch's script calls seen by a hook added after New")
}

// scriptPipeErrHook records the errors that the pipelines of script calls
// return to a hook (the error a tracing or metrics hook records).
type scriptPipeErrHook struct {
	passHook
	mu   sync.Mutex
	errs []string
}

func (h *scriptPipeErrHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if len(cmds) > 0 && cmds[0].Name() == "evalsha" {
			h.mu.Lock()
			h.errs = append(h.errs, fmt.Sprint(err))
			h.mu.Unlock()
		}
		return err
	}
}

// TestUserHooksSeeRoutedPipelineErrors: a hook added before New sees a
// routed pipeline return the error go-redis returns for it unrouted (the
// first failed command's, here the renewals' NOSCRIPT after SCRIPT FLUSH),
// not nil: routing a pipeline changes nothing a hook records.
func TestUserHooksSeeRoutedPipelineErrors(t *testing.T) {
	srv := redistest.NewServer(t)
	seen := func(ctxTimeout bool) string {
		rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, ContextTimeoutEnabled: ctxTimeout})
		t.Cleanup(func() { _ = rdb.Close() })
		h := &scriptPipeErrHook{}
		rdb.AddHook(h)
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(600*time.Millisecond))
		ctx := ctxT(t, 10*time.Second)
		var locks []*redlatch.Mutex
		for range 150 { // two renewal batches: pipelined
			m := c.Mutex(redistest.UniqueName(t))
			require.NoError(t, m.Lock(ctx))
			locks = append(locks, m)
		}
		require.NoError(t, rdb.ScriptFlush(ctx).Err())
		time.Sleep(300 * time.Millisecond) // a renewal: NOSCRIPT, load, again
		for _, m := range locks {
			requireOpen(t, m.Lost(), "a hold was lost")
			require.NoError(t, m.Unlock(ctx))
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		require.NotEmpty(t, h.errs)
		return h.errs[0]
	}
	want := seen(true) // not routed
	require.Contains(t, want, "NOSCRIPT")
	require.Equal(t, want, seen(false), "a routed pipeline returned another error to the hooks")
}

// lossyHook simulates a lost reply: it runs a matching command, then runs it
// again as go-redis does after a network error, and returns the second reply
// (retry=true); or it returns a network error after the command ran
// (retry=false), as when every retry failed. With late set, it simulates a
// slow reply instead: late runs after the command ran, then its reply is
// returned.
type lossyHook struct {
	passHook
	match   func(cmd redis.Cmder) bool
	retry   bool
	between func() // with retry: runs after the first run, before the resend
	late    func()
	armed   atomic.Bool
}

func (h *lossyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) || !h.armed.CompareAndSwap(true, false) {
			return next(ctx, cmd)
		}
		if err := next(ctx, cmd); err != nil {
			return err
		}
		if h.late != nil {
			h.late()
			return nil
		}
		if !h.retry {
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		}
		if h.between != nil {
			h.between()
		}
		return next(ctx, cmd)
	}
}

// passHook passes every call on: the go-redis hooks of the tests embed it
// and define only the methods they act on.
type passHook struct{}

func (passHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (passHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (passHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// delayHook holds back each command match accepts for d before it is sent
// (a slow link or master) or, with d 0, until its ctx ends (a master that
// does not answer), ending early with the ctx as go-redis would. With late
// set, the command is sent first and its reply is held back (it comes too
// late). With entered set (and once), it closes entered at the first
// command it holds.
type delayHook struct {
	passHook
	match   func(redis.Cmder) bool
	d       time.Duration
	late    bool
	once    *sync.Once
	entered chan struct{}
}

func (h delayHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) {
			return next(ctx, cmd)
		}
		if h.entered != nil {
			h.once.Do(func() { close(h.entered) })
		}
		send := next
		if h.late {
			if err := next(ctx, cmd); err != nil {
				return err
			}
			send = func(context.Context, redis.Cmder) error { return cmd.Err() }
		}
		var after <-chan time.Time
		if h.d > 0 {
			t := time.NewTimer(h.d)
			defer t.Stop()
			after = t.C
		}
		select {
		case <-after:
			return send(ctx, cmd)
		case <-ctx.Done():
			cmd.SetErr(ctx.Err())
			return ctx.Err()
		}
	}
}

// scriptWith matches a script call (EVAL or EVALSHA) whose arguments contain s.
func scriptWith(s string) func(redis.Cmder) bool {
	return func(cmd redis.Cmder) bool {
		if cmd.Name() != "evalsha" && cmd.Name() != "eval" {
			return false
		}
		for _, a := range cmd.Args() {
			if v, ok := a.(string); ok && v == s {
				return true
			}
		}
		return false
	}
}

// lossyClient returns a Client (with opts) whose script calls that match
// go through a lossyHook, armed by the caller.
func lossyClient(t *testing.T, b redistest.Backend, match func(redis.Cmder) bool, retry bool, opts ...redlatch.Option) (*redlatch.Client, *lossyHook) {
	t.Helper()
	rdb := b.Client(t)
	hook := &lossyHook{match: match, retry: retry}
	rdb.AddHook(hook)
	c := newClientOn(t, rdb, opts...)
	return c, hook
}

// fairKey and writersWakeKey name a key that only the release script of a
// FairMutex, or of an RWMutex (writer or reader), has in its KEYS.
func fairKey(name string) string        { return "{" + name + "}:fair" }
func writersWakeKey(name string) string { return "{" + name + "}:wwake" }

// TestLostReplies: a retried acquire or unlock whose first reply was lost
// counts once (Redisson #4871), and an acquire whose reply never arrived
// leaves no hold behind.
func TestLostReplies(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith(lockKey(name)), true)
		m := c.ReentrantMutex(name)

		hook.armed.Store(true) // the acquire runs twice on the server
		require.NoError(t, m.Lock(ctx))
		n, err := m.HoldCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 1, n, "a retried acquire counted twice")

		require.NoError(t, m.Lock(ctx))
		hook.armed.Store(true) // the unlock runs twice on the server
		require.NoError(t, m.Unlock(ctx))
		n, err = m.HoldCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 1, n, "a retried unlock decremented twice")

		hook.armed.Store(true) // the final unlock runs twice: still a success
		require.NoError(t, m.Unlock(ctx))
		locked, err := m.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)

		// The reply never arrives: the caller gets an error, and the hold the
		// server granted is undone, so nobody holds a lock it believes it lacks.
		hook.retry = false
		for _, k := range kinds {
			l := k.make(c, name)
			hook.armed.Store(true)
			ok, err := l.TryLock(ctx)
			require.Error(t, err)
			require.False(t, ok)
			locked, err = l.IsLocked(ctx)
			require.NoError(t, err)
			require.False(t, locked, "%s: an ambiguous acquire left a hold", k.name)
			hook.armed.Store(true)
			require.Error(t, l.Lock(ctx))
			locked, err = l.IsLocked(ctx)
			require.NoError(t, err)
			require.False(t, locked, "%s: an ambiguous acquire left a hold", k.name)
		}
	})
}

// TestResentReleaseSparesSameOwner: a release resent after a lost reply
// must not release a later hold of the same owner id. Here the owner id is
// shared (WithOwner) by handles on two Clients: the first run of an Unlock
// releases the lock, the other handle takes it, and then the resend arrives.
// The resend is recognised by the hold's fencing token: the later hold has
// a new one. Without that, the resend took the lock from its new holder.
func TestResentReleaseSparesSameOwner(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		type handle interface {
			Lock(context.Context) error
			Unlock(context.Context) error
		}
		kinds := []struct {
			name string
			key  func(name string) string // a key of the release script's KEYS
			make func(c *redlatch.Client, name string) handle
		}{
			{"Mutex", lockKey, func(c *redlatch.Client, n string) handle { return c.Mutex(n, redlatch.WithOwner("shared")) }},
			{"ReentrantMutex", lockKey, func(c *redlatch.Client, n string) handle {
				return c.ReentrantMutex(n, redlatch.WithOwner("shared"))
			}},
			{"FairMutex", fairKey, func(c *redlatch.Client, n string) handle {
				return c.FairMutex(n, redlatch.WithOwner("shared"))
			}},
			{"RWMutex", writersWakeKey, func(c *redlatch.Client, n string) handle {
				return c.RWMutex(n, redlatch.WithOwner("shared"))
			}},
			{"RWMutex readers", writersWakeKey, func(c *redlatch.Client, n string) handle {
				return readers{c.RWMutex(n, redlatch.WithOwner("shared"))}
			}},
		}
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				c, hook := lossyClient(t, b, scriptWith(k.key(name)), true)
				first, second := k.make(c, name), k.make(newClient(t, b), name)
				// Load the scripts first: a NOSCRIPT reply would spend the hook.
				require.NoError(t, first.Lock(ctx))
				require.NoError(t, first.Unlock(ctx))

				require.NoError(t, first.Lock(ctx))
				var took error
				hook.between = func() { took = second.Lock(ctx) }
				hook.armed.Store(true)
				require.NoError(t, first.Unlock(ctx), "a resent release still succeeds")
				require.NoError(t, took)
				require.NoError(t, second.Unlock(ctx), "the resent release freed the later hold")
			})
		}
	})
}

// readers makes an RWMutex's read side a Lock and Unlock.
type readers struct{ *redlatch.RWMutex }

func (r readers) Lock(ctx context.Context) error   { return r.RLock(ctx) }
func (r readers) Unlock(ctx context.Context) error { return r.RUnlock(ctx) }
func (r readers) Lost() <-chan struct{}            { return r.RLost() }

// TestWrongType: a key of the lock's name holding foreign data gives a clear error.
func TestWrongType(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 5*time.Second)
		name := redistest.UniqueName(t)
		require.NoError(t, b.Client(t).Set(ctx, lockKey(name), "foreign", 0).Err())
		c := newClient(t, b)
		for _, k := range kinds {
			err := k.make(c, name).Lock(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, k.name)
			_, err = k.make(c, name).TryLock(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, k.name)
			// ForceUnlock leaves another program's value alone, as
			// FairMutex's and RWMutex's do (it deleted it and reported a
			// held lock; found by a reviewer).
			held, err := k.make(c, name).ForceUnlock(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, k.name)
			require.False(t, held, k.name)
			v, err := b.Client(t).Get(ctx, lockKey(name)).Result()
			require.NoError(t, err, "%s: ForceUnlock deleted the value", k.name)
			require.Equal(t, "foreign", v, k.name)
		}
	})
}

// TestManyNames: locks of many names work side by side on every backend (on
// the cluster they spread over all masters: no CROSSSLOT).
func TestManyNames(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b)
		base := redistest.UniqueName(t)
		var ms []*redlatch.ReentrantMutex
		for i := 0; i < 50; i++ {
			m := c.ReentrantMutex(base + "-" + strconv.Itoa(i))
			require.NoError(t, m.Lock(ctx))
			require.NoError(t, m.Lock(ctx))
			ms = append(ms, m)
		}
		for _, m := range ms {
			require.NoError(t, m.Unlock(ctx))
			require.NoError(t, m.Unlock(ctx))
		}
	})
}

// TestReentrantSharedHandleConcurrentLock: goroutines sharing one handle
// lock at the same time; the handle keeps tracking (and renewing) the hold
// until the last of their Unlocks.
func TestReentrantSharedHandleConcurrentLock(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(300*time.Millisecond))
		for round := 0; round < 10; round++ {
			m := c.ReentrantMutex(redistest.UniqueName(t))
			var wg sync.WaitGroup
			for g := 0; g < 2; g++ {
				wg.Add(1)
				go func() { defer wg.Done(); require.NoError(t, m.Lock(ctx)) }()
			}
			wg.Wait()
			require.NoError(t, m.Unlock(ctx))
			lost := m.Lost()
			require.NotNil(t, lost, "round %d: the remaining hold is not tracked", round)
			time.Sleep(120 * time.Millisecond)
			requireOpen(t, lost, "remaining hold lost")
			n, err := m.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, 1, n)
			require.NoError(t, m.Unlock(ctx))
		}
	})
}

// TestLateAcquisitionAfterUndo: an acquisition stuck in a slow link, whose
// caller timed out and undid it before it reached Redis, takes nothing when
// it arrives late: the undo left a tombstone. Without it the lock would be
// held by nobody, unrenewed, for a whole lease (a minute here).
func TestLateAcquisitionAfterUndo(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		admin := b.Client(t)
		c, proxy := proxiedClient(t, b)

		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				name := redistest.UniqueName(t)
				l := k.make(c, name, redlatch.WithLease(time.Minute))
				require.NoError(t, l.Lock(ctx)) // scripts loaded, connection open
				require.NoError(t, l.Unlock(ctx))

				lateAttempt(t, ctx, proxy, func(ctx context.Context) error {
					ok, err := l.TryLock(ctx)
					require.False(t, ok)
					return err
				})
				require.Never(t, func() bool {
					n, err := admin.Exists(ctx, lockKey(name)).Result()
					return err != nil || n != 0
				}, 300*time.Millisecond, 10*time.Millisecond, "the late acquisition took the lock")
				require.NoError(t, l.Lock(ctx))
				require.NoError(t, l.Unlock(ctx))
			})
		}
	})
}

// proxiedClient returns a Client whose one connection to b's server (no
// retries by go-redis) runs through a proxy, for the late-attempt tests; it
// skips the test on a backend other than a single real server.
func proxiedClient(t *testing.T, b redistest.Backend) (*redlatch.Client, *redistest.Proxy) {
	t.Helper()
	if b.Server == nil {
		t.Skip("needs a single real redis-server behind a proxy")
	}
	proxy := redistest.NewProxy(t, b.Server.Addr)
	opts := b.Server.Options()
	opts.Addr, opts.PoolSize, opts.MaxRetries = proxy.Addr, 1, -1
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	return c, proxy
}

// lateAttempt runs attempt with a 200ms context while the proxy holds what
// the client sends, so it times out and undoes its acquisition; then the
// held request reaches Redis, after the undo.
func lateAttempt(t *testing.T, ctx context.Context, proxy *redistest.Proxy, attempt func(context.Context) error) {
	t.Helper()
	require.Positive(t, proxy.Hold())
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err := attempt(short)
	cancel()
	require.Error(t, err)
	proxy.Release()
}

// tokenHandle is a reentrant lock handle as the token tests use it.
type tokenHandle interface {
	lossHandle
	Token() int64
	IsLocked(context.Context) (bool, error)
}

type tokenKind struct {
	name string
	make func(c *redlatch.Client, name string) tokenHandle
}

// requireNoHoldLeft checks that the lock of m is free: every hold count
// taken was released.
func requireNoHoldLeft(t *testing.T, ctx context.Context, m tokenHandle) {
	t.Helper()
	locked, err := m.IsLocked(ctx)
	require.NoError(t, err)
	require.False(t, locked, "a hold count was left behind")
}

// sharedOwnerKinds are the reentrant lock kinds, each handle with the owner
// id "shared": handles of one kind share the ownership.
var sharedOwnerKinds = []tokenKind{
	{"ReentrantMutex", func(c *redlatch.Client, n string) tokenHandle {
		return c.ReentrantMutex(n, redlatch.WithOwner("shared"))
	}},
	{"FairMutex", func(c *redlatch.Client, n string) tokenHandle { return c.FairMutex(n, redlatch.WithOwner("shared")) }},
	{"RWMutex", func(c *redlatch.Client, n string) tokenHandle { return c.RWMutex(n, redlatch.WithOwner("shared")) }},
}

// TestTokensBeyond2p53: a fence key whose last token is beyond 2^53
// (issued by a server whose clock was far ahead: a failover to a replica
// with a misset clock, or the clock then stepped back). Tokens keep rising
// from the fence key while the clock is behind it; the increment went
// through a Lua number, which holds no odd integer beyond 2^53, so the
// next token came out lower than the last (from 2^53 on, the same token
// again and again: successive holders passed equal tokens). An RWMutex
// writer's re-entry also replied its token as a Lua number, so it came
// back changed: the handle tracked it as a new hold. (Found by a reviewer.)
func TestTokensBeyond2p53(t *testing.T) {
	type tokenLock interface {
		Lock(context.Context) error
		Unlock(context.Context) error
		Token() int64
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for kind, mk := range map[string]func(*redlatch.Client, string) tokenLock{
			"Mutex":          func(c *redlatch.Client, n string) tokenLock { return c.Mutex(n) },
			"ReentrantMutex": func(c *redlatch.Client, n string) tokenLock { return c.ReentrantMutex(n) },
			"FairMutex":      func(c *redlatch.Client, n string) tokenLock { return c.FairMutex(n) },
			"RWMutex":        func(c *redlatch.Client, n string) tokenLock { return c.RWMutex(n) },
		} {
			t.Run(kind, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				c := newClient(t, b)
				last := fenceBeyond2p53(t, ctx, b, name)
				for i := range 3 {
					m := mk(c, name)
					require.NoError(t, m.Lock(ctx))
					require.Greater(t, m.Token(), last, "hold %d", i)
					last = m.Token()
					if kind != "Mutex" {
						require.NoError(t, m.Lock(ctx))
						require.Equal(t, last, m.Token(), "re-entry of hold %d", i)
						require.NoError(t, m.Unlock(ctx))
					}
					require.NoError(t, m.Unlock(ctx))
				}
			})
		}
	})
}

// TestStaleUnlockBeyond2p53: tokens beyond 2^53 (a fence key raised by a
// server whose clock was far ahead, see TestTokensBeyond2p53) are distinct
// digits, but the release scripts also compared them as Lua numbers, which
// hold no odd integer beyond 2^53: 2^53+3 and 2^53+4 compared equal. A
// handle whose hold was lost (force-unlocked) then released, with its
// Unlock naming its old token, the new hold another handle of the same
// owner id took: the lock was free while that handle still held it. The
// watchdog's renewals compared them so too. (Found by a reviewer of
// 44875a8.)
func TestStaleUnlockBeyond2p53(t *testing.T) {
	type tokenLock interface {
		Lock(context.Context) error
		Unlock(context.Context) error
		Token() int64
		IsLocked(context.Context) (bool, error)
		ForceUnlock(context.Context) (bool, error)
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range []struct {
			kind string
			mk   func(*redlatch.Client, string, ...redlatch.LockOption) tokenLock
		}{
			{"Mutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) tokenLock { return c.Mutex(n, o...) }},
			{"ReentrantMutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) tokenLock {
				return c.ReentrantMutex(n, o...)
			}},
			{"FairMutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) tokenLock { return c.FairMutex(n, o...) }},
			{"RWMutex", func(c *redlatch.Client, n string, o ...redlatch.LockOption) tokenLock { return c.RWMutex(n, o...) }},
		} {
			t.Run(k.kind, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				c := newClient(t, b)
				high := fenceBeyond2p53(t, ctx, b, name)
				opts := []redlatch.LockOption{redlatch.WithOwner("shared"), redlatch.WithLease(time.Minute)}
				first, second := k.mk(c, name, opts...), k.mk(c, name, opts...)
				require.NoError(t, first.Lock(ctx))
				require.Equal(t, high+1, first.Token())
				// first's hold is lost.
				forced, err := k.mk(c, name, redlatch.WithOwner("admin")).ForceUnlock(ctx)
				require.NoError(t, err)
				require.True(t, forced)
				require.NoError(t, second.Lock(ctx))
				require.Equal(t, high+2, second.Token())
				// first's Unlock names its own token: not second's hold.
				require.ErrorIs(t, first.Unlock(ctx), redlatch.ErrNotHeld)
				locked, err := second.IsLocked(ctx)
				require.NoError(t, err)
				require.True(t, locked, "a stale Unlock released another handle's hold")
				require.NoError(t, second.Unlock(ctx))
			})
		}
	})
}

// fenceBeyond2p53 sets the last token of the lock name to 2^53 + 2 (the
// next one, 2^53 + 3, is odd: no Lua number holds it) and returns it.
func fenceBeyond2p53(t *testing.T, ctx context.Context, b redistest.Backend, name string) int64 {
	t.Helper()
	const high = int64(1)<<53 + 2
	require.NoError(t, b.Client(t).Set(ctx, "{"+name+"}:fence", strconv.FormatInt(high, 10), time.Minute).Err())
	return high
}

// TestReentryAfterLossTakesNewToken: a reentrant handle whose hold was lost
// and which then re-enters a hold that another handle of the same owner id
// took meanwhile adopts that hold's fencing token, so its Unlock (which
// names the token) releases its share of it.
func TestReentryAfterLossTakesNewToken(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range sharedOwnerKinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				c := newClient(t, b)
				first, second := k.make(c, name), k.make(c, name)
				require.NoError(t, first.Lock(ctx))
				old := first.Token()
				_, err := first.ForceUnlock(ctx) // first's hold is lost
				require.NoError(t, err)
				require.NoError(t, second.Lock(ctx))
				require.NoError(t, first.Lock(ctx)) // re-enters second's hold
				require.Greater(t, first.Token(), old)
				require.Equal(t, second.Token(), first.Token())
				require.NoError(t, first.Unlock(ctx))
				require.NoError(t, second.Unlock(ctx))
				requireNoHoldLeft(t, ctx, first)
			})
		}
	})
}

// reentrantHandle is a handle of a reentrant lock (ReentrantMutex,
// FairMutex, RWMutex as writer or, through readers, as reader).
type reentrantHandle interface {
	Lock(context.Context) error
	Unlock(context.Context) error
	Lost() <-chan struct{}
	IsLocked(context.Context) (bool, error)
}

// reentrantKinds are the reentrant locks, with the key the watchdog renews
// for a hold (held) and a key only their release script has in its KEYS
// (release).
var reentrantKinds = []struct {
	name          string
	held, release func(name string) string
	make          func(c *redlatch.Client, name string) reentrantHandle
}{
	{"ReentrantMutex", lockKey, lockKey, func(c *redlatch.Client, n string) reentrantHandle { return c.ReentrantMutex(n) }},
	{"FairMutex", fairKey, fairKey, func(c *redlatch.Client, n string) reentrantHandle { return c.FairMutex(n) }},
	{"RWMutex", rwKey, writersWakeKey, func(c *redlatch.Client, n string) reentrantHandle { return c.RWMutex(n) }},
	{"RWMutex readers", rwKey, writersWakeKey, func(c *redlatch.Client, n string) reentrantHandle {
		return readers{c.RWMutex(n)}
	}},
}

// TestLockDuringUnlockStaysTracked: on a reentrant handle shared by
// goroutines, an Unlock that releases the lock and a Lock that takes it anew
// before that Unlock's reply is back must leave the new hold tracked: its
// watchdog renews it and Lost reports it. Here the Unlock's reply is lost
// and resent (the resend changes nothing: the new hold has another token),
// and the Lock runs in between.
func TestLockDuringUnlockStaysTracked(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range reentrantKinds {
				run(k.name, func(t *testing.T) {
					ctx := ctxT(t, 10*time.Second)
					name := redistest.UniqueName(t)
					c, hook := lossyClient(t, b, scriptWith(k.release(name)), true, redlatch.WithWatchdogTimeout(300*time.Millisecond))
					m := k.make(c, name)
					require.NoError(t, m.Lock(ctx)) // scripts loaded
					require.NoError(t, m.Unlock(ctx))

					require.NoError(t, m.Lock(ctx))
					var took error
					hook.between = func() { took = m.Lock(ctx) }
					hook.armed.Store(true)
					require.NoError(t, m.Unlock(ctx))
					require.NoError(t, took)
					require.NotNil(t, m.Lost(), "the new hold is not tracked")
					time.Sleep(time.Second) // three watchdog timeouts: only renewal keeps it
					locked, err := m.IsLocked(ctx)
					require.NoError(t, err)
					require.True(t, locked, "the new hold was not renewed")
					require.NoError(t, m.Unlock(ctx))
				})
			}
		})
	})
}

// TestUnlockOfLostHoldRacingLock: on a reentrant handle shared by
// goroutines, the hold is lost locally (renewal replies lost: Lost closes)
// while Redis still counts it. Goroutine A's Unlock of it is in flight when
// goroutine B's Lock takes the lock again through the handle (re-entering
// the hold Redis still counts when it gets there first, or taking a new one
// after A's release). A's Unlock must report ErrNotHeld, as it does without
// the race (TestReplicaSyncRetakeAfterLocalLoss): its hold was lost. It
// returned nil whenever B's Lock reply came first (the handle then tracks
// B's hold, and A's Unlock left its outcome unchecked). B's Unlock then
// releases the lock.
func TestUnlockOfLostHoldRacingLock(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range reentrantKinds {
				for _, releaseFirst := range []bool{false, true} {
					run(fmt.Sprintf("%s/releaseFirst=%v", k.name, releaseFirst), func(t *testing.T) {
						ctx := ctxT(t, 10*time.Second)
						name := redistest.UniqueName(t)
						rdb := b.Client(t)
						renew := &renewHook{match: renewalOf(k.held(name), "")}
						gate := &gateScriptHook{match: scriptWith(k.release(name)), after: releaseFirst,
							entered: make(chan struct{}), proceed: make(chan struct{})}
						rdb.AddHook(renew)
						rdb.AddHook(gate)
						timeout := 450 * time.Millisecond
						c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(timeout))
						m := k.make(c, name)
						require.NoError(t, m.Lock(ctx)) // scripts loaded
						require.NoError(t, m.Unlock(ctx))

						require.NoError(t, m.Lock(ctx)) // goroutine A's hold
						renew.armed.Store(true)
						requireClosedWithin(t, m.Lost(), 2*timeout+time.Second, "not lost with renewal replies lost")
						renew.armed.Store(false)
						locked, err := m.IsLocked(ctx)
						require.NoError(t, err)
						require.True(t, locked, "Redis no longer counts the hold: the test proves nothing")

						gate.armed.Store(true)
						unlocked := make(chan error, 1)
						go func() { unlocked <- m.Unlock(ctx) }() // A
						<-gate.entered
						require.NoError(t, m.Lock(ctx)) // B, while A's release is in flight
						close(gate.proceed)
						require.ErrorIs(t, <-unlocked, redlatch.ErrNotHeld, "A's Unlock of its lost hold")

						requireOpen(t, m.Lost(), "B's hold reported lost")
						require.NoError(t, m.Unlock(ctx), "B's Unlock")
						locked, err = m.IsLocked(ctx)
						require.NoError(t, err)
						require.False(t, locked, "left held after every Lock had its Unlock")
					})
				}
			}
		})
	})
}

func rwKey(name string) string { return "{" + name + "}:rw" }

// TestLateReplyKeepsNewerHold: on a reentrant handle shared by goroutines,
// a Lock whose reply comes back after the hold it took was lost and another
// goroutine's Lock took a new one must not replace the new hold's tracking
// with the dead one: the newer token wins (for read holds, which have no
// token, the live one), and the late Lock re-enters the live hold, so both
// Unlocks balance.
func TestLateReplyKeepsNewerHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		kinds := append(slices.Clone(sharedOwnerKinds), tokenKind{"RWMutex readers", func(c *redlatch.Client, n string) tokenHandle {
			return readers{c.RWMutex(n, redlatch.WithOwner("shared"))} // Token: 0
		}})
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				c, hook := lossyClient(t, b, scriptWith("shared"), true)
				m, other := k.make(c, name), k.make(newClient(t, b), name)
				require.NoError(t, m.Lock(ctx)) // scripts loaded
				require.NoError(t, m.Unlock(ctx))

				var newer int64
				var newerLost <-chan struct{}
				hook.late = func() {
					_, err := other.ForceUnlock(ctx) // the late Lock's hold is lost
					require.NoError(t, err)
					require.NoError(t, m.Lock(ctx)) // another goroutine: a new hold
					newer, newerLost = m.Token(), m.Lost()
				}
				hook.armed.Store(true)
				require.NoError(t, m.Lock(ctx))
				require.Equal(t, newer, m.Token(), "the late reply's older token replaced the newer")
				select {
				case <-newerLost:
					t.Fatal("the live hold was reported lost")
				default:
				}
				require.NoError(t, m.Unlock(ctx))
				require.NoError(t, m.Unlock(ctx))
				requireNoHoldLeft(t, ctx, m)
			})
		}
	})
}

// holdAheadThenEnded prepares TestOlderTokenFromLiveHold's case: a handle
// of kind k on Client c takes a hold whose token is far ahead of the server
// clock (as a faster clock before a failover would have issued), that hold
// ends unnoticed (ForceUnlock by another handle), and the fence key is lost,
// so the handle's next Lock takes a live hold with an older token. It
// returns the handle, the token bound and the ended hold's Lost.
func holdAheadThenEnded(t *testing.T, ctx context.Context, b redistest.Backend, k tokenKind,
	c *redlatch.Client) (m tokenHandle, ahead int64, ended <-chan struct{}) {
	t.Helper()
	name := redistest.UniqueName(t)
	rdb := b.Client(t)
	fence := "{" + name + "}:fence"
	m, other := k.make(c, name), k.make(newClient(t, b), name)
	ahead = time.Now().Add(time.Hour).UnixMicro()
	require.NoError(t, rdb.Set(ctx, fence, strconv.FormatInt(ahead, 10), time.Minute).Err())
	require.NoError(t, m.Lock(ctx))
	require.Greater(t, m.Token(), ahead)
	ended = m.Lost()
	_, err := other.ForceUnlock(ctx) // the hold ends unnoticed
	require.NoError(t, err)
	require.NoError(t, rdb.Del(ctx, fence).Err()) // and the fence is lost
	return m, ahead, ended
}

// TestOlderTokenFromLiveHold: the other side of TestLateReplyKeepsNewerHold.
// When the fence key is lost and the server clock is behind the tracked
// hold's token (as after a failover), a Lock can take a live new hold whose
// token is older than the tracked one. The handle takes the lock again once
// (it cannot tell this from a late reply), sees the same hold twice, and
// gives back the count the second attempt added: one Unlock frees the lock.
func TestOlderTokenFromLiveHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range sharedOwnerKinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				m, ahead, tracked := holdAheadThenEnded(t, ctx, b, k, newClient(t, b))

				require.NoError(t, m.Lock(ctx)) // a new hold, with an older token
				require.Less(t, m.Token(), ahead)
				requireClosedWithin(t, tracked, time.Second, "the ended hold's Lost")
				require.NoError(t, m.Unlock(ctx))
				requireNoHoldLeft(t, ctx, m)
			})
		}
	})
}

// TestCloseGiveBackResent: an acquisition's attempt took the lock in Redis,
// its reply on the way, when Close begins: the call returns ErrClosed and
// gives what it took back (TestCloseWithAttemptInFlight). When that
// give-back fails with no reply from Redis, it is resent in the background,
// as every undo whose outcome is unknown is, and Close waits for it. It
// was not: the resend was refused because the Client was closing, and the
// lock stayed taken by nobody for its whole lease. (Found by a reviewer.)
func TestCloseGiveBackResent(t *testing.T) {
	type kind struct {
		name, key string
		try       func(c *redlatch.Client, n string) func(context.Context) (bool, error)
		take      func(c *redlatch.Client, n string) func(context.Context) error
	}
	kinds := []kind{
		{"Mutex", "lock",
			func(c *redlatch.Client, n string) func(context.Context) (bool, error) { return c.Mutex(n).TryLock },
			func(c *redlatch.Client, n string) func(context.Context) error { return c.Mutex(n).Lock }},
		{"RWMutex", "rw",
			func(c *redlatch.Client, n string) func(context.Context) (bool, error) { return c.RWMutex(n).TryLock },
			func(c *redlatch.Client, n string) func(context.Context) error { return c.RWMutex(n).Lock }},
		{"RWMutex reader", "rw",
			func(c *redlatch.Client, n string) func(context.Context) (bool, error) { return c.RWMutex(n).TryRLock },
			func(c *redlatch.Client, n string) func(context.Context) error { return c.RWMutex(n).Lock }},
		{"Semaphore", "sem",
			func(c *redlatch.Client, n string) func(context.Context) (bool, error) {
				s := c.Semaphore(n, 1)
				return func(ctx context.Context) (bool, error) { return s.TryAcquire(ctx, 1) }
			},
			func(c *redlatch.Client, n string) func(context.Context) error {
				s := c.Semaphore(n, 1)
				return func(ctx context.Context) error { return s.Acquire(ctx, 1) }
			}},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				other := newClient(t, b)
				// The scripts loaded: a NOSCRIPT reply would not reach the hooks' match.
				_, err := k.try(other, name+"warm")(ctx)
				require.NoError(t, err)
				rdb := b.Client(t)
				match := scriptWith("{" + name + "}:" + k.key)
				gate := &gateScriptHook{match: match, after: true, entered: make(chan struct{}), proceed: make(chan struct{})}
				fail := &refuseHook{match: match, nth: 1}
				rdb.AddHook(gate)
				rdb.AddHook(fail)
				c := redlatch.New(rdb)
				got := make(chan error, 1)
				try := k.try(c, name)
				gate.armed.Store(true)
				go func() {
					ok, err := try(ctx)
					if ok {
						err = errors.New("took it")
					}
					got <- err
				}()
				select {
				case <-gate.entered: // the attempt took it in Redis; its reply is held
				case <-time.After(5 * time.Second):
					t.Fatal("no attempt")
				}
				closed := make(chan error, 1)
				go func() { closed <- c.Close() }()
				// Close has begun (it waits for the call): the give-back's
				// first send fails with no reply.
				require.Eventually(t, func() bool {
					_, err := c.Mutex("x").TryLock(ctx)
					return errors.Is(err, redlatch.ErrClosed)
				}, 5*time.Second, time.Millisecond)
				fail.armed.Store(true)
				close(gate.proceed)
				require.ErrorIs(t, <-got, redlatch.ErrClosed)
				require.Eventually(t, func() bool { return fail.seen.Load() > 0 }, 5*time.Second, time.Millisecond, "no give-back")
				require.NoError(t, <-closed)
				// The lock is free at once, not after the closed Client's lease.
				tctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				defer cancel()
				require.NoError(t, k.take(other, name)(tctx), "the closed Client's give-back was not resent: the lock stays taken by nobody")
			})
		}
	})
}

// refuseHook fails the nth script call that matches after it is armed,
// without sending it, as a connection lost before the write would.
type refuseHook struct {
	passHook
	match func(cmd redis.Cmder) bool
	nth   int32
	seen  atomic.Int32
	armed atomic.Bool
}

func (h *refuseHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.armed.Load() && h.match(cmd) && h.seen.Add(1) == h.nth {
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		}
		return next(ctx, cmd)
	}
}

// TestFailedRetakeGivesBack: the retake of TestOlderTokenFromLiveHold
// whose second attempt fails. Lock returns that error, and gives back the
// count its first attempt took: no hold is left that nobody renews or
// releases.
func TestFailedRetakeGivesBack(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range sharedOwnerKinds {
			t.Run(k.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				hooked := b.Client(t)
				hook := &refuseHook{match: scriptWith("shared"), nth: 2}
				hooked.AddHook(hook)
				c := newClientOn(t, hooked)
				m, _, _ := holdAheadThenEnded(t, ctx, b, k, c) // scripts loaded

				hook.armed.Store(true)
				err := m.Lock(ctx) // a new hold with an older token, then a failed retry
				require.ErrorIs(t, err, io.ErrUnexpectedEOF)
				require.Greater(t, hook.seen.Load(), int32(2), "no give-back after the refused retry")
				requireNoHoldLeft(t, ctx, m)
			})
		}
	})
}

// TestNilHandles: every method of a nil handle, and Close of a nil Client,
// returns an error wrapping ErrInvalidArgument (Token 0, Lost nil,
// Validity 0) instead of panicking, as Do on one does.
func TestNilHandles(t *testing.T) {
	ctx := t.Context()
	requireBad := func(err error) {
		t.Helper()
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	}
	for _, l := range []locker{(*redlatch.Mutex)(nil), (*redlatch.ReentrantMutex)(nil),
		(*redlatch.FairMutex)(nil), (*redlatch.RWMutex)(nil)} {
		requireBad(l.Lock(ctx))
		_, err := l.TryLock(ctx)
		requireBad(err)
		requireBad(l.Unlock(ctx))
		require.Zero(t, l.Token())
		require.Nil(t, l.Lost())
		_, err = l.TTL(ctx)
		requireBad(err)
		_, err = l.IsLocked(ctx)
		requireBad(err)
		_, err = l.ForceUnlock(ctx)
		requireBad(err)
		requireBad(redlatch.Do(ctx, l, func(context.Context) error { return nil }))
		if hc, ok := l.(interface {
			HoldCount(context.Context) (int, error)
		}); ok {
			_, err = hc.HoldCount(ctx)
			requireBad(err)
		}
	}
	var rw *redlatch.RWMutex
	requireBad(rw.RLock(ctx))
	_, err := rw.TryRLock(ctx)
	requireBad(err)
	requireBad(rw.RUnlock(ctx))
	require.Nil(t, rw.RLost())

	var r *redlatch.Redlock
	requireBad(r.Lock(ctx))
	_, err = r.TryLock(ctx)
	requireBad(err)
	requireBad(r.Unlock(ctx))
	require.Nil(t, r.Lost())
	require.Zero(t, r.Validity())

	var s *redlatch.Semaphore
	requireBad(s.Acquire(ctx, 1))
	_, err = s.TryAcquire(ctx, 1)
	requireBad(err)
	requireBad(s.Release(ctx, 1))
	_, err = s.Available(ctx)
	requireBad(err)
	require.Nil(t, s.Lost())

	var l *redlatch.CountDownLatch
	_, err = l.TrySetCount(ctx, 1)
	requireBad(err)
	requireBad(l.CountDown(ctx))
	_, err = l.Count(ctx)
	requireBad(err)
	requireBad(l.Wait(ctx))
	_, err = l.Delete(ctx)
	requireBad(err)

	var c *redlatch.Client
	requireBad(c.Close())
	requireBad(c.Mutex("x").Lock(ctx))
	for _, f := range everyCall(c, "x", func() context.Context { return ctx }) {
		requireBad(f())
	}
}

// TestUnlockBySameOwnerHandle: ownership is the handle or its WithOwner id
// (API.md). A Mutex or Redlock handle with a WithOwner id that holds
// nothing itself releases the lock another handle of that id holds, whose
// Lost then closes; without a WithOwner id, or when no handle of the id
// holds it, Unlock returns ErrNotHeld and leaves the lock alone.
func TestUnlockBySameOwnerHandle(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(300*time.Millisecond))
		holder := c.Mutex(name, redlatch.WithOwner("ops"))
		require.NoError(t, holder.Lock(ctx))
		require.ErrorIs(t, c.Mutex(name).Unlock(ctx), redlatch.ErrNotHeld, "another owner released it")
		require.ErrorIs(t, c.Mutex(name, redlatch.WithOwner("other")).Unlock(ctx), redlatch.ErrNotHeld)
		locked, err := holder.IsLocked(ctx)
		require.NoError(t, err)
		require.True(t, locked)

		require.NoError(t, c.Mutex(name, redlatch.WithOwner("ops")).Unlock(ctx))
		locked, err = holder.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
		requireClosedWithin(t, holder.Lost(), 2*time.Second, "the released handle's Lost")
		require.ErrorIs(t, holder.Unlock(ctx), redlatch.ErrNotHeld)
		require.ErrorIs(t, c.Mutex(name, redlatch.WithOwner("ops")).Unlock(ctx), redlatch.ErrNotHeld)
	})

	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	holder := redlatch.NewRedlock(name, redlockClients(t, servers, redlatch.WithWatchdogTimeout(300*time.Millisecond)),
		redlatch.WithOwner("ops"))
	require.NoError(t, holder.Lock(ctx))
	require.ErrorIs(t, redlatch.NewRedlock(name, redlockClients(t, servers)).Unlock(ctx), redlatch.ErrNotHeld)
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name))
	require.NoError(t, redlatch.NewRedlock(name, redlockClients(t, servers), redlatch.WithOwner("ops")).Unlock(ctx))
	require.Equal(t, []bool{false, false, false}, heldOn(t, ctx, servers, name))
	requireClosedWithin(t, holder.Lost(), 2*time.Second, "the released Redlock's Lost")
	require.ErrorIs(t, holder.Unlock(ctx), redlatch.ErrNotHeld)
}

// TestResentForceUnlockSparesLaterHold: a ForceUnlock whose reply is lost
// and that go-redis resends (MaxRetries) is applied once: the resend
// reports what the first run did and leaves alone a hold taken in between.
// "held": the first run released a holder and woke a waiter, which takes
// the lock before the resend (else the resend deleted the waiter's hold:
// the waiter believed it held the lock, Lost open until its next renewal,
// while the lock was free for anyone). "free": the first run found the
// lock free, and another owner took it before the resend. "cycled": as
// "held", and the waiter released the lock, and a Mutex of the name (a
// different lock for the other kinds) came and went, and another owner
// took the lock before the resend: a ForceUnlock is recognised by a record
// of its own, which later releases do not replace. (Found by reviewers;
// FairMutex's held case is TestFairResentForceUnlockKeepsGrant.)
func TestResentForceUnlockSparesLaterHold(t *testing.T) {
	type lock interface {
		Lock(context.Context) error
		Unlock(context.Context) error
		IsLocked(context.Context) (bool, error)
		ForceUnlock(context.Context) (bool, error)
		Lost() <-chan struct{}
	}
	kinds := []struct {
		name string
		key  func(name string) string // a key only the ForceUnlock script of the kind has
		make func(c *redlatch.Client, name string) lock
	}{
		{"Mutex", func(n string) string { return "{" + n + "}:wake" },
			func(c *redlatch.Client, n string) lock { return c.Mutex(n) }},
		{"RWMutex", writersWakeKey,
			func(c *redlatch.Client, n string) lock { return c.RWMutex(n) }},
		{"FairMutex", fairKey,
			func(c *redlatch.Client, n string) lock { return c.FairMutex(n) }},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			for _, mode := range []string{"held", "free", "cycled"} {
				if k.name == "FairMutex" && mode == "held" {
					continue
				}
				free := mode == "free"
				t.Run(k.name+"/"+mode, func(t *testing.T) {
					ctx := ctxT(t, 20*time.Second)
					name := redistest.UniqueName(t)
					cf, hook := lossyClient(t, b, scriptWith(k.key(name)), true)
					forcer := k.make(cf, name)
					// Load the script (a NOSCRIPT reply would spend the hook).
					_, err := forcer.ForceUnlock(ctx)
					require.NoError(t, err)

					later := k.make(newClient(t, b), name) // takes the lock between the runs
					if free {
						hook.between = func() { require.NoError(t, later.Lock(ctx)) }
					} else {
						holder := k.make(newClient(t, b), name)
						require.NoError(t, holder.Lock(ctx))
						waiter := k.make(newClient(t, b), name)
						if mode == "held" {
							waiter = later
						}
						got := make(chan error, 1)
						go func() { got <- waiter.Lock(ctx) }()
						time.Sleep(100 * time.Millisecond) // the waiter sleeps on its channel
						hook.between = func() {
							requireNoErrWithin(t, got, 5*time.Second, "the waiter did not get the lock")
							if mode == "cycled" {
								require.NoError(t, waiter.Unlock(ctx))
								m := newClient(t, b).Mutex(name)
								require.NoError(t, m.Lock(ctx))
								require.NoError(t, m.Unlock(ctx))
								require.NoError(t, later.Lock(ctx))
							}
						}
					}
					hook.armed.Store(true)
					ok, err := forcer.ForceUnlock(ctx)
					require.NoError(t, err)
					require.Equal(t, !free, ok)
					require.False(t, hook.armed.Load(), "the ForceUnlock was not resent")

					locked, err := later.IsLocked(ctx)
					require.NoError(t, err)
					require.True(t, locked, "the resent ForceUnlock released a hold taken after its first run")
					requireOpen(t, later.Lost(), "the later hold was lost")
					require.NoError(t, later.Unlock(ctx))
				})
			}
		}
	})
}

// TestTokenAheadSurvivesOtherKindRelease: the fence key of a name is
// ahead of the server clock (as the tokens of a faster clock before a
// failover leave it; see TestHandoffFenceWrite). A lock of kind Y takes a
// token past it and is released. A lock of another kind X on the same name,
// held since before (a different lock, with an older token), is released
// then: its release must not write its older token back over the newer
// one, or Y's next token comes from the clock and goes backwards. (Found
// by a reviewer.)
func TestTokenAheadSurvivesOtherKindRelease(t *testing.T) {
	kinds := map[string]func(c *redlatch.Client, n string) tokenHandle{
		"Mutex":     func(c *redlatch.Client, n string) tokenHandle { return c.Mutex(n) },
		"FairMutex": func(c *redlatch.Client, n string) tokenHandle { return c.FairMutex(n) },
		"RWMutex":   func(c *redlatch.Client, n string) tokenHandle { return c.RWMutex(n) },
	}
	for _, pair := range [][2]string{{"RWMutex", "Mutex"}, {"FairMutex", "Mutex"}, {"Mutex", "RWMutex"}, {"Mutex", "FairMutex"}} {
		x, y := pair[0], pair[1]
		t.Run(x+"/"+y, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				rdb := b.Client(t)
				c := newClient(t, b)
				fence := "{" + name + "}:fence"
				held := kinds[x](c, name)
				require.NoError(t, held.Lock(ctx))

				ahead := time.Now().Add(time.Hour).UnixMicro()
				require.NoError(t, rdb.Set(ctx, fence, strconv.FormatInt(ahead, 10), time.Minute).Err())
				m := kinds[y](c, name)
				require.NoError(t, m.Lock(ctx))
				last := m.Token()
				require.Greater(t, last, ahead)
				require.NoError(t, m.Unlock(ctx))

				require.NoError(t, held.Unlock(ctx)) // an older token than last
				require.NoError(t, m.Lock(ctx))
				require.Greater(t, m.Token(), last, "%s's token went backwards after a %s release", y, x)
				require.NoError(t, m.Unlock(ctx))
			})
		})
	}
}

// scriptOn matches a script call (EVAL or EVALSHA) on the keys of the
// primitive name: an argument with its hash tag "{name}".
func scriptOn(name string) func(redis.Cmder) bool {
	tag := "{" + name + "}"
	return func(cmd redis.Cmder) bool {
		return (cmd.Name() == "evalsha" || cmd.Name() == "eval") && slices.ContainsFunc(cmd.Args(), func(a any) bool {
			s, ok := a.(string)
			return ok && strings.HasPrefix(s, tag)
		})
	}
}

// armedOnce matches the first command match accepts once armed is set,
// and clears armed.
func armedOnce(armed *atomic.Bool, match func(redis.Cmder) bool) func(redis.Cmder) bool {
	return func(cmd redis.Cmder) bool { return match(cmd) && armed.CompareAndSwap(true, false) }
}

// TestReleaseCtxEndsMidCall: a release whose ctx ends while the call is in
// flight (here it never reached Redis) is the ended-ctx release of
// TestReleaseWithEndedCtx a moment later: the handle drops the hold (the
// watchdog no longer renews it), so the release must still reach Redis.
// It did not: the lock stayed taken by nobody for its whole lease (30s),
// and another Client could not take it.
func TestReleaseCtxEndsMidCall(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range releaseKinds {
				run(k.name, func(t *testing.T) {
					ctx := ctxT(t, 20*time.Second)
					name := redistest.UniqueName(t)
					// The release never reaches Redis: held back until its ctx ends.
					_, held, cut := cutOffHold(t, ctx, b, k, name, false)
					t.Logf("release returned %v", cut(held.release))
					requireTakenBack(t, ctx, b, k, name, 2*time.Second, "the release whose ctx ended mid-call left the lock taken")
				})
			}
		})
	})
}

// TestReentrantReleaseCtxEndsMidCall: TestReleaseCtxEndsMidCall for a
// partial release of a reentrant hold (two Locks). The handle counts one
// hold fewer whatever the outcome: the release must reach Redis (the count
// stayed 2 there, so the second Unlock left the lock taken by nobody for
// its whole lease while returning nil), and only once (when it had run,
// its resend must not decrement the count again).
func TestReentrantReleaseCtxEndsMidCall(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range releaseKinds {
				if !k.reentrant {
					continue
				}
				for _, ran := range []bool{false, true} {
					run(fmt.Sprintf("%s/ran=%v", k.name, ran), func(t *testing.T) {
						ctx := ctxT(t, 20*time.Second)
						name := redistest.UniqueName(t)
						// The release is held back until its ctx ends: before
						// Redis runs it, or (ran) after.
						_, held, cut := cutOffHold(t, ctx, b, k, name, ran)
						require.NoError(t, held.acquire(ctx))
						require.ErrorIs(t, cut(held.release), context.DeadlineExceeded)
						time.Sleep(100 * time.Millisecond) // a resend lands
						require.NoError(t, held.release(ctx), "the second release")
						requireTakenBack(t, ctx, b, k, name, 2*time.Second, "the lock stayed taken after both holds were released")
					})
				}
			}
		})
	})
}

// TestCloseNotHeldUpBySubscriberReconnect: the server stops answering
// (SIGSTOP) while a Lock waits; the subscriber drops the silent connection
// and go-redis dials a new one, whose handshake waits for its read
// deadline (the client's ReadTimeout: the subscriber's ctx has none). Close
// closes the subscriber connection, which waited for that handshake, and
// so did Close: up to the ReadTimeout, here 10s.
func TestCloseNotHeldUpBySubscriberReconnect(t *testing.T) {
	srv := redistest.NewServer(t)
	opt := srv.Options()
	opt.ReadTimeout = 10 * time.Second
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	holder := newClientOn(t, srv.Client(t))
	require.NoError(t, holder.Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(3*time.Second)) // health checks every 1s
	got := make(chan error, 1)
	go func() { got <- c.Mutex(name).Lock(ctx) }()
	time.Sleep(300 * time.Millisecond) // the Lock waits, subscribed
	srv.Stop(t)
	t.Cleanup(func() { srv.Cont(t) })
	time.Sleep(3 * time.Second) // ping at 1s, drop at 2s, then a new connection's handshake waits
	start := time.Now()
	require.NoError(t, c.Close())
	took := time.Since(start)
	select {
	case err := <-got:
		require.ErrorIs(t, err, redlatch.ErrClosed)
	case <-time.After(time.Second):
		t.Fatal("the waiter did not return at Close")
	}
	srv.Cont(t)
	require.Less(t, took, time.Second, "Close waited for the subscriber's reconnection")
}

// TestHoldsAfterClose: TestEveryMethodAfterClose on handles that hold:
// every method returns ErrClosed without a request to Redis (but a
// Redlock's Unlock, which releases on every master, see there); the Redis
// client given to New stays open, and a new Client on it works.
func TestHoldsAfterClose(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		hook := &redistest.RequestCounter{}
		rdb.AddHook(hook)
		c := redlatch.New(rdb)
		m, rm, fm := c.Mutex(name+"m"), c.ReentrantMutex(name+"r"), c.FairMutex(name+"f")
		rw, rd := c.RWMutex(name+"w"), c.RWMutex(name+"rd")
		s, l := c.Semaphore(name+"s", 2), c.CountDownLatch(name+"l")
		r := redlatch.NewRedlock(name+"rl", []*redlatch.Client{c})
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, rm.Lock(ctx))
		require.NoError(t, fm.Lock(ctx))
		require.NoError(t, rw.Lock(ctx))
		require.NoError(t, rd.RLock(ctx))
		require.NoError(t, s.Acquire(ctx, 1))
		require.NoError(t, r.Lock(ctx))
		_, err := l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.NoError(t, c.Close())
		before := hook.N.Load()
		var errs []error
		for _, x := range []locker{m, rm, fm, rw, rd} {
			_, e2 := x.TryLock(ctx)
			_, e4 := x.TTL(ctx)
			_, e5 := x.IsLocked(ctx)
			_, e6 := x.ForceUnlock(ctx)
			errs = append(errs, x.Unlock(ctx), x.Lock(ctx), e2, e4, e5, e6,
				redlatch.Do(ctx, x, func(context.Context) error { return nil }))
		}
		_, e1 := rm.HoldCount(ctx)
		_, e2 := fm.HoldCount(ctx)
		_, e3 := rd.TryRLock(ctx)
		_, e4 := s.TryAcquire(ctx, 1)
		_, e5 := s.Available(ctx)
		_, e6 := l.TrySetCount(ctx, 1)
		_, e7 := l.Count(ctx)
		_, e8 := l.Delete(ctx)
		_, e9 := r.TryLock(ctx)
		errs = append(errs, e1, e2, e3, e4, e5, e6, e7, e8, e9, rd.RUnlock(ctx), rd.RLock(ctx),
			s.Release(ctx, 1), s.Acquire(ctx, 1), l.CountDown(ctx), l.Wait(ctx), r.Lock(ctx))
		for i, err := range errs {
			require.ErrorIs(t, err, redlatch.ErrClosed, "call %d", i)
		}
		require.Equal(t, before, hook.N.Load(), "requests to Redis after Close")
		require.NoError(t, rdb.Ping(ctx).Err(), "Close closed the Redis client")
		c2 := newClientOn(t, rdb)
		m2 := c2.Mutex(name + "new")
		require.NoError(t, m2.Lock(ctx))
		require.NoError(t, m2.Unlock(ctx))
	})
}

// TestCloseEndsEveryWaitNoLeak: a wait of every kind in progress at Close
// returns ErrClosed at once, Close returns promptly, and no goroutine of
// the Client outlives it.
func TestCloseEndsEveryWaitNoLeak(t *testing.T) {
	redistest.ForEachInTurn(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b)
		require.NoError(t, holder.Mutex(name+"m").Lock(ctx))
		require.NoError(t, holder.FairMutex(name+"f").Lock(ctx))
		require.NoError(t, holder.RWMutex(name+"w").Lock(ctx))
		require.NoError(t, holder.RWMutex(name+"r").Lock(ctx))
		require.NoError(t, holder.Semaphore(name+"s", 1).Acquire(ctx, 1))
		_, err := holder.CountDownLatch(name+"l").TrySetCount(ctx, 1)
		require.NoError(t, err)
		rdb := b.Client(t)
		require.NoError(t, rdb.Ping(ctx).Err())
		g0 := ownGoroutines()
		c := redlatch.New(rdb)
		waits := []func() error{
			func() error { return c.Mutex(name + "m").Lock(ctx) },
			func() error { return c.ReentrantMutex(name + "m").Lock(ctx) },
			func() error { return c.FairMutex(name + "f").Lock(ctx) },
			func() error { return c.RWMutex(name + "w").Lock(ctx) },
			func() error { return c.RWMutex(name + "r").RLock(ctx) },
			func() error { return c.Semaphore(name+"s", 1).Acquire(ctx, 1) },
			func() error { return c.CountDownLatch(name + "l").Wait(ctx) },
			func() error { return redlatch.NewRedlock(name+"m", []*redlatch.Client{c}).Lock(ctx) },
		}
		got := make(chan error, len(waits))
		for _, w := range waits {
			go func() { got <- w() }()
		}
		time.Sleep(500 * time.Millisecond) // all wait
		start := time.Now()
		require.NoError(t, c.Close())
		require.Less(t, time.Since(start), time.Second, "Close was slow")
		for range waits {
			select {
			case err := <-got:
				require.ErrorIs(t, err, redlatch.ErrClosed)
			case <-time.After(time.Second):
				t.Fatal("a wait outlived Close")
			}
		}
		// The holder's goroutines are older: count ours against them.
		deadline := time.Now().Add(time.Second)
		for left := ownGoroutines(); len(left) > len(g0); left = ownGoroutines() {
			if time.Now().After(deadline) {
				t.Fatalf("%d goroutine(s) outlived Close:\n%s", len(left)-len(g0), strings.Join(left, "\n\n"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		require.Equal(t, int64(0), rdb.ZCard(ctx, fairQueue(name+"f")).Val(), "a queue place left behind")
	})
}

// goroutinesWith returns the stacks of the goroutines whose stack contains
// s, other than the caller's.
func goroutinesWith(s string) []string {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i > 0 && strings.Contains(g, s) {
			out = append(out, g)
		}
	}
	return out
}

// ownGoroutines returns the stacks of the goroutines running redlatch's
// code (not its tests'), other than the caller's.
func ownGoroutines() []string { return goroutinesWith("github.com/redlatch/redlatch.") }

// TestResendSparesLaterHold: a release whose ctx ended mid-call is resent
// in the background (TestReleaseCtxEndsMidCall). The caller, told the hold
// is gone, takes the lock again at once through the same handle, before or
// after the resend lands, whether the first release reached Redis or not
// (ran): the resend must release the ended hold once, and never the new
// one (a re-entry of the same hold, or a later hold with a new token).
func TestResendSparesLaterHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, k := range releaseKinds {
				if k.name == "Semaphore" {
					continue // its permits: see TestSem*
				}
				for _, ran := range []bool{false, true} {
					run(fmt.Sprintf("%s/ran=%v", k.name, ran), func(t *testing.T) {
						ctx := ctxT(t, 20*time.Second)
						name := redistest.UniqueName(t)
						c, held, cut := cutOffHold(t, ctx, b, k, name, ran)
						require.ErrorIs(t, cut(held.release), context.DeadlineExceeded)
						// At once: before the resend lands (it has 2s).
						lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
						defer lcancel()
						require.NoError(t, held.acquire(lctx), "the lock was not taken again")
						time.Sleep(300 * time.Millisecond) // the resend lands
						if held.count != nil {
							n, err := held.count(ctx)
							require.NoError(t, err)
							require.Equal(t, 1, n, "the resend released the later hold, or the ended one was not released")
						}
						ttl, err := c.RWMutex(name).TTL(ctx)
						if !strings.HasPrefix(k.name, "RWMutex") {
							ttl, err = c.Mutex(name).TTL(ctx)
							if k.name == "FairMutex" {
								ttl, err = c.FairMutex(name).TTL(ctx)
							}
						}
						require.NoError(t, err)
						require.NotZero(t, ttl, "the resend released the later hold")
						require.NoError(t, held.release(ctx))
						requireTakenBack(t, ctx, b, k, name, 2*time.Second, "the lock stayed taken")
					})
				}
			}
		})
	})
}

// TestResendSparesTransferredHold: an Unlock whose ctx ends while it hands
// the lock to a waiter of the same Client (a local transfer) is resent as a
// public release; the waiter, told to retry, takes the lock. Whether the
// transfer reached Redis or not (ran), and also when the waiter shares the
// owner id (WithOwner), the resend must not release the waiter's hold.
func TestResendSparesTransferredHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, reentrant := range []bool{false, true} {
				for _, shared := range []bool{false, true} {
					for _, ran := range []bool{false, true} {
						if reentrant && shared {
							continue // a handle of the owner re-enters: it does not wait
						}
						run(fmt.Sprintf("reentrant=%v/shared=%v/ran=%v", reentrant, shared, ran), func(t *testing.T) {
							ctx := ctxT(t, 20*time.Second)
							name := redistest.UniqueName(t)
							c, cut := cutOffClient(t, b, name, ran)
							var opts []redlatch.LockOption
							if shared {
								opts = append(opts, redlatch.WithOwner(redistest.UniqueName(t)))
							}
							type pair struct{ lock, unlock func(context.Context) error }
							take := func() pair {
								if reentrant {
									m := c.ReentrantMutex(name, opts...)
									return pair{m.Lock, m.Unlock}
								}
								m := c.Mutex(name, opts...)
								return pair{m.Lock, m.Unlock}
							}
							holder, waiter := take(), take()
							require.NoError(t, holder.lock(ctx)) // both scripts loaded
							require.NoError(t, holder.unlock(ctx))
							require.NoError(t, holder.lock(ctx))
							got := make(chan error, 1)
							go func() { got <- waiter.lock(ctx) }()
							// The waiter's failed attempt marks the hold (field w).
							adm := b.Client(t)
							require.Eventually(t, func() bool { return adm.HExists(ctx, lockKey(name), "w").Val() }, 3*time.Second, 5*time.Millisecond)
							time.Sleep(50 * time.Millisecond) // it waits
							require.ErrorIs(t, cut(holder.unlock), context.DeadlineExceeded)
							select {
							case err := <-got:
								require.NoError(t, err)
							case <-time.After(3 * time.Second):
								t.Fatal("the waiter did not get the lock")
							}
							time.Sleep(300 * time.Millisecond) // the resend lands
							ttl, err := c.Mutex(name).TTL(ctx)
							require.NoError(t, err)
							require.NotZero(t, ttl, "the resend released the waiter's hold")
							require.NoError(t, waiter.unlock(ctx))
						})
					}
				}
			}
		})
	})
}

// endHook records when the commands naming a key with tag, sent before
// open was cleared, returned (go-redis's retries included).
type endHook struct {
	tag  string
	mu   *sync.Mutex
	open *bool      // commands sent now are recorded
	last *time.Time // when the last of them returned
}

func (h endHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) { return next(ctx, network, addr) }
}

func (h endHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.mu.Lock()
		record := *h.open && strings.Contains(fmt.Sprint(cmd.Args()...), h.tag)
		h.mu.Unlock()
		err := next(ctx, cmd)
		if record {
			h.mu.Lock()
			*h.last = time.Now()
			h.mu.Unlock()
		}
		return err
	}
}

func (h endHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestCloseEndsAttemptInFlightAtReadDeadline: a wait whose attempt is on
// its way to a frozen server at Close ends at that attempt's read deadline
// (here the Redis client's ReadTimeout), as Close documents: go-redis must
// not send the attempt again after its read timed out, on a new connection
// whose handshake waits for a ReadTimeout of its own.
func TestCloseEndsAttemptInFlightAtReadDeadline(t *testing.T) {
	srv := redistest.NewServer(t)
	const readTimeout = 500 * time.Millisecond
	for _, kind := range []string{"Mutex", "FairMutex"} {
		t.Run(kind, func(t *testing.T) {
			name := redistest.UniqueName(t)
			open, last := false, time.Time{}
			hook := endHook{tag: "{" + name + "}", mu: new(sync.Mutex), open: &open, last: &last}
			opt := srv.Options()
			opt.ReadTimeout = readTimeout
			rdb := redis.NewClient(opt)
			rdb.AddHook(hook)
			t.Cleanup(func() { _ = rdb.Close() })
			c := newClientOn(t, rdb)
			ctx := ctxT(t, 20*time.Second)
			_, err := c.Mutex(name + "warm").TryLock(ctx) // a pooled connection, the scripts loaded
			require.NoError(t, err)
			srv.Stop(t)
			t.Cleanup(func() { srv.Cont(t) })
			lock := map[string]func(context.Context) error{"Mutex": c.Mutex(name).Lock, "FairMutex": c.FairMutex(name).Lock}[kind]
			hook.mu.Lock()
			open = true
			hook.mu.Unlock()
			got := make(chan error, 1)
			sent := time.Now()
			go func() { got <- lock(ctx) }()
			time.Sleep(100 * time.Millisecond) // the first attempt waits for its reply
			hook.mu.Lock()
			open = false // the undo is not the attempt
			hook.mu.Unlock()
			start := time.Now()
			require.NoError(t, c.Close())
			select {
			case err = <-got:
			case <-time.After(10 * time.Second):
				t.Fatal("the wait did not return")
			}
			took := time.Since(start)
			srv.Cont(t)
			hook.mu.Lock()
			attempt := last.Sub(sent)
			hook.mu.Unlock()
			t.Logf("%s: %v %v after Close; its attempt returned %v after it was sent", kind, err, took.Round(time.Millisecond), attempt.Round(time.Millisecond))
			require.ErrorIs(t, err, redlatch.ErrClosed)
			require.Less(t, attempt, readTimeout+300*time.Millisecond, "the attempt was sent again after Close")
		})
	}
}

// TestWaiterOnHugeTTLDoesNotSpin: a lock key written by hand with a very
// long expiry (PEXPIRE of about 317 years; Redis accepts it) is held: its
// waiter sleeps, bounded by the holder's remaining PTTL, and does not retry
// in a busy loop (a PTTL in ms times time.Millisecond overflowed
// time.Duration to a negative sleep).
func TestWaiterOnHugeTTLDoesNotSpin(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("miniredis does not keep an expiry that long")
		}
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		require.NoError(t, rdb.HSet(ctx, lockKey(name), "o", "someone", "c", "1", "t", "1").Err())
		require.NoError(t, rdb.Do(ctx, "PEXPIRE", lockKey(name), int64(10_000_000_000_000)).Err())

		c, _, scripts := countingClient(t, b)
		m := c.Mutex(name)
		wctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		err := m.Lock(wctx)
		requireWaitErr(t, err, wctx)
		n := scripts.n.Load() + scripts.piped.Load()
		require.LessOrEqual(t, n, int64(5), "the waiter spun: %d attempts in 500ms on a held lock", n)
	})
}

// TestZeroClientInvalid: a Client not made by New (its zero value) is bad
// input, as a nil one is: every primitive's call returns an error wrapping
// ErrInvalidArgument, and so does Close. They panicked (a nil pointer).
// (From a reviewer's side note.)
func TestZeroClientInvalid(t *testing.T) {
	c := &redlatch.Client{}
	ctx := context.Background()
	require.ErrorIs(t, c.Mutex("a").Lock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.ReentrantMutex("a").Lock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.FairMutex("a").Lock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.RWMutex("a").RLock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.Semaphore("a", 1).Acquire(ctx, 1), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.CountDownLatch("a").Wait(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, redlatch.NewRedlock("a", []*redlatch.Client{c}).Lock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, c.Close(), redlatch.ErrInvalidArgument)
}

// cancelOnWrongTypeHook cancels the context of the call under test right
// after an acquisition script matching match got its WRONGTYPE reply: the
// reply is in, and the caller's ctx has ended by the time the library
// looks at it (a request aborted as the reply came).
type cancelOnWrongTypeHook struct {
	passHook
	match  func(redis.Cmder) bool
	cancel atomic.Pointer[context.CancelFunc]
	seen   atomic.Int32
}

func (h *cancelOnWrongTypeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err != nil && strings.Contains(err.Error(), "WRONGTYPE") && h.match(cmd) {
			if c := h.cancel.Load(); c != nil {
				h.seen.Add(1)
				(*c)()
			}
		}
		return err
	}
}

// TestWrongTypeReplyAsCtxEndsWrapsErrWrongType: an acquisition whose
// attempt got a WRONGTYPE reply (another program's value under the key)
// while its ctx ended returns a failed wait (ErrNotObtained and ctx.Err())
// that still wraps ErrWrongType, as the errors' doc promises for a key
// holding a value redlatch did not write. failedAttempt wrapped the raw
// reply in the wait error, unconverted: errors.Is(err, ErrWrongType) was
// false, while the same reply a moment earlier gave ErrWrongType (and a
// Redlock's wait error converts its masters' replies). (Found by a
// reviewer.)
func TestWrongTypeReplyAsCtxEndsWrapsErrWrongType(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, tc := range []struct {
			name    string
			key     func(name string) string
			acquire func(c *redlatch.Client, name string, ctx context.Context) error
		}{
			{"Mutex", lockKey, func(c *redlatch.Client, n string, ctx context.Context) error {
				return c.Mutex(n).Lock(ctx)
			}},
			{"FairMutex", func(n string) string { return "{" + n + "}:fair" }, func(c *redlatch.Client, n string, ctx context.Context) error {
				return c.FairMutex(n).Lock(ctx)
			}},
			{"RWMutex", func(n string) string { return "{" + n + "}:rw" }, func(c *redlatch.Client, n string, ctx context.Context) error {
				return c.RWMutex(n).RLock(ctx)
			}},
			{"Semaphore", semKey, func(c *redlatch.Client, n string, ctx context.Context) error {
				return c.Semaphore(n, 2).Acquire(ctx, 1)
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := ctxT(t, 10*time.Second)
				name := redistest.UniqueName(t)
				require.NoError(t, b.Client(t).Set(ctx, tc.key(name), "foreign", time.Minute).Err())
				rdb := b.Client(t)
				hook := &cancelOnWrongTypeHook{match: scriptWith(tc.key(name))}
				rdb.AddHook(hook)
				c := newClientOn(t, rdb)

				// Without the ctx ending: ErrWrongType.
				require.ErrorIs(t, tc.acquire(c, name, ctx), redlatch.ErrWrongType)

				actx, cancel := context.WithCancel(ctx)
				defer cancel()
				hook.cancel.Store(&cancel)
				err := tc.acquire(c, name, actx)
				require.NotZero(t, hook.seen.Load(), "the attempt got no WRONGTYPE")
				requireWaitErr(t, err, actx)
				require.ErrorIs(t, err, redlatch.ErrWrongType,
					"the WRONGTYPE reply of the attempt is not reported as ErrWrongType: %v", err)
			})
		}
	})
}

// TestForceUnlockRunThenBusyPastCleanupNotReportedRefused: a ForceUnlock
// runs in Redis (the holder's hold released, a waiter woken), its reply is
// lost, and go-redis's resend is refused with BUSY: another client's script
// runs past busy-reply-threshold, for longer than the cleanup timeout
// (2s). Client.runOnce sends it again, paced, until that timeout ends,
// every send refused, and then returned the last BUSY reply: ForceUnlock
// reported (false, BUSY), "nothing held" and "refused, did not run",
// though it had released a hold. An operator who calls again on that
// refusal force-unlocks the woken waiter, which took the lock once Redis
// answered again (the case runOnce was brought in for, with TRYAGAIN:
// TestForceUnlockRunThenRefusedPastTryAgainWait). A call whose every
// resend was refused after a send that may have run has an unknown
// outcome, not a refusal (README: "never reports a refusal after a send
// that may have run"); a latch CountDown likewise. (Found by a reviewer of
// 0b990a1.)
func TestForceUnlockRunThenBusyPastCleanupNotReportedRefused(t *testing.T) {
	t.Parallel() // see TestMain
	type forcer interface {
		Lock(context.Context) error
		Unlock(context.Context) error
		IsLocked(context.Context) (bool, error)
		ForceUnlock(context.Context) (bool, error)
	}
	kinds := []struct {
		name string
		key  func(name string) string
		make func(c *redlatch.Client, name string) forcer
	}{
		{"Mutex", lockKey, func(c *redlatch.Client, n string) forcer { return c.Mutex(n) }},
		{"RWMutex", writersWakeKey, func(c *redlatch.Client, n string) forcer { return c.RWMutex(n) }},
		{"FairMutex", fairKey, func(c *redlatch.Client, n string) forcer { return c.FairMutex(n) }},
	}
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	b := serverBackend(srv)
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := ctxT(t, 30*time.Second)
			name := redistest.UniqueName(t)
			cf, hook := lossyClient(t, b, scriptWith(k.key(name)), true)
			f := k.make(cf, name)
			_, err := f.ForceUnlock(ctx) // loads the script
			require.NoError(t, err)

			holder := k.make(newClient(t, b), name)
			require.NoError(t, holder.Lock(ctx))
			var busy <-chan error
			// Busy past the cleanup timeout (2s).
			hook.between = func() { busy = srv.BusyFor(t, 2800*time.Millisecond) }
			hook.armed.Store(true) // it runs; go-redis's resend is refused
			ok, err := f.ForceUnlock(ctx)
			waitNotBusy(t, srv, busy)
			require.False(t, hook.armed.Load())
			locked, lerr := holder.IsLocked(ctx)
			require.NoError(t, lerr)
			require.False(t, locked, "the ForceUnlock did not run")
			var reply redis.Error
			require.False(t, errors.As(err, &reply),
				"a ForceUnlock that released a hold reported a refusal (did not run): calling again releases the next holder: ok=%v err=%v", ok, err)
		})
	}

	t.Run("LatchCountDown", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		l, hook := lossyLatch(t, ctx, b, name, true)
		ok, err := l.TrySetCount(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok)
		var busy <-chan error
		// Busy past the cleanup timeout (2s), under go-redis's ReadTimeout (3s).
		hook.between = func() { busy = srv.BusyFor(t, 2800*time.Millisecond) }
		hook.armed.Store(true) // it counts down; go-redis's resend is refused
		err = l.CountDown(ctx)
		waitNotBusy(t, srv, busy)
		requireCount(t, ctx, l, 2)
		var reply redis.Error
		require.False(t, errors.As(err, &reply),
			"a CountDown that counted down reported a refusal (did not run): calling again counts twice: %v", err)
	})
}

// waitNotBusy waits for the script BusyFor started to end: its own call
// may return before (go-redis resends it at its ReadTimeout, and that
// resend is refused BUSY).
func waitNotBusy(t *testing.T, srv *redistest.Server, busy <-chan error) {
	t.Helper()
	<-busy
	probe := srv.Client(t)
	require.Eventually(t, func() bool {
		return probe.Ping(context.Background()).Err() == nil
	}, 5*time.Second, 10*time.Millisecond, "the server stayed busy")
}

// migratingThenBusyHook refuses a ForceUnlock of key: its first send as a
// migrating slot past tryAgainWait does (TRYAGAIN, with ctx alive), every
// later send with BUSY; the second send cancels the caller's ctx.
type migratingThenBusyHook struct {
	passHook
	key    string
	cancel context.CancelFunc

	mu    sync.Mutex
	calls int
}

func (h *migratingThenBusyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if (cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 4 || args[3] != h.key {
			return next(ctx, cmd)
		}
		h.mu.Lock()
		h.calls++
		n := h.calls
		h.mu.Unlock()
		var err error
		switch n {
		case 1:
			err = busyReply("TRYAGAIN Multiple keys request during rehashing of slot")
		case 2:
			h.cancel()
			fallthrough
		default:
			err = busyReply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.")
		}
		cmd.SetErr(err)
		return err
	}
}

// TestForceUnlockMigratingThenBusyCtxCancelledReturnsCtxErr: a ForceUnlock
// refused by a migrating slot (past tryAgainWait, ctx alive) is sent again
// with a context that ends with the caller's; Redis refuses that resend
// with BUSY, and the caller cancels its ctx during the backoff. The call
// must return its ctx's error (README: "A call whose ctx ends while it is
// refused so returns the ctx's error"): runOnce returned
// context.DeadlineExceeded for a cancelled ctx. (Found by a reviewer.)
func TestForceUnlockMigratingThenBusyCtxCancelledReturnsCtxErr(t *testing.T) {
	srv := redistest.NewServer(t)
	rdb := srv.Client(t)
	name := redistest.UniqueName(t)
	ctx, cancel := context.WithCancel(ctxT(t, 30*time.Second))
	defer cancel()
	hook := &migratingThenBusyHook{key: lockKey(name), cancel: cancel}
	rdb.AddHook(hook)
	c := newClientOn(t, rdb)
	start := time.Now()
	_, err := c.Mutex(name).ForceUnlock(ctx)
	require.Error(t, err)
	require.Less(t, time.Since(start), time.Second, "returned long after its ctx")
	require.ErrorIs(t, err, context.Canceled, "the ctx was cancelled, not past its deadline: %v", err)
	require.False(t, errors.Is(err, context.DeadlineExceeded), "%v", err)
}
